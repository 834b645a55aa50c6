package hbone

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"runtime/debug"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/net/http2"

	"github.com/amber-mesh/amber/internal/logkey"
	"github.com/amber-mesh/amber/tunnel/nonblock"
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
type Stream struct {
	c  *conn
	id uint32

	// Guarded by c.mu.
	sendWin   int64 // the peer's window for this stream
	recvWin   int64 // what the peer may still send on this stream
	inMap     bool
	sendEnded bool // END_STREAM queued
	recvEnded bool // END_STREAM received
	reset     bool // RST_STREAM sent or received, or closed
	resetErr  error
	responded bool // server: response sent; client: final response received
	waiting   bool // in c.blocked
	status    int  // client: final response status

	inBatch int64 // DATA payload queued or being written; guarded by c.mu
	unsent  int64 // accepted, then never written or dropped by the peer's reset (Unsent); guarded by c.mu

	wsig chan struct{} // write side may proceed: window, batch room or state
	rsig chan struct{} // receive side changed

	rmu      sync.Mutex // guards the receive side below; taken after c.mu, never before
	rbuf     []*chunk   // unread data; every chunk but the last holds some
	rerr     error      // returned once rbuf is empty: io.EOF or why the stream died
	filling  bool       // the reader goroutine is reading into the last chunk
	draining bool       // WriteTo is writing out the first chunk
	closedR  bool       // Close was called: data is dropped
	// Direct delivery (see deliver): while WriteTo waits with nothing
	// buffered, the reader goroutine writes DATA straight to its socket.
	sink     nonblock.RawConn // WriteTo's destination while it waits; nil otherwise
	sinking  bool             // the reader goroutine is writing to sink
	sinkN    int64            // bytes delivered directly, not yet counted by WriteTo
	sinkErr  error            // a direct write failed: WriteTo returns it
	unacked  int64            // bytes read but not yet returned with WINDOW_UPDATE
	resp     chan struct{}
	respErr  error
	respDone bool
	fwd      *forwarder // set while Forward runs
	fwdIdle  bool       // no forward goroutine runs: the next wakeRead starts one

	readMu  sync.Mutex // one Read or WriteTo at a time
	writeMu sync.Mutex // one Write, ReadFrom or CloseWrite at a time: keeps DATA in order
	rdl     deadline
	wdl     deadline
	closed  atomic.Bool

	// Server side: the handler's context, and whether the stream outlives
	// the handler (Detach).
	ctx      context.Context
	cancel   context.CancelFunc
	detached atomic.Bool
}

// Detach lets the Handler that accepted s return while the tunnel goes
// on, so that an idle tunnel need not keep the handler's goroutine (and
// its stack) waiting: the caller then owns s and must Close it. The
// handler's context is still cancelled when it returns. It reports false,
// and does nothing, for a client stream.
func Detach(s *Stream) bool {
	if s.cancel == nil {
		return false
	}
	s.detached.Store(true)
	return true
}

var _ net.Conn = (*Stream)(nil)

func (s *Stream) LocalAddr() net.Addr  { return s.c.nc.LocalAddr() }
func (s *Stream) RemoteAddr() net.Addr { return s.c.nc.RemoteAddr() }

func (s *Stream) SetDeadline(t time.Time) error {
	_ = s.SetReadDeadline(t)
	return s.SetWriteDeadline(t)
}

func (s *Stream) SetReadDeadline(t time.Time) error {
	s.rdl.set(t)
	s.wakeRead()
	return nil
}

func (s *Stream) SetWriteDeadline(t time.Time) error {
	s.wdl.set(t)
	notify(s.wsig)
	return nil
}

// hasDataLocked: chunks other than the last are never empty.
func (s *Stream) hasDataLocked() bool {
	return len(s.rbuf) > 1 || len(s.rbuf) == 1 && s.rbuf[0].r < s.rbuf[0].w
}

