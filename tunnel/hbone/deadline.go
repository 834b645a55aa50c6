package hbone

import (
	"sync"
	"time"
)

// deadline is a net.Conn deadline: a channel closed when the time passes.
// The channel and timer exist only while a deadline is set, so a stream
// that never sets one carries none.
type deadline struct {
	mu    sync.Mutex // guards the fields below
	timer *time.Timer
	done  chan struct{} // closed on expiry
	at    time.Time     // zero: no deadline
}

// set arms the deadline at t; the zero time clears it.
func (d *deadline) set(t time.Time) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.timer != nil {
		if !d.timer.Stop() {
			// The timer's func has run or is running and closes the old
			// channel; the next deadline needs a fresh one.
			d.done = nil
		}
		d.timer = nil
	} else if d.done != nil && closed(d.done) {
		d.done = nil
	}
	d.at = t
	if t.IsZero() {
		return
	}
	if d.done == nil {
		d.done = make(chan struct{})
	}
	dur := time.Until(t)
	if dur <= 0 {
		close(d.done)
		return
	}
	done := d.done
	d.timer = time.AfterFunc(dur, func() { close(done) })
}

// wait returns a channel closed once the deadline passes, or nil (never
// ready in a select) when none is set.
func (d *deadline) wait() <-chan struct{} {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.at.IsZero() {
		return nil
	}
	return d.done
}

// expired reports whether a set deadline has passed.
func (d *deadline) expired() bool {
	d.mu.Lock()
	defer d.mu.Unlock()
	return !d.at.IsZero() && closed(d.done)
}

func closed(ch chan struct{}) bool {
	select {
	case <-ch:
		return true
	default:
		return false
	}
}
