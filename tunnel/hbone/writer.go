package hbone

import (
	"bytes"
	"fmt"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
)

// writeQueue is a connection's write side: frames queued in a batch, and
// which goroutine may write them to the socket. All of it is guarded by
// conn.mu. Any goroutine queues frames (the reader its acknowledgements
// and WINDOW_UPDATEs, streams their HEADERS and DATA); whoever takes a
// batch holds writing and writes it with conn.mu released: a stream
// writing its own DATA inline when the connection is idle (flushLocked),
// or else the writer goroutine (writeLoop). Frames stay in queue order
// because only the holder of writing writes; the socket, and the
// batchConn under TLS with its own wmu, are used only by that holder. The
// HPACK encoder's state must follow the order frames are queued in, so it
// too is used only under conn.mu.
type writeQueue struct {
	pending  []byte     // frames queued for the writer
	marks    []dataMark // the DATA in pending
	flying   []dataMark // the DATA in the batch being written
	spare    []byte     // the batch the writer last wrote, for reuse
	writing  bool       // a batch is being written; only its writer may write to nc
	leftover bool       // an inline write left bytes in bc for the writer goroutine
	wfr      *http2.Framer
	henc     *hpack.Encoder
	hbuf     bytes.Buffer
	blocked  []*Stream // writers waiting for connection window or batch room
}

// batchWriter lets the write Framer append frames to the pending batch.
// It is used with c.mu held.
type batchWriter struct{ c *conn }

func (w batchWriter) Write(p []byte) (int, error) {
	if w.c.pending == nil {
		w.c.pending = getBatch()
	}
	w.c.pending = append(w.c.pending, p...)
	return len(p), nil
}

func (c *conn) signalWriter() {
	select {
	case c.writeSig <- struct{}{}:
	default:
	}
}

// writeLoop hands queued frames to the TLS connection, a batch at a time,
// until the connection closes. Streams write their own frames while the
// connection is idle (flushLocked); this goroutine takes over when frames
// queue up behind a write in flight, when an inline write could not finish
// without blocking, and for frames queued by the reader (acknowledgements,
// WINDOW_UPDATEs), which must never wait for the socket.
func (c *conn) writeLoop() {
	defer func() {
		c.mu.Lock()
		linger := c.linger
		c.mu.Unlock()
		if linger {
			// teardown left the socket to us: see lingerClose.
			lingerClose(c.nc)
		}
		close(c.writeDone)
	}()
	for {
		c.mu.Lock()
		for !c.leftover && (len(c.pending) == 0 || c.writing) {
			if c.closed {
				c.mu.Unlock()
				return
			}
			if !c.writing {
				c.releaseBatchesLocked()
				if c.closing {
					err := c.closeErr
					c.mu.Unlock()
					c.teardown(err)
					return
				}
			}
			c.mu.Unlock()
			<-c.writeSig
			c.mu.Lock()
		}
		if c.closed {
			c.mu.Unlock()
			return
		}
		var err error
		if c.leftover {
			// An inline write stopped at a full socket: finish it, the
			// batch is still ours (c.writing).
			c.leftover = false
			c.mu.Unlock()
			err = c.bc.flush()
			c.mu.Lock()
			c.writing = false
			c.batchDoneLocked(err)
			c.mu.Unlock()
		} else {
			buf := c.takeBatchLocked()
			c.mu.Unlock()
			err = c.writeBatch(buf)
			c.mu.Lock()
			c.batchWrittenLocked(buf)
			c.batchDoneLocked(err)
			c.mu.Unlock()
		}
		if err != nil {
			c.teardown(fmt.Errorf("hbone: write: %w", err))
			return
		}
	}
}

// releaseBatchesLocked lets an idle connection hold no batch buffers.
func (c *conn) releaseBatchesLocked() {
	if c.pending != nil && len(c.pending) == 0 {
		putBatch(c.pending)
		c.pending = nil
		c.marks = keepSmall(c.marks)
	}
	if len(c.flying) == 0 {
		c.flying = keepSmall(c.flying)
	}
	if c.spare != nil {
		putBatch(c.spare)
		c.spare = nil
	}
}

// takeBatchLocked claims the queued frames for writing.
func (c *conn) takeBatchLocked() []byte {
	buf := c.pending
	c.pending, c.spare = c.spare, nil
	c.flying, c.marks = c.marks, c.flying[:0] // flying is settled: nothing was writing
	c.writing = true
	c.wakeBlockedLocked()
	return buf
}

// batchWrittenLocked ends the write of buf.
func (c *conn) batchWrittenLocked(buf []byte) {
	c.writing = false
	if c.spare == nil {
		c.spare = buf[:0]
	} else {
		putBatch(buf)
	}
}

// keepSmall empties marks for reuse when its array is small (a
// connection between requests writes a frame or two per batch, and
// would allocate the slice again for each), and lets a large one go.
func keepSmall(marks []dataMark) []dataMark {
	if cap(marks) > 8 {
		return nil
	}
	clear(marks[:cap(marks)]) // no stream kept alive by a stale mark
	return marks[:0]
}

// dataMark is one DATA frame's payload in a batch, so that bytes a stream
// accepted and the connection never wrote are known (Unsent).
type dataMark struct {
	s *Stream // nil once settled out of turn (a reset stream)
	n int64
}

// settleLocked ends m's time in a batch: written, or lost.
func (m *dataMark) settleLocked(lost bool) {
	if m.s == nil {
		return
	}
	m.s.inBatch -= m.n
	if lost {
		m.s.unsent += m.n
	}
	m.s = nil
}