// waitDataLocked waits until there is data to read or a reason there
// never will be.
func (s *Stream) waitDataLocked() error {
	for {
		switch {
		case s.closedR:
			return net.ErrClosed
		case s.hasDataLocked():
			return nil
		case s.sinkErr != nil:
			return s.sinkErr
		case s.rerr != nil:
			return s.rerr
		case s.rdl.expired():
			return os.ErrDeadlineExceeded
		}
		dl := s.rdl.wait()
		s.rmu.Unlock()
		select {
		case <-s.rsig:
		case <-dl:
		}
		s.rmu.Lock()
	}
}

// popLocked releases the first chunk.
func (s *Stream) popLocked() {
	putChunk(s.rbuf[0])
	n := copy(s.rbuf, s.rbuf[1:])
	s.rbuf[n] = nil
	s.rbuf = s.rbuf[:n]
	if n == 0 {
		s.rbuf = nil
	}
}

func (s *Stream) Read(p []byte) (int, error) {
	if len(p) == 0 {
		return 0, nil
	}
	s.readMu.Lock()
	defer s.readMu.Unlock()
	s.rmu.Lock()
	if err := s.waitDataLocked(); err != nil {
		s.rmu.Unlock()
		return 0, err
	}
	n := 0
	for n < len(p) && len(s.rbuf) > 0 {
		ch := s.rbuf[0]
		k := copy(p[n:], ch.b[ch.r:ch.w])
		ch.r += k
		n += k
		if ch.r < ch.w || len(s.rbuf) == 1 && s.filling {
			break
		}
		s.popLocked()
	}
	inc := s.consumedLocked(int64(n))
	s.rmu.Unlock()
	s.c.creditConn(int64(n))
	s.sendWindowUpdate(inc)
	return n, nil
}

// WriteTo writes received data straight from the receive buffers to w,
// so io.Copy(dst, stream) copies each byte once. When w is a socket, data
// that arrives while WriteTo waits is written by the connection's reader
// itself (see deliver), without waking WriteTo.
func (s *Stream) WriteTo(w io.Writer) (int64, error) {
	s.readMu.Lock()
	defer s.readMu.Unlock()
	sink := nonblock.Raw(w)
	var total int64
	for {
		s.rmu.Lock()
		s.sink = sink
		err := s.waitDataLocked()
		s.sink = nil
		for s.sinking {
			// Only an error can end the wait during a delivery, which
			// starts with nothing buffered. Let it finish: bytes reach w
			// in order, and never after WriteTo returned.
			s.rmu.Unlock()
			<-s.rsig
			s.rmu.Lock()
		}
		total += s.sinkN
		s.sinkN = 0
		if s.sinkErr != nil {
			err = s.sinkErr
		}
		if err != nil {
			s.rmu.Unlock()
			if err == io.EOF {
				err = nil
			}
			return total, err
		}
		n, werr := s.writeOut(w)
		total += n
		if werr != nil {
			return total, werr
		}
	}
}

// writeOut writes the first buffered chunk to w and returns the window it
// frees to the peer. It is called with s.rmu held and releases it.
func (s *Stream) writeOut(w io.Writer) (int64, error) {
	ch := s.rbuf[0]
	data := ch.b[ch.r:ch.w]
	s.draining = true
	s.rmu.Unlock()

	n, werr := w.Write(data)

	s.rmu.Lock()
	s.draining = false
	if s.closedR || len(s.rbuf) == 0 || s.rbuf[0] != ch {
		// Dropped by Close or a reset while we wrote it.
		s.rmu.Unlock()
		if werr == nil {
			werr = net.ErrClosed
		}
		return int64(n), werr
	}
	ch.r += n
	if ch.r == ch.w && !(len(s.rbuf) == 1 && s.filling) {
		s.popLocked()
	}
	inc := s.consumedLocked(int64(n))
	s.rmu.Unlock()
	s.c.creditConn(int64(n))
	s.sendWindowUpdate(inc)
	return int64(n), werr
}

