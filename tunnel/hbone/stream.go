package hbone

import (
	"context"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/net/http2"
)

// Stream is one tunnelled connection: a CONNECT stream, on either side
// of an HBONE connection, used as a net.Conn. Pool.Connect returns the
// client's end, Responder.Accept the server's.
//
// CloseWrite sends END_STREAM, after which the peer reads io.EOF while
// this side can still read; Read returns io.EOF once the peer has done the
// same. Close after both directions ended is a clean close; otherwise it
// resets the stream with RST_STREAM(CANCEL), and the peer sees a
// *StreamError. A reset received from the peer drops unread data and
// fails Read and Write with a *StreamError.
//
// Lock contract. A Stream's state has two guards: streamState, its
// protocol state and send side, is the connection's (conn.mu), because
// frames and windows are shared with the other streams; recvState, its
// receive buffers (streamrecv.go), has rmu, taken after conn.mu and never
// before, so the reader fills them without holding conn.mu. readMu and
// writeMu only serialise callers: one Read, WriteTo or Forward, and one
// Write, ReadFrom or CloseWrite, at a time (DATA stays in order); they are
// taken before the others. The deadlines lock themselves (deadline.mu,
// taken last); closed and detached are atomic.
//
// Fields are ordered so that small ones share words: an idle tunnel keeps
// its Stream, and padding is memory per connection.
type Stream struct {
	c        *conn
	id       uint32
	closed   atomic.Bool
	detached atomic.Bool // server side: the stream outlives the handler (Detach)
	status   int32       // client: final response status; guarded by c.mu

	streamState // guarded by c.mu
	recvState   // guarded by rmu

	wsig signal // write side may proceed: window, batch room or state
	rsig signal // receive side changed

	readMu  sync.Mutex // one Read, WriteTo or Forward at a time
	writeMu sync.Mutex // one Write, ReadFrom or CloseWrite at a time: keeps DATA in order
	dls     atomic.Pointer[deadlines]

	// Server side: the handler's context, until the handler returned
	// (cancel is guarded by rmu).
	ctx    context.Context
	cancel context.CancelFunc
}

// streamState is a stream's protocol state (RFC 9113 §5.1) and send side,
// guarded by conn.mu.
type streamState struct {
	sendWin   int64 // the peer's window for this stream
	recvWin   int64 // what the peer may still send on this stream
	inMap     bool
	sendEnded bool // END_STREAM queued
	recvEnded bool // END_STREAM received
	reset     bool // RST_STREAM sent or received, or closed
	responded bool // server: response sent; client: final response received
	waiting   bool // in c.blocked
	released  bool // server side: Release ended the handler's part; the handler's goroutine only, not c.mu
	resetErr  error

	inBatch int64 // DATA payload queued or being written
	unsent  int64 // accepted, then never written or dropped by the peer's reset (Unsent)

	linger *time.Timer // CloseLinger's reset, until the stream leaves the connection
}

// Detach lets the Handler that accepted s return while the tunnel goes
// on, so that an idle tunnel need not keep the handler's goroutine (and
// its stack) waiting: the caller then owns s and must Close it. The
// handler's context is still cancelled when it returns. It reports false,
// and does nothing, for a client stream.
func Detach(s *Stream) bool {
	if !s.c.isServer {
		return false
	}
	s.detached.Store(true)
	return true
}

// Release is Detach, for a handler with nothing left to do but tunnel s
// on its own goroutine: the handler's part ends at once, as if it had
// returned — its context is cancelled and s no longer counts against the
// connection's limits on running handlers — and the goroutine is the
// caller's to keep (a relay's copy, say) rather than a new one's. When
// the handler does return, nothing more happens; a panic after Release
// is not the handler's and is not recovered. Release must be called on
// the handler's goroutine, after Accept. It reports false, and does
// nothing, for a client stream.
func Release(s *Stream) bool {
	sc, ok := s.c.side.(*serverConn)
	if !ok || s.released {
		return ok
	}
	s.detached.Store(true)
	s.released = true
	sc.handlerDone(s)
	return true
}

var _ net.Conn = (*Stream)(nil)

func (s *Stream) LocalAddr() net.Addr { return s.c.nc.LocalAddr() }

func (s *Stream) RemoteAddr() net.Addr { return s.c.nc.RemoteAddr() }

func (s *Stream) SetDeadline(t time.Time) error {
	_ = s.SetReadDeadline(t)
	return s.SetWriteDeadline(t)
}

func (s *Stream) SetReadDeadline(t time.Time) error {
	if d := s.deadlines(!t.IsZero()); d != nil {
		d.r.set(t)
		s.wakeRead()
	}
	return nil
}

func (s *Stream) SetWriteDeadline(t time.Time) error {
	if d := s.deadlines(!t.IsZero()); d != nil {
		d.w.set(t)
		s.wsig.notify()
	}
	return nil
}

// deadlines returns s's deadlines, made first when create is set; nil
// when none were ever set.
func (s *Stream) deadlines(create bool) *deadlines {
	if d := s.dls.Load(); d != nil || !create {
		return d
	}
	s.dls.CompareAndSwap(nil, new(deadlines))
	return s.dls.Load()
}

// rdl and wdl are s's read and write deadlines, nil when none was set.
func (s *Stream) rdl() *deadline {
	if d := s.dls.Load(); d != nil {
		return &d.r
	}
	return nil
}

func (s *Stream) wdl() *deadline {
	if d := s.dls.Load(); d != nil {
		return &d.w
	}
	return nil
}

