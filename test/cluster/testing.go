package cluster

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// Up starts a cluster for a test, in a state directory of its own under
// tb.TempDir(), and stops it, removing everything, when the test ends —
// also when it fails (then the tail of every component's log is logged).
// Tests of other packages that call Up wait for it (LockHost).
// The test is skipped when not root, unless CI=true, where it fails.
// Progress goes to the test log.
func Up(tb testing.TB, opts Options) *Cluster {
	tb.Helper()
	if os.Geteuid() != 0 {
		if os.Getenv("CI") == "true" {
			tb.Fatal("cluster: needs root (CI=true: not skipping)")
		}
		tb.Skip("cluster: needs root")
	}
	if opts.Dir == "" {
		opts.Dir = tb.TempDir()
	}
	// One node per machine: test binaries of several packages (go test
	// runs them in parallel) take turns.
	unlock, err := LockHost(func() {
		tb.Logf("cluster: another test's node runs on this machine; waiting for it")
	})
	if err != nil {
		tb.Fatalf("cluster: %v", err)
	}
	tb.Cleanup(unlock)
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.NewTextHandler(testWriter{tb}, nil))
	}
	ctx := context.Background()
	if d, ok := tb.(interface {
		Deadline() (deadline time.Time, ok bool)
	}); ok {
		if deadline, ok := d.Deadline(); ok {
			var cancel context.CancelFunc
			ctx, cancel = context.WithDeadline(ctx, deadline.Add(-30*time.Second))
			defer cancel()
		}
	}
	// Registered before Start: a start that fails half way is cleaned up.
	tb.Cleanup(func() {
		if tb.Failed() {
			if err := logTails(layout{opts.Dir}); err != nil {
				tb.Logf("component logs:\n%v", err)
			}
		}
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
		defer cancel()
		if err := Stop(ctx, opts.Dir); err != nil {
			tb.Errorf("stop cluster: %v", err)
		}
	})
	c, err := Start(ctx, opts)
	if err != nil {
		tb.Fatalf("start cluster: %v", err)
	}
	return c
}

type testWriter struct{ tb testing.TB }

func (w testWriter) Write(b []byte) (int, error) {
	w.tb.Log(strings.TrimRight(string(b), "\n"))
	return len(b), nil
}

// LockHost serialises nodes across the test binaries and commands of
// this repository (Up takes it; so must a command that starts a node in a
// directory of its own) on a lock file in its git-ignored cache, which
// the worktrees of a repository share. It calls waiting, if not nil, when
// another holder makes it wait. unlock releases it.
func LockHost(waiting func()) (unlock func(), err error) {
	root, err := RepoRoot()
	if err != nil {
		return nil, err
	}
	hostLock := filepath.Join(root, ".cache", "cluster", "host.lock")
	if err := os.MkdirAll(filepath.Dir(hostLock), 0o755); err != nil {
		return nil, err
	}
	f, err := os.OpenFile(hostLock, os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		return nil, err
	}
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		if waiting != nil {
			waiting()
		}
		if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX); err != nil {
			f.Close()
			return nil, fmt.Errorf("lock %s: %w", hostLock, err)
		}
	}
	// Closing the file releases the lock; the file stays (removing it
	// would race with a waiter holding it open).
	return func() { f.Close() }, nil
}