// consumedLocked counts n bytes read by the application and returns the
// stream window increment to send, once a quarter of the window is due.
func (s *Stream) consumedLocked(n int64) int64 {
	s.unacked += n
	if s.unacked < int64(s.c.cfg.StreamWindow/4) {
		return 0
	}
	inc := s.unacked
	s.unacked = 0
	return inc
}

// credit returns padding, which is never read, to the stream window.
func (s *Stream) credit(n int64) {
	s.rmu.Lock()
	inc := s.consumedLocked(n)
	s.rmu.Unlock()
	s.sendWindowUpdate(inc)
}

func (s *Stream) sendWindowUpdate(inc int64) {
	if inc <= 0 {
		return
	}
	c := s.c
	c.mu.Lock()
	// A stream the peer has finished sending on needs no more window.
	if s.inMap && !s.recvEnded && !c.closed {
		s.recvWin += inc
		_ = c.wfr.WriteWindowUpdate(s.id, uint32(inc))
		c.signalWriter()
	}
	c.mu.Unlock()
}

// receive reads n bytes of DATA payload from r into the receive buffer.
// It runs on the reader goroutine.
func (s *Stream) receive(r io.Reader, n int) error {
	for n > 0 {
		s.rmu.Lock()
		if s.sink != nil && !s.hasDataLocked() && !s.closedR && s.rerr == nil && s.sinkErr == nil {
			k, err := s.deliver(r, n)
			if err != nil {
				return err
			}
			n -= k
			continue
		}
		if s.closedR || s.rerr != nil && s.rerr != io.EOF {
			s.rmu.Unlock()
			if _, err := io.CopyN(io.Discard, r, int64(n)); err != nil {
				return err
			}
			s.c.creditConn(int64(n))
			return nil
		}
		var ch *chunk
		if k := len(s.rbuf); k > 0 && s.rbuf[k-1].w < len(s.rbuf[k-1].b) {
			ch = s.rbuf[k-1]
		} else {
			ch = getChunk(n)
			s.rbuf = append(s.rbuf, ch)
		}
		s.filling = true
		buf := ch.b[ch.w:min(len(ch.b), ch.w+n)]
		s.rmu.Unlock()

		k, err := r.Read(buf)

		s.rmu.Lock()
		s.filling = false
		dropped := s.closedR || s.rerr != nil && s.rerr != io.EOF
		if !dropped {
			ch.w += k
		}
		s.rmu.Unlock()
		if dropped {
			s.c.creditConn(int64(k))
		} else if k > 0 {
			s.wakeRead()
		}
		n -= k
		if err != nil {
			if err == io.EOF {
				err = io.ErrUnexpectedEOF
			}
			return err
		}
	}
	return nil
}

// deliver reads up to n bytes of DATA payload from r and writes them
// to the socket WriteTo is waiting to write to, on the reader goroutine:
// a request then reaches the application without the hand-off to the
// WriteTo goroutine. It is called with s.rmu held, releases it, and
// returns the payload bytes consumed from r.
//
// The reader serves every stream of the connection, so it must never wait
// for one stream's consumer (head-of-line blocking): the socket write does
// not block, and what the socket does not take is buffered for WriteTo
// exactly as if it had not been offered. A slow consumer then costs the
// reader one failed write per frame until WriteTo has drained the buffer,
// and the stream window bounds what it can buffer, as before.
func (s *Stream) deliver(r io.Reader, n int) (int, error) {
	sink := s.sink
	s.sinking = true
	s.rmu.Unlock()

	ch := getChunk(n)
	k, err := io.ReadFull(r, ch.b[:min(n, len(ch.b))])
	ch.w = k
	var werr error
	for ch.r < ch.w {
		m, err := nonblock.Write(sink, ch.b[ch.r:ch.w])
		if err != nil {
			werr = err
			break
		}
		if m == 0 {
			break
		}
		ch.r += m
	}

	s.rmu.Lock()
	s.sinking = false
	written := int64(ch.r)
	s.sinkN += written
	inc := s.consumedLocked(written)
	switch {
	case werr != nil:
		// WriteTo returns the error; what was not written is dropped
		// and returned to the connection window below.
		s.sinkErr = werr
		putChunk(ch)
	case s.closedR || s.rerr != nil && s.rerr != io.EOF:
		putChunk(ch) // closed or reset meanwhile: the rest is dropped
	case ch.r < ch.w:
		s.rbuf = append(s.rbuf, ch)
		ch = nil
	default:
		putChunk(ch)
	}
	dropped := int64(k) - written
	if ch == nil {
		dropped = 0 // buffered: credited once read
	}
	// Wake WriteTo only if it has something to do: buffered data, an
	// error, or a wait for this delivery to end (it stopped offering).
	wake := ch == nil || werr != nil || s.sink == nil
	s.rmu.Unlock()
	if wake {
		s.wakeRead()
	}
	s.c.creditConn(written + dropped)
	s.sendWindowUpdate(inc)
	if err != nil {
		if err == io.EOF {
			err = io.ErrUnexpectedEOF
		}
		return k, err
	}
	return k, nil
}

