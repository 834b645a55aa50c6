// Package buildcache gives tests the binaries that hack/ scripts build
// from the Go module proxy into .cache/ (Kubernetes, istiod): fast when
// cached, a visible build when not, skipped off CI and failed on CI when
// they cannot be had.
package buildcache

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/amber-mesh/amber/test/proc"
)

// Build names one cached build.
type Build struct {
	// What names the binaries in messages ("kubernetes binaries").
	What string
	// Script is the file under hack/ that builds them and prints the
	// binary directory as its last line on stdout; with -check first it
	// only checks the cache.
	Script string
	// Args are passed to the script.
	Args []string
	// BinDirEnv names a variable that points at prebuilt files instead.
	BinDirEnv string
	// Files must exist in a BinDirEnv directory.
	Files []string
}

var buildMu sync.Mutex // one build at a time per test binary; the scripts lock across binaries

// Dir returns the directory holding b's binaries, running its script when
// needed. A cold build's progress goes to stderr live. When the binaries
// cannot be had the test skips, unless CI=true, where it fails so that CI
// never passes by skipping. With -short it only uses the cache.
func Dir(tb testing.TB, b Build) string {
	tb.Helper()
	if dir := os.Getenv(b.BinDirEnv); b.BinDirEnv != "" && dir != "" {
		for _, n := range b.Files {
			if _, err := os.Stat(filepath.Join(dir, n)); err != nil {
				unavailable(tb, b, fmt.Errorf("%s=%s: %w", b.BinDirEnv, dir, err))
			}
		}
		return dir
	}
	script, err := findScript(b.Script)
	if err != nil {
		unavailable(tb, b, err)
	}
	args := b.Args
	if testing.Short() {
		args = append([]string{"-check"}, args...)
	}
	buildMu.Lock()
	defer buildMu.Unlock()
	// A cold build can outlast the test binary's -timeout; stop it just
	// before, with a clear message, rather than leave it to the timeout
	// panic. SIGTERM lets the script stop the whole build.
	ctx := context.Background()
	if d, ok := tb.(interface{ Deadline() (time.Time, bool) }); ok {
		if deadline, ok := d.Deadline(); ok {
			var cancel context.CancelFunc
			ctx, cancel = context.WithDeadline(ctx, deadline.Add(-30*time.Second))
			defer cancel()
		}
	}
	var stdout, stderr bytes.Buffer
	cmd := exec.CommandContext(ctx, "bash", append([]string{script}, args...)...)
	cmd.Stdout = &stdout
	cmd.Stderr = io.MultiWriter(os.Stderr, &stderr)
	cmd.Cancel = func() error { return cmd.Process.Signal(syscall.SIGTERM) }
	cmd.WaitDelay = 10 * time.Second
	// The script stops its build on SIGTERM, also when the test binary dies.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGTERM}
	if err := proc.RunLocked(cmd); err != nil {
		if ctx.Err() != nil {
			unavailable(tb, b, fmt.Errorf("the build did not finish before the test deadline; run hack/%s first or raise -timeout", b.Script))
		}
		if testing.Short() {
			tb.Skipf("%s not in the build cache and -short never builds (run hack/%s): %s", b.What, b.Script, strings.TrimSpace(stderr.String()))
		}
		unavailable(tb, b, fmt.Errorf("%s %s: %w\n%s", script, strings.Join(args, " "), err, stderr.Bytes()))
	}
	lines := strings.Split(strings.TrimSpace(stdout.String()), "\n")
	return lines[len(lines)-1]
}

func unavailable(tb testing.TB, b Build, err error) {
	tb.Helper()
	if os.Getenv("CI") == "true" {
		tb.Fatalf("%s unavailable (CI=true, not skipping): %v", b.What, err)
	}
	tb.Skipf("%s unavailable: %v", b.What, err)
}

// findScript looks for hack/<name> in the working directory (a test runs
// in its package's directory) and its parents.
func findScript(name string) (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", fmt.Errorf("find hack/%s: %w", name, err)
	}
	for {
		p := filepath.Join(dir, "hack", name)
		if _, err := os.Stat(p); err == nil {
			return p, nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", errors.New("find hack/" + name + ": not in the working directory or its parents")
		}
		dir = parent
	}
}
