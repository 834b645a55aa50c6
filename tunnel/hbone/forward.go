package hbone

import (
	"io"
	"net"
	"os"

	"github.com/amber-mesh/amber/tunnel/nonblock"
)

// Forward copies what s receives to w, as io.Copy(w, s) would, holding
// no goroutine while nothing arrives: the connection's reader writes DATA
// straight to w when w is a socket that takes it (see deliver), and a
// goroutine runs only while received data waits for w or when the copy
// ends. An idle tunnel then costs its receive direction no goroutine
// stack, which is most of what a Go proxy holds per idle connection
// (ARCHITECTURE.md, "Idle connections hold no goroutine").
//
// done is told once, on a goroutine of its own, when the copy ends: the
// bytes written and nil when the peer ended its side (io.EOF), or the
// error that stopped it. Until then the stream must not be read. Read
// deadlines are observed only when they are set or data arrives; Close
// stops an idle copy. done is an interface, not a func, so that a relay
// passes its direction itself rather than a closure per connection.
func Forward(s *Stream, w io.Writer, done ForwardDone) {
	s.readMu.Lock() // released by finishForward
	s.rmu.Lock()
	s.fwd = &forwarder{w: w, sink: nonblock.Raw(w), done: done}
	start := s.forwardReadyLocked()
	if !start {
		s.fwdIdle = true
		s.sink = s.fwd.sink
	}
	s.rmu.Unlock()
	if start {
		go s.forward()
	}
}

// ForwardDone is told how a Forward ended.
type ForwardDone interface {
	ForwardDone(n int64, err error)
}

// forwarder is the state of a Forward call.
type forwarder struct {
	w     io.Writer
	sink  nonblock.RawConn // w for direct delivery, or nil
	done  ForwardDone
	total int64 // bytes written so far; guarded by the running goroutine
}

// forwardReadyLocked reports whether a forward goroutine has something to
// do: data to write, an end to report, or a delivery to wait for.
func (s *Stream) forwardReadyLocked() bool {
	return s.closedR || s.hasDataLocked() || s.sinkErr != nil || s.rerr != nil ||
		s.sinking || s.rdl().expired()
}

// wakeRead tells the receive side's consumer that its state changed: a
// waiting Read or WriteTo, or an idle Forward, which gets a goroutine.
func (s *Stream) wakeRead() {
	s.rsig.notify()
	s.rmu.Lock()
	start := s.fwdIdle
	if start {
		// Direct delivery stops while the goroutine runs, so that what is
		// already buffered reaches w first.
		s.fwdIdle = false
		s.sink = nil
	}
	s.rmu.Unlock()
	if start {
		go s.forward()
	}
}

// forward runs Forward's copy until nothing is left to do, then leaves
// the stream to direct delivery and exits, or ends the copy.
func (s *Stream) forward() {
	f := s.fwd
	var err error
	for {
		s.rmu.Lock()
		f.total += s.sinkN
		s.sinkN = 0
		switch {
		case s.sinking:
			// Woken during a delivery (by a reset or Close): let it
			// finish, so bytes reach w in order and never after done.
			sig := s.rsig.wait()
			s.rmu.Unlock()
			<-sig
			continue
		case s.sinkErr != nil:
			err = s.sinkErr
		case s.closedR:
			err = net.ErrClosed
		case s.hasDataLocked():
			n, werr := s.writeOut(f.w)
			f.total += n
			if werr != nil {
				s.finishForward(f, werr)
				return
			}
			continue
		case s.rerr != nil:
			if s.rerr != io.EOF {
				err = s.rerr
			}
		case s.rdl().expired():
			err = os.ErrDeadlineExceeded
		default:
			s.fwdIdle = true
			s.sink = f.sink
			s.rmu.Unlock()
			return
		}
		s.rmu.Unlock()
		s.finishForward(f, err)
		return
	}
}

func (s *Stream) finishForward(f *forwarder, err error) {
	s.rmu.Lock()
	s.fwd = nil
	s.rmu.Unlock()
	s.readMu.Unlock()
	f.done.ForwardDone(f.total, err)
}