// dropLocked releases all buffered data and returns how many unread bytes
// it held. Chunks another goroutine is using are left to the collector.
func (s *Stream) dropLocked() int64 {
	var unread int64
	for i, ch := range s.rbuf {
		unread += int64(ch.w - ch.r)
		borrowed := i == 0 && s.draining || i == len(s.rbuf)-1 && s.filling
		if !borrowed {
			putChunk(ch)
		}
	}
	s.rbuf = nil
	return unread
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
	s.rmu.Unlock()
	s.wakeRead()
	notify(s.wsig)
	if s.cancel != nil {
		s.cancel()
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
	case s.wdl.expired():
		return os.ErrDeadlineExceeded
	}
	return nil
}

// awaitSendLocked waits until the stream may send a DATA frame and takes
// flow-control window for up to want bytes (RFC 9113 §6.9). c.mu is held
// on entry and on return.
func (s *Stream) awaitSendLocked(want int) (int, error) {
	c := s.c
	for {
		if err := s.writeErrLocked(); err != nil {
			return 0, err
		}
		room := len(c.pending) < writeBatchSize
		if s.sendWin > 0 && c.sendWin > 0 && room {
			k := min(int64(want), s.sendWin, c.sendWin, int64(c.peerMaxFrame), maxDataFrame)
			s.sendWin -= k
			c.sendWin -= k
			return int(k), nil
		}
		if (c.sendWin <= 0 || !room) && !s.waiting {
			s.waiting = true
			c.blocked = append(c.blocked, s)
		}
		dl := s.wdl.wait()
		c.mu.Unlock()
		select {
		case <-s.wsig:
		case <-dl:
		}
		c.mu.Lock()
	}
}

func (s *Stream) Write(p []byte) (int, error) {
	s.writeMu.Lock()
	defer s.writeMu.Unlock()
	return s.write(p)
}

func (s *Stream) write(p []byte) (int, error) {
	c := s.c
	n := 0
	for len(p) > 0 {
		c.mu.Lock()
		k, err := s.awaitSendLocked(len(p))
		if err != nil {
			c.mu.Unlock()
			return n, err
		}
		c.appendDataLocked(s, false, p[:k])
		if err := c.flushLocked(); err != nil {
			return n, err
		}
		n += k
		p = p[k:]
	}
	return n, nil
}

