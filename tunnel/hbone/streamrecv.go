package hbone

import (
	"io"
	"net"
	"os"
	"sync"

	"github.com/amber-mesh/amber/tunnel/nonblock"
)

// recvState is a stream's receive side, guarded by Stream.rmu: the data
// the connection's reader buffered for it, or delivers straight to its
// consumer's socket, and how the stream ended.
type recvState struct {
	rmu      sync.Mutex // guards the fields below; taken after conn.mu, never before
	rbuf     []*chunk   // unread data; every chunk but the last holds some
	rerr     error      // returned once rbuf is empty: io.EOF or why the stream died
	filling  bool       // the reader goroutine is reading into the last chunk
	draining bool       // WriteTo is writing out the first chunk
	closedR  bool       // Close was called: data is dropped
	sinking  bool       // the reader goroutine is writing to sink
	respDone bool       // client: resp is closed
	fwdIdle  bool       // no forward goroutine runs: the next wakeRead starts one
	// Direct delivery (see deliver): while WriteTo waits with nothing
	// buffered, the reader goroutine writes DATA straight to its socket.
	sink    nonblock.RawConn // WriteTo's destination while it waits; nil otherwise
	sinkN   int64            // bytes delivered directly, not yet counted by WriteTo
	sinkErr error            // a direct write failed: WriteTo returns it
	unacked int64            // bytes read but not yet returned with WINDOW_UPDATE
	resp    chan struct{}    // client: closed when the response arrived or never will
	respErr error
	fwd     *forwarder // set while Forward runs
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
		case s.rdl().expired():
			return os.ErrDeadlineExceeded
		}
		sig, dl := s.rsig.wait(), s.rdl().wait()
		s.rmu.Unlock()
		select {
		case <-sig:
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
			sig := s.rsig.wait()
			s.rmu.Unlock()
			<-sig
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
