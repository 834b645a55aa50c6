package kube

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

// BinDirEnv names an environment variable that, when set, points at a
// directory of prebuilt binaries (etcd, kube-apiserver, kubectl, ...) to use
// instead of building them with hack/kube-bins.sh.
const BinDirEnv = "AMBER_KUBE_BIN_DIR"

// DefaultBinaries are the binaries Binaries always provides: what Start
// and ControlPlane.Kubectl run.
var DefaultBinaries = []string{"etcd", "kube-apiserver", "kubectl"}

// Binaries returns the directory holding etcd, kube-apiserver, kubectl and
// the extra binaries named (kubelet, kube-scheduler,
// kube-controller-manager, kube-proxy), building whatever is missing with
// hack/kube-bins.sh. A warm cache answers in well under a second; a cold
// one takes minutes (see the package doc), with the script's progress on
// stderr.
//
// When the binaries cannot be built the test is skipped, unless CI=true:
// then it fails, so CI never passes by skipping. With -short it only uses
// binaries already in the cache and skips (also in CI) when they are not.
func Binaries(tb testing.TB, extra ...string) (dir string) {
	tb.Helper()
	names := append(append([]string(nil), DefaultBinaries...), extra...)
	if dir := os.Getenv(BinDirEnv); dir != "" {
		for _, n := range names {
			if _, err := os.Stat(filepath.Join(dir, n)); err != nil {
				unavailable(tb, fmt.Errorf("%s=%s: %w", BinDirEnv, dir, err))
			}
		}
		return dir
	}

	script, err := findScript()
	if err != nil {
		unavailable(tb, err)
	}
	args := names
	if testing.Short() {
		args = append([]string{"-check"}, names...)
	}
	// One build at a time per test binary; the script's lock serialises
	// separate test binaries (packages run in parallel by go test).
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
	// Progress of a cold build is worth seeing live, not only on failure.
	cmd.Stderr = io.MultiWriter(os.Stderr, &stderr)
	cmd.Cancel = func() error { return cmd.Process.Signal(syscall.SIGTERM) }
	cmd.WaitDelay = 10 * time.Second
	// The script stops its build on SIGTERM, also when the test binary dies.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGTERM}
	if err := proc.RunLocked(cmd); err != nil {
		if ctx.Err() != nil {
			unavailable(tb, fmt.Errorf("building %s did not finish before the test deadline; run make kube-bins first or raise -timeout", strings.Join(names, ", ")))
		}
		if testing.Short() {
			// -short asks for quick tests only, also in CI.
			tb.Skipf("kubernetes binaries not in the build cache and -short never builds (run make kube-bins): %s", strings.TrimSpace(stderr.String()))
		}
		unavailable(tb, fmt.Errorf("%s %s: %w\n%s", script, strings.Join(args, " "), err, stderr.Bytes()))
	}
	lines := strings.Split(strings.TrimSpace(stdout.String()), "\n")
	return lines[len(lines)-1]
}

var buildMu sync.Mutex

// unavailable skips the test, or fails it in CI where a skipped
// integration test would hide a broken build.
func unavailable(tb testing.TB, err error) {
	tb.Helper()
	if os.Getenv("CI") == "true" {
		tb.Fatalf("kubernetes binaries unavailable (CI=true, not skipping): %v", err)
	}
	tb.Skipf("kubernetes binaries unavailable: %v", err)
}

// findScript looks for hack/kube-bins.sh in the working directory (a test
// runs in its package's directory) and its parents.
func findScript() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", fmt.Errorf("find hack/kube-bins.sh: %w", err)
	}
	for {
		p := filepath.Join(dir, "hack", "kube-bins.sh")
		if _, err := os.Stat(p); err == nil {
			return p, nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", errors.New("find hack/kube-bins.sh: not in the working directory or its parents")
		}
		dir = parent
	}
}
