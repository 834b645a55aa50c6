package testutil

import (
	"errors"
	"fmt"
	"runtime"
	"strings"
	"sync/atomic"
	"testing"
)

func TestEventuallyReturnsOnceTheConditionHolds(t *testing.T) {
	var n atomic.Int32
	go func() {
		for range 3 {
			n.Add(1)
		}
	}()
	Eventually(t, "three increments", func() bool { return n.Load() == 3 })
	calls := 0
	EventuallyNil(t, "the third call", func() error {
		if calls++; calls < 3 {
			return errors.New("not yet")
		}
		return nil
	})
	if calls != 3 {
		t.Fatalf("check called %d times after it returned nil, want 3", calls)
	}
}

// fatalTB records Fatalf and ends the goroutine, as testing.T does.
type fatalTB struct {
	testing.TB
	msg string
}

func (f *fatalTB) Helper() {}
func (f *fatalTB) Fatalf(format string, args ...any) {
	f.msg = fmt.Sprintf(format, args...)
	runtime.Goexit()
}

func TestEventuallyNilStopsAtAFinalError(t *testing.T) {
	tb := &fatalTB{TB: t}
	calls := 0
	done := make(chan struct{})
	go func() {
		defer close(done)
		EventuallyNil(tb, "a good answer", func() error {
			calls++
			return Final(errors.New("malformed"))
		})
	}()
	<-done
	if calls != 1 || !strings.Contains(tb.msg, "a good answer") || !strings.Contains(tb.msg, "malformed") {
		t.Fatalf("calls %d, failure %q; want one call and a failure naming the wait and the error", calls, tb.msg)
	}
}
