package hbone

import (
	"crypto/tls"
	"net"
	"sync"

	"github.com/amber-mesh/amber/tunnel/nonblock"
)

// batchConn sits under a tls.Conn. crypto/tls writes every record (at
// most 16 KiB) with its own write call and reads about one record per
// read call; on a busy tunnel that is a syscall per 16 KiB each way.
// batchConn collects the records of one batch and writes them with one
// call, and reads ahead in large pieces. Both buffers exist only while in
// use, so idle connections hold none.
type batchConn struct {
	net.Conn

	wmu       sync.Mutex // guards the write side
	buffering bool
	wbuf      []byte
	woff      int              // wbuf[:woff] is written
	raw       nonblock.RawConn // the socket's, for nonblock's calls; nil if not a socket

	// The read side is used only under the tls.Conn's read lock.
	rbuf  *chunk
	ahead bool // the last read found more data than it asked for
}

// readAhead is the smallest read that goes to the socket directly.
const readAhead = 64 << 10

// TLSClient is tls.Client with the syscall batching the Server uses on its
// own connections: a Pool.Dial that builds its TLS connection with it gets
// the same throughput on the client side. A plain tls.Client works too.
func TLSClient(nc net.Conn, cfg *tls.Config) *tls.Conn {
	return tls.Client(newBatchConn(nc), cfg)
}

func newBatchConn(nc net.Conn) *batchConn {
	return &batchConn{Conn: nc, raw: nonblock.Raw(nc)}
}

// batcher returns the batchConn under nc, if any.
func batcher(nc net.Conn) *batchConn {
	if tc, ok := nc.(*tls.Conn); ok {
		if bc, ok := tc.NetConn().(*batchConn); ok {
			return bc
		}
	}
	return nil
}

// begin starts collecting writes.
func (bc *batchConn) begin() {
	bc.wmu.Lock()
	bc.buffering = true
	bc.wmu.Unlock()
}

// flush writes what was collected since begin, in one call.
func (bc *batchConn) flush() error {
	bc.wmu.Lock()
	defer bc.wmu.Unlock()
	bc.buffering = false
	if len(bc.wbuf) == bc.woff {
		bc.releaseLocked()
		return nil
	}
	_, err := bc.connWrite(bc.wbuf[bc.woff:])
	bc.releaseLocked()
	return err
}

// connWrite and connRead are the socket's Write and Read, made without
// the runtime's syscall entry when it is a socket (see package nonblock: on a
// connection between requests, the entry wakes the scheduler's monitor
// thread, a context switch or more per request in each ztunnel).
func (bc *batchConn) connWrite(p []byte) (int, error) {
	if bc.raw != nil {
		return nonblock.WriteAll(bc.raw, p)
	}
	return bc.Conn.Write(p)
}

func (bc *batchConn) connRead(p []byte) (int, error) {
	if bc.raw != nil {
		return nonblock.ReadWait(bc.raw, p)
	}
	return bc.Conn.Read(p)
}

// tryFlush writes what was collected since begin as far as the socket
// takes it without blocking. When it reports !done the rest stays
// collected, and still collecting, for flush.
func (bc *batchConn) tryFlush() (done bool, err error) {
	bc.wmu.Lock()
	defer bc.wmu.Unlock()
	for bc.woff < len(bc.wbuf) {
		n, err := nonblock.Write(bc.raw, bc.wbuf[bc.woff:])
		if err != nil {
			return false, err
		}
		if n == 0 {
			return false, nil // the socket is full: the writer goroutine waits for it
		}
		bc.woff += n
	}
	bc.buffering = false
	bc.releaseLocked()
	return true, nil
}

func (bc *batchConn) releaseLocked() {
	if bc.wbuf != nil {
		putBatch(bc.wbuf)
	}
	bc.wbuf, bc.woff = nil, 0
}

func (bc *batchConn) Write(p []byte) (int, error) {
	bc.wmu.Lock()
	defer bc.wmu.Unlock()
	if !bc.buffering {
		return bc.connWrite(p)
	}
	if len(bc.wbuf)+len(p) > batchCapacity && len(bc.wbuf) > bc.woff {
		_, err := bc.connWrite(bc.wbuf[bc.woff:])
		bc.wbuf, bc.woff = bc.wbuf[:0], 0
		if err != nil {
			return 0, err
		}
	}
	if bc.wbuf == nil {
		bc.wbuf = getBatch()
	}
	bc.wbuf = append(bc.wbuf, p...)
	return len(p), nil
}

// Read reads ahead in large pieces only while data keeps coming: an idle
// connection blocks reading into the caller's buffer, or waits for input
// before taking one, and holds nothing of its own.
func (bc *batchConn) Read(p []byte) (int, error) {
	if bc.rbuf == nil {
		if !bc.ahead || len(p) >= readAhead {
			n, err := bc.connRead(p)
			bc.ahead = n == len(p)
			return n, err
		}
		if bc.raw != nil {
			// Wait for input holding no buffer: an idle connection
			// spends its life here. Errors are the read's to report.
			_ = nonblock.WaitReadable(bc.raw)
		}
		bc.rbuf = getChunk(readAhead)
		n, err := bc.connRead(bc.rbuf.b)
		bc.rbuf.w = n
		bc.ahead = n >= readAhead
		if n == 0 {
			putChunk(bc.rbuf)
			bc.rbuf = nil
			return 0, err
		}
		// An error with data is returned by the next read.
	}
	n := copy(p, bc.rbuf.b[bc.rbuf.r:bc.rbuf.w])
	bc.rbuf.r += n
	if bc.rbuf.r == bc.rbuf.w {
		putChunk(bc.rbuf)
		bc.rbuf = nil
	}
	return n, nil
}

// CloseWrite shuts down the TCP write side, for lingerClose.
func (bc *batchConn) CloseWrite() error {
	if cw, ok := bc.Conn.(interface{ CloseWrite() error }); ok {
		return cw.CloseWrite()
	}
	return nil
}
