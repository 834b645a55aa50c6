// Package waittest is the waypoint tree's one way for a test to wait for
// an event it cannot be told about directly (a counter, an access-log
// line, a port answering), polling a condition rather than sleeping.
package waittest

import (
	"testing"
	"time"
)

// bound is how long For waits before it fails the test: generous, since
// it is never what a test measures.
const bound = 20 * time.Second

// For polls cond until it holds, and fails tb naming what it waited for
// when it still does not after a generous bound.
func For(tb testing.TB, what string, cond func() bool) {
	tb.Helper()
	deadline := time.Now().Add(bound)
	for !cond() {
		if time.Now().After(deadline) {
			tb.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}