// ReadFrom sends what r yields until io.EOF (it does not CloseWrite) and
// returns the bytes it sent; bytes read from r that could not be sent are
// not counted. Its
// read buffer starts small and grows only while reads fill it, and while
// reads are small it waits for a socket to become readable before taking
// a buffer, so a tunnel that mostly waits holds none.
func (s *Stream) ReadFrom(r io.Reader) (int64, error) {
	s.writeMu.Lock()
	defer s.writeMu.Unlock()
	var total int64
	class := 0
	readable := readableFunc(r)
	for {
		if class == 0 && readable != nil {
			readable()
		}
		ch := getChunk(chunkSizes[class])
		n, err := r.Read(ch.b)
		if n > 0 {
			// Count what was sent, not what was read: a write cut off
			// by a reset or the connection's end sent less.
			w, werr := s.write(ch.b[:n])
			putChunk(ch)
			total += int64(w)
			if werr != nil {
				return total, werr
			}
			if n == len(ch.b) && class < len(chunkSizes)-1 {
				class++
			} else if n < len(ch.b)/8 && class > 0 {
				class--
			}
		} else {
			putChunk(ch)
		}
		if err == io.EOF {
			return total, nil
		}
		if err != nil {
			return total, err
		}
	}
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
	notify(s.wsig)

	s.rmu.Lock()
	s.closedR = true
	dropped := s.dropLocked()
	s.rmu.Unlock()
	s.wakeRead()
	c.creditConn(dropped)
	s.rdl.set(time.Time{})
	s.wdl.set(time.Time{})
	return nil
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

// Responder answers a CONNECT request; use exactly one of its methods.
type Responder interface {
	// Accept answers 200 and returns the tunnel. Call it only once the
	// upstream connection is established: a 200 tells the client its
	// destination accepted the connection.
	Accept() (*Stream, error)
	// Reject answers status (300-599) and ends the stream. The reason is
	// logged, not sent.
	Reject(status int, reason string) error
}

type responder struct{ s *Stream }

func (r responder) Accept() (*Stream, error) {
	if err := r.s.respond(http.StatusOK); err != nil {
		return nil, err
	}
	return r.s, nil
}

func (r responder) Reject(status int, reason string) error {
	if status < 300 || status > 599 {
		return fmt.Errorf("hbone: reject with status %d: not a failure status", status)
	}
	r.s.c.log.Debug("hbone: rejecting CONNECT", logkey.Stream, r.s.id, logkey.Status, status, logkey.Reason, reason)
	return r.s.respond(status)
}

// respond sends the response HEADERS; any status but 200 also ends the
// stream.
func (s *Stream) respond(status int) error {
	c := s.c
	c.mu.Lock()
	var err error
	switch {
	case s.responded:
		err = ErrAlreadyResponded
	case c.closed:
		err = c.err
	case c.closing:
		err = c.closeErr
	case s.reset:
		err = s.resetErr
	}
	if err != nil {
		c.mu.Unlock()
		return err
	}
	s.responded = true
	ok := status == http.StatusOK
	c.writeHeadersLocked(s.id, statusFields(status), !ok)
	if ok {
		c.stats.StreamsOpened.Add(1)
	} else {
		c.stats.StreamsRejected.Add(1)
		s.sendEnded = true
		if !s.recvEnded {
			// RFC 9113 §8.1: the response is complete; stop the request body.
			_ = c.wfr.WriteRSTStream(s.id, http2.ErrCodeNo)
			s.reset = true
			s.resetErr = &StreamError{Code: http2.ErrCodeNo}
		}
		c.removeLocked(s)
	}
	return c.flushLocked()
}

// serveStream runs the Handler for one CONNECT.
func (c *conn) serveStream(s *Stream, req *Request) {
	defer c.handlerDone(s)
	defer func() {
		if r := recover(); r != nil {
			// Fail closed: the stream is reset or closed by handlerDone.
			s.detached.Store(false)
			c.log.Error("hbone: handler panic", logkey.Panic, r, logkey.Stack, string(debug.Stack()))
		}
	}()
	c.server.Handler.ServeHBONE(s.ctx, req, responder{s})
}

// handlerDone ends the stream of a returned handler: a handler that never
// answered gets its stream reset, an accepted stream is closed unless it
// was detached.
func (c *conn) handlerDone(s *Stream) {
	c.mu.Lock()
	if !s.responded && s.inMap {
		_ = c.resetLocked(s, http2.ErrCodeInternal)
	}
	c.mu.Unlock()
	if !s.detached.Load() {
		_ = s.Close()
	}
	s.cancel()
	c.mu.Lock()
	c.handlers--
	c.slotFreedLocked()
	c.mu.Unlock()
}