// batchDoneLocked settles the DATA of the batch just written: handed to
// the socket, or lost with err (the connection is torn down then).
func (c *conn) batchDoneLocked(err error) {
	c.settleLocked(c.flying, err != nil)
	c.flying = c.flying[:0]
}

func (c *conn) settleLocked(marks []dataMark, lost bool) {
	for i := range marks {
		marks[i].settleLocked(lost)
	}
}

// dropStreamDataLocked counts the DATA of s still queued or being written
// as lost: the peer reset s, and discards what arrives for it.
func (c *conn) dropStreamDataLocked(s *Stream) {
	for _, marks := range [][]dataMark{c.marks, c.flying} {
		for i := range marks {
			if marks[i].s == s {
				marks[i].settleLocked(true)
			}
		}
	}
}

// writeBatch writes buf through TLS, collecting the records in one
// syscall when batchConn is under it.
func (c *conn) writeBatch(buf []byte) error {
	if c.bc != nil {
		c.bc.begin()
	}
	_, err := c.nc.Write(buf)
	if c.bc != nil {
		if ferr := c.bc.flush(); err == nil {
			err = ferr
		}
	}
	return err
}

// flushLocked is called by a stream after queueing frames, with c.mu held;
// it returns with c.mu released. If no batch is in flight it writes the
// queued frames on the caller's goroutine, sparing the hand-off to the
// writer goroutine and back that would otherwise cost every small
// request a wake-up on each side. The write never blocks on the socket:
// records the socket does not take at once are left to the writer
// goroutine (batchConn.tryFlush), so a stream's Write still returns once
// its frames are queued and a stalled peer is bounded by flow control and
// writeBatchSize as before. Frames stay in order because only the holder
// of c.writing writes, and batches are taken in queue order.
func (c *conn) flushLocked() error {
	if c.writing || len(c.pending) == 0 || len(c.pending) > inlineMax || c.closed || c.closing ||
		c.bc == nil || c.bc.raw == nil {
		c.mu.Unlock()
		c.signalWriter()
		return nil
	}
	buf := c.takeBatchLocked()
	c.mu.Unlock()

	c.bc.begin()
	_, err := c.nc.Write(buf)
	done := false
	if err == nil {
		done, err = c.bc.tryFlush()
	}

	c.mu.Lock()
	c.batchWrittenLocked(buf)
	if !done && err == nil {
		c.writing, c.leftover = true, true // the writer goroutine finishes it
	} else {
		c.batchDoneLocked(err)
	}
	more := len(c.pending) > 0 || c.closing || c.leftover
	if !more {
		// The connection may now sit idle: keep no batch buffers.
		c.releaseBatchesLocked()
	}
	c.mu.Unlock()
	if err != nil {
		err = fmt.Errorf("hbone: write: %w", err)
		c.teardown(err)
		return err
	}
	if more {
		c.signalWriter()
	}
	return nil
}

// wakeBlockedLocked wakes writers waiting for connection window or batch
// room; each re-checks its own condition.
func (c *conn) wakeBlockedLocked() {
	for i, s := range c.blocked {
		s.waiting = false
		s.wsig.notify()
		c.blocked[i] = nil
	}
	c.blocked = c.blocked[:0]
}

// controlRoomLocked reports whether another reply to the peer may be
// queued. A peer that makes us queue replies faster than it reads them is
// flooding us.
func (c *conn) controlRoomLocked() bool {
	return len(c.pending) < batchCapacity+maxControlBacklog
}

func (c *conn) controlFlood() error {
	c.stats.ControlFloods.Add(1)
	return connError{http2.ErrCodeEnhanceYourCalm, "peer does not read our replies"}
}

// writeHeadersLocked encodes fields and queues them as HEADERS plus
// CONTINUATION frames no larger than the peer accepts (RFC 9113 §4.3);
// the caller then writes them with flushLocked.
// The HPACK encoder's state must follow the order frames are written, so
// encoding and queueing happen under the same lock.
func (c *conn) writeHeadersLocked(id uint32, fields []hpack.HeaderField, endStream bool) {
	c.hbuf.Reset()
	for _, f := range fields {
		_ = c.henc.WriteField(f)
	}
	block := c.hbuf.Bytes()
	limit := int(c.peerMaxFrame)
	first := true
	for first || len(block) > 0 {
		frag := block[:min(len(block), limit)]
		block = block[len(frag):]
		if first {
			_ = c.wfr.WriteHeaders(http2.HeadersFrameParam{
				StreamID:      id,
				BlockFragment: frag,
				EndStream:     endStream,
				EndHeaders:    len(block) == 0,
			})
			first = false
		} else {
			_ = c.wfr.WriteContinuation(id, len(block) == 0, frag)
		}
	}
	if c.hbuf.Cap() > 64<<10 {
		c.hbuf = bytes.Buffer{}
	}
}

// appendDataLocked queues one DATA frame of s; the caller then writes it
// with flushLocked. The header is written by hand so the payload is
// copied once, straight into the batch.
func (c *conn) appendDataLocked(s *Stream, endStream bool, p []byte) {
	id := s.id
	var flags http2.Flags
	if endStream {
		flags = http2.FlagDataEndStream
	}
	if c.pending == nil {
		c.pending = getBatch()
	}
	n := len(p)
	if n > 0 {
		c.updatesEarned = min(c.updatesEarned+updatesPerData, maxEarned)
		c.marks = append(c.marks, dataMark{s: s, n: int64(n)})
		s.inBatch += int64(n)
	}
	c.pending = append(c.pending,
		byte(n>>16), byte(n>>8), byte(n), byte(http2.FrameData), byte(flags),
		byte(id>>24), byte(id>>16), byte(id>>8), byte(id))
	c.pending = append(c.pending, p...)
}
