// Package testutil waits, in tests, for what other goroutines and
// processes do: one poll loop with one bound for the whole repository.
package testutil

import (
	"errors"
	"fmt"
	"testing"
	"time"
)

// Timeout bounds every wait. A passing test never comes near it; it is
// generous because the test machine has two cores shared by every tier
// running at once, and a wait that fails on a busy machine is a flake, not
// a finding. A test asserting "within d" measures d itself.
const Timeout = 60 * time.Second

// Eventually polls cond until it holds and fails tb, naming what it waited
// for, if it does not hold within Timeout. It is for events a test cannot
// be told about (a map entry written by another goroutine, a counter moved
// by the kernel); where time itself is the subject, use testing/synctest.
func Eventually(tb testing.TB, what string, cond func() bool) {
	tb.Helper()
	EventuallyNil(tb, what, func() error {
		if cond() {
			return nil
		}
		return errNotYet
	})
}

var errNotYet = errors.New("condition not met")

// errFinal marks the errors Final returns.
var errFinal = errors.New("not retried")

// Final marks err as one waiting cannot cure (a malformed answer rather
// than a late one): EventuallyNil stops at it.
func Final(err error) error { return fmt.Errorf("%w: %w", errFinal, err) }

// EventuallyNil polls check until it returns nil and fails tb with what and
// check's last error if it has not within Timeout, or at once if the error
// is Final.
func EventuallyNil(tb testing.TB, what string, check func() error) {
	tb.Helper()
	deadline := time.Now().Add(Timeout)
	// Start fast so a wait that is nearly over costs nothing, then back off
	// so a long one (an API server, an istiod push) does not spin a core.
	pause := time.Millisecond
	for {
		err := check()
		if err == nil {
			return
		}
		if errors.Is(err, errFinal) {
			tb.Fatalf("waiting for %s: %v", what, err)
		}
		if time.Now().After(deadline) {
			tb.Fatalf("timed out after %v waiting for %s: %v", Timeout, what, err)
		}
		time.Sleep(pause)
		pause = min(2*pause, 50*time.Millisecond)
	}
}
