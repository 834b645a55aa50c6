package cluster

import (
	"context"
	"log/slog"
	"os"
	"strings"
	"testing"
	"time"
)

// Up starts a cluster for a test, in a state directory of its own under
// tb.TempDir(), and stops it, removing everything, when the test ends —
// also when it fails (then the tail of every component's log is logged).
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
