package hbone

import (
	"sync"
	"sync/atomic"
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

// deadlines are a stream's read and write deadlines, made by the first
// Set*Deadline: most streams never set one, and an idle tunnel keeps its
// Stream.
type deadlines struct{ r, w deadline }

// wait returns a channel closed once the deadline passes, or nil (never
// ready in a select) when none is set. d may be nil: no deadline.
func (d *deadline) wait() <-chan struct{} {
	if d == nil {
		return nil
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.at.IsZero() {
		return nil
	}
	return d.done
}

// expired reports whether a set deadline has passed. d may be nil: no
// deadline.
func (d *deadline) expired() bool {
	if d == nil {
		return false
	}
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

// signal wakes a stream's waiter: a Read, Write or Forward waiting for the
// other side or the peer. Its channel is made by the first wait, so a
// stream nobody waited on carries none. A waiter takes the channel
// (wait) before it checks what it waits for; a notifier changes that
// first and notifies after, so either the waiter sees the change or the
// notifier sees the channel.
type signal struct{ ch atomic.Pointer[chan struct{}] }

// wait returns the channel a notify sends on, making it if need be.
func (g *signal) wait() <-chan struct{} {
	if p := g.ch.Load(); p != nil {
		return *p
	}
	ch := make(chan struct{}, 1)
	if g.ch.CompareAndSwap(nil, &ch) {
		return ch
	}
	return *g.ch.Load()
}

// notify wakes the waiter, if any; a wake-up nobody took yet is kept.
func (g *signal) notify() {
	if p := g.ch.Load(); p != nil {
		select {
		case *p <- struct{}{}:
		default:
		}
	}
}