// writeErrLocked is why the stream cannot send, or nil. c.mu is held.
func (s *Stream) writeErrLocked() error {
	switch {
	case s.closed.Load():
		return net.ErrClosed
	case s.c.closed:
		return s.c.err
	case s.c.closing && s.c.closeErr != ErrConnClosed:
		return s.c.closeErr // a connection error: only the GOAWAY goes out now
	case s.reset:
		return s.resetErr
	case s.sendEnded:
		return ErrWriteAfterCloseWrite
	case s.wdl().expired():
		return os.ErrDeadlineExceeded
	}
	return nil
}

func (s *Stream) CloseWrite() error {
	s.writeMu.Lock()
	defer s.writeMu.Unlock()
	c := s.c
	c.mu.Lock()
	if s.sendEnded && !s.reset && !c.closed {
		c.mu.Unlock()
		return nil
	}
	if err := s.writeErrLocked(); err != nil && err != os.ErrDeadlineExceeded {
		c.mu.Unlock()
		return err
	}
	c.appendDataLocked(s, true, nil)
	s.sendEnded = true
	if s.recvEnded {
		c.removeLocked(s)
	}
	// The END_STREAM is queued: a failed write tears the connection
	// down, which the stream's reads will report.
	_ = c.flushLocked()
	return nil
}

func (s *Stream) Close() error {
	if !s.closed.CompareAndSwap(false, true) {
		return net.ErrClosed
	}
	c := s.c
	c.mu.Lock()
	if s.inMap {
		if !(s.sendEnded && s.recvEnded) && !c.closed {
			// RFC 9113 §8.5: closing a tunnel before both sides finished
			// is an abort, reported to the peer as CANCEL.
			_ = c.wfr.WriteRSTStream(s.id, http2.ErrCodeCancel)
			c.signalWriter()
		}
		s.reset = true
		s.resetErr = net.ErrClosed
		c.removeLocked(s)
	}
	c.mu.Unlock()
	s.wsig.notify()

	s.rmu.Lock()
	s.closedR = true
	dropped := s.dropLocked()
	s.rmu.Unlock()
	s.wakeRead()
	c.creditConn(dropped)
	if d := s.deadlines(false); d != nil {
		d.r.set(time.Time{})
		d.w.set(time.Time{})
	}
	return nil
}

// CloseLinger closes s without cutting off what it sent. Close before the
// peer ended its side resets the stream (RST_STREAM CANCEL, RFC 9113
// §8.5), and a peer that sees the reset may drop what it has not passed
// on yet: the last response, often a local reply saying why the
// connection ends (a relay tearing both sides down on the reset). HTTP
// servers linger on close for the same reason (net/http's
// closeWriteAndWait). CloseLinger sends END_STREAM instead (CloseWrite)
// and returns at once: what the peer still sends is discarded, and s
// closes cleanly once the peer ended its side too, or is reset when
// timeout passes first. A server handler may return right after (s is
// detached). No goroutine waits meanwhile.
func (s *Stream) CloseLinger(timeout time.Duration) error {
	if err := s.CloseWrite(); err != nil {
		s.Close()
		return err
	}
	Detach(s)
	s.rmu.Lock()
	s.closedR = true // reads fail, received data is dropped
	dropped := s.dropLocked()
	s.rmu.Unlock()
	s.wakeRead()
	s.c.creditConn(dropped)
	c := s.c
	c.mu.Lock()
	if s.inMap && s.linger == nil {
		s.linger = time.AfterFunc(timeout, func() { s.Close() })
		c.mu.Unlock()
		return nil
	}
	c.mu.Unlock()
	return s.Close() // both sides ended already: a clean close
}

// stopLingerLocked ends CloseLinger's wait once s left the connection
// (both sides ended, reset, or the connection's end): nothing is left to
// reset, and nothing to read. c.mu is held.
func (s *Stream) stopLingerLocked() {
	if s.linger == nil {
		return
	}
	s.linger.Stop()
	s.linger = nil
	s.closed.Store(true)
}

// abort ends the stream with err unless the peer had already finished
// sending, in which case what it sent stays readable. It takes only
// s.rmu, so callers may hold c.mu. It returns the unread bytes dropped,
// which the caller returns to the connection window.
func (s *Stream) abort(err error) int64 {
	var dropped int64
	s.rmu.Lock()
	if s.rerr == nil {
		s.rerr = err
		dropped = s.dropLocked()
	}
	if s.resp != nil && !s.respDone {
		s.respDone = true
		s.respErr = err
		close(s.resp)
	}
	cancel := s.cancel // cleared by handlerDone, under rmu
	s.rmu.Unlock()
	s.wakeRead()
	s.wsig.notify()
	if cancel != nil {
		cancel()
	}
	return dropped
}

// deliverResponse wakes the Connect waiting for this stream's response.
func (s *Stream) deliverResponse(err error) {
	s.rmu.Lock()
	if !s.respDone {
		s.respDone = true
		s.respErr = err
		close(s.resp)
	}
	s.rmu.Unlock()
}

// Unsent reports how many of the bytes s's Write and ReadFrom accepted
// never reached the peer's side of the connection: those the connection
// was torn down before writing, and those queued when the peer reset the
// stream, which it discards. Accepted bytes minus Unsent are what the
// stream wrote to the peer. The count is final once the stream was reset
// by the peer or its connection ended; a stream that ended cleanly may
// still have bytes in flight then, which are not counted.
func Unsent(s *Stream) int64 {
	s.c.mu.Lock()
	defer s.c.mu.Unlock()
	return s.unsent
}
