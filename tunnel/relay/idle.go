package relay

import (
	"sync"
	"sync/atomic"
	"time"
)

// IdleTimer calls its expiry once nothing touched it for its duration.
// It is one time.Timer, re-armed from the last touch when it fires, so
// that a touch, made on every read or write of a hot path, costs one
// atomic store and no timer operation. A relay's idle timeout is one; the
// waypoint's stream and per-try idle timeouts are others. The methods of
// a nil *IdleTimer do nothing.
type IdleTimer struct {
	d      time.Duration
	expire func()
	since  time.Time
	last   atomic.Int64 // time.Since(since) of the last touch

	mu      sync.Mutex // guards the fields below
	t       *time.Timer
	stopped bool
}

// NewIdleTimer returns a timer for d that calls expire, on a goroutine of
// its own, once it went d without a touch after Start.
func NewIdleTimer(d time.Duration, expire func()) *IdleTimer {
	return &IdleTimer{d: d, expire: expire, since: time.Now()}
}

// Start arms the timer, counting from now; again does nothing.
func (it *IdleTimer) Start() {
	if it == nil {
		return
	}
	it.Touch()
	it.mu.Lock()
	defer it.mu.Unlock()
	if it.t == nil && !it.stopped {
		it.t = time.AfterFunc(it.d, it.check)
	}
}

// Touch notes activity: the timer counts from now.
func (it *IdleTimer) Touch() {
	if it != nil {
		it.last.Store(int64(time.Since(it.since)))
	}
}

// Stop disarms the timer for good.
func (it *IdleTimer) Stop() {
	if it == nil {
		return
	}
	it.mu.Lock()
	defer it.mu.Unlock()
	it.stopped = true
	if it.t != nil {
		it.t.Stop()
	}
}

// check is the timer: it expires, or waits for the rest of d counted from
// the last touch.
func (it *IdleTimer) check() {
	quiet := time.Since(it.since) - time.Duration(it.last.Load())
	it.mu.Lock()
	stopped := it.stopped
	if !stopped && quiet < it.d {
		it.t.Reset(it.d - quiet)
	}
	it.mu.Unlock()
	if !stopped && quiet >= it.d {
		it.expire()
	}
}
