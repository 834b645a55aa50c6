package hbone

import (
	"bufio"
	"crypto/tls"
	"io"
	"log/slog"
	"net"
	"sync"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
)

const (
	maxStreamID = 1<<31 - 1
	// closeFlushTimeout bounds how long a closing connection waits to
	// flush its GOAWAY to a peer that does not read.
	closeFlushTimeout = time.Second
)

var clientPreface = []byte(http2.ClientPreface)

// conn is one HTTP/2 connection: the engine both ends share. A clientConn
// (clientconn.go) or a serverConn (serverconn.go) embeds it and supplies,
// as its side, what differs between them. A reader goroutine parses
// frames (read.go); frames every other goroutine queues are written by
// whoever finds the connection idle (writer.go). The reader never waits
// for a write, so two peers blocked writing to each other still read each
// other's WINDOW_UPDATEs.
//
// Lock contract. mu guards the fields after it, including those of the
// embedded writeQueue (writer.go), connFlow (flow.go) and keepaliveState
// (keepalive.go); each of those types says what its fields are. The
// reader goroutine owns the frame parser, the HPACK decoder and the
// frameBudgets (abuse.go) and takes no lock for them. A Stream has its
// own locks (stream.go). The order is Pool.mu, then conn.mu, then
// Stream.rmu; deadline.mu and batchConn.wmu are taken last or alone, and
// Server.mu never together with any of them. No goroutine waits for the
// network holding mu: batches are written with it released (flushLocked).
type conn struct {
	nc       net.Conn
	bc       *batchConn // under nc's TLS, if there
	br       io.Reader
	fr       *http2.Framer // reads; owned by the reader goroutine
	cfg      Settings      // resolved
	stats    *Stats
	log      *slog.Logger
	side     side // the *clientConn or *serverConn embedding this conn
	isServer bool // side is a *serverConn

	writeSig  chan struct{} // wakes the writer; capacity 1
	readDone  chan struct{} // closed when the reader returns
	writeDone chan struct{} // closed when the writer returns
	torn      chan struct{} // closed by teardown

	// Owned by the reader goroutine.
	hdec *hpack.Decoder
	hb   headerBlock
	frameBudgets
	sawSettings bool

	mu sync.Mutex // guards the fields below and those of the embedded types
	writeQueue
	connFlow
	keepaliveState
	streams   map[uint32]*Stream
	nextID    uint32 // next stream id this side opens (only clients open streams: odd ids)
	maxPeerID uint32 // highest stream id the peer opened

	peerInitWin       int64
	peerMaxFrame      uint32
	peerMaxStreams    uint32
	peerMaxHeaderList uint32

	goAwaySent bool // no new streams are accepted
	goAwayRecv bool // no new streams may be opened
	closing    bool // final GOAWAY queued; the writer tears down after flushing
	linger     bool // closing after a connection error: drain input before closing
	closeErr   error
	closed     bool
	err        error
}

// side is what differs between the two ends of a connection (RFC 9113
// §8.1: requests travel one way, responses the other). The *clientConn or
// *serverConn embedding a conn implements it. Methods ending in Locked are
// called with conn.mu held, the others without; readPreface, prefaceDone,
// onHeaderBlock and peerGoAway run on the reader goroutine.
type side interface {
	// writePrefaceLocked queues this side's connection preface and
	// SETTINGS (RFC 9113 §3.4).
	writePrefaceLocked()
	// readPreface reads what precedes the peer's first frame.
	readPreface() error
	// prefaceDone follows the peer's first SETTINGS, which ends its
	// preface.
	prefaceDone()
	// onHeaderBlock handles a complete header block: a request on the
	// server, a response on the client.
	onHeaderBlock(hb *headerBlock) error
	// peerGoAway handles the peer's GOAWAY (RFC 9113 §6.8).
	peerGoAway(ge *GoAwayError) error
	// busyLocked reports work besides streams that keeps a draining
	// connection open: running handlers, stream slots promised to callers.
	busyLocked() bool
	// unusedLocked follows a stream slot becoming free on a connection
	// that stays open.
	unusedLocked()
	// tornDown follows teardown, before the connection reports itself torn.
	tornDown()
}

// newConn returns the engine of a connection over nc; the side embedding
// it sets side and isServer before start.
func newConn(nc net.Conn, cfg Settings, stats *Stats, log *slog.Logger) *conn {
	c := &conn{
		nc:             nc,
		cfg:            cfg.resolved(),
		stats:          stats,
		log:            log,
		writeSig:       make(chan struct{}, 1),
		readDone:       make(chan struct{}),
		writeDone:      make(chan struct{}),
		torn:           make(chan struct{}),
		streams:        make(map[uint32]*Stream),
		nextID:         1,
		peerInitWin:    initialWindow,
		peerMaxFrame:   minFrameSize,
		peerMaxStreams: 100, // assumed until the peer's SETTINGS arrive, as x/net and h2 do
		// RFC 9113 §6.5.2: MAX_HEADER_LIST_SIZE starts unlimited.
		peerMaxHeaderList: ^uint32(0),
		frameBudgets:      newFrameBudgets(),
	}
	c.sendWin = initialWindow
	c.recvWin = int64(c.cfg.ConnWindow)
	c.bc = batcher(nc)
	// A tls.Conn already hands out decrypted records from its own buffer;
	// anything else gets a small read buffer so frame headers are not
	// read a few bytes per syscall.
	if _, ok := nc.(*tls.Conn); ok {
		c.br = nc
	} else {
		c.br = bufio.NewReaderSize(nc, 4<<10)
	}
	c.fr = http2.NewFramer(nil, c.br)
	c.fr.SetMaxReadFrameSize(c.cfg.MaxFrameSize)
	c.hdec = hpack.NewDecoder(4096, c.onHeaderField)
	c.hdec.SetMaxStringLength(2 * c.cfg.maxHeaderBlock())
	c.wfr = http2.NewFramer(batchWriter{c}, nil)
	c.henc = hpack.NewEncoder(&c.hbuf)
	return c
}

// start queues the connection preface (RFC 9113 §3.4) and starts the
// reader, the writer and keepalive.
func (c *conn) start() {
	c.stats.ConnsOpened.Add(1)
	c.mu.Lock()
	c.side.writePrefaceLocked()
	if inc := c.cfg.ConnWindow - initialWindow; inc > 0 {
		// The connection window can only be raised with WINDOW_UPDATE
		// (RFC 9113 §6.9.2).
		_ = c.wfr.WriteWindowUpdate(0, inc)
	}
	c.startKeepaliveLocked()
	c.mu.Unlock()
	c.signalWriter()
	go c.writeLoop()
	go c.readLoop()
}

// shutdown queues GOAWAY with code and closes the connection once it is
// written (or after closeFlushTimeout). Streams are ended with err. With
// linger, set when the reader has stopped after a connection error, the
// close waits for the peer as lingerClose describes.
func (c *conn) shutdown(code http2.ErrCode, debug string, err error, linger bool) {
	c.mu.Lock()
	if c.closed || c.closing {
		c.mu.Unlock()
		return
	}
	_ = c.wfr.WriteGoAway(c.maxPeerID, code, []byte(debug))
	c.goAwaySent = true
	c.closing = true
	c.linger = linger
	c.closeErr = err
	c.mu.Unlock()
	c.signalWriter()
	_ = c.nc.SetWriteDeadline(time.Now().Add(closeFlushTimeout))
}

// goAway stops accepting new streams (server) or opening them (client)
// and closes the connection once its streams are done: a graceful
// shutdown, RFC 9113 §6.8.
func (c *conn) goAway() {
	c.mu.Lock()
	if c.closed || c.closing {
		c.mu.Unlock()
		return
	}
	if !c.goAwaySent {
		c.goAwaySent = true
		_ = c.wfr.WriteGoAway(c.maxPeerID, http2.ErrCodeNo, nil)
	}
	done := c.drainedLocked()
	if done {
		c.closing = true
		c.closeErr = ErrConnClosed
	}
	c.mu.Unlock()
	c.signalWriter()
}

// drainedLocked reports whether a connection that takes no new streams has
// nothing left to serve.
func (c *conn) drainedLocked() bool {
	if !c.goAwaySent && !c.goAwayRecv {
		return false
	}
	return len(c.streams) == 0 && !c.side.busyLocked()
}

// teardown closes the connection now and fails every stream with err.
func (c *conn) teardown(err error) {
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return
	}
	c.closed = true
	if c.closeErr != nil {
		err = c.closeErr // the cause we chose, not the I/O error it led to
	}
	if err == nil {
		err = ErrConnClosed
	}
	c.err = err
	streams := make([]*Stream, 0, len(c.streams))
	for _, s := range c.streams {
		s.inMap = false
		s.stopLingerLocked()
		streams = append(streams, s)
	}
	clear(c.streams)
	// What was not written yet never will be; a write in flight is
	// counted lost too, whatever it still achieves.
	c.settleLocked(c.marks, true)
	c.settleLocked(c.flying, true)
	c.marks, c.flying = nil, nil
	c.wakeBlockedLocked()
	if c.keepTimer != nil {
		c.keepTimer.Stop()
	}
	linger := c.linger
	c.mu.Unlock()

	if !linger {
		_ = c.nc.Close()
	}
	c.signalWriter()
	for _, s := range streams {
		s.abort(err)
	}
	c.side.tornDown()
	c.stats.ConnsClosed.Add(1)
	close(c.torn)
}

// lingerClose closes a connection whose peer may still be sending, as
// one that is flooding us is. Closing a socket with unread input makes
// the kernel send RST, and an RST makes the peer drop what it has not
// read yet: our GOAWAY. So shut down our direction, and read and discard
// for a moment before closing.
func lingerClose(nc net.Conn) {
	if tc, ok := nc.(*tls.Conn); ok {
		if cw, ok := tc.NetConn().(interface{ CloseWrite() error }); ok {
			_ = cw.CloseWrite()
		}
	} else if cw, ok := nc.(interface{ CloseWrite() error }); ok {
		_ = cw.CloseWrite()
	}
	_ = nc.SetReadDeadline(time.Now().Add(closeFlushTimeout))
	_, _ = io.Copy(io.Discard, nc)
	_ = nc.Close()
}

func (c *conn) isClosed() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.closed
}

// isPeerID reports whether id is one the peer initiates (RFC 9113 §5.1.1:
// clients use odd ids).
func (c *conn) isPeerID(id uint32) bool {
	return (id%2 == 1) == c.isServer
}

// idleLocked reports whether id names a stream in the "idle" state: never
// opened. Frames other than HEADERS and PRIORITY on it are a connection
// error (RFC 9113 §5.1).
func (c *conn) idleLocked(id uint32) bool {
	if c.isPeerID(id) {
		return id > c.maxPeerID
	}
	return id >= c.nextID
}

// newStreamLocked registers a stream opened by either side.
func (c *conn) newStreamLocked(id uint32) *Stream {
	s := &Stream{
		c:           c,
		id:          id,
		streamState: streamState{sendWin: c.peerInitWin, recvWin: int64(c.cfg.StreamWindow), inMap: true},
	}
	c.streams[id] = s
	return s
}

// removeLocked forgets a stream that is closed in both directions or
// reset, and does the bookkeeping that follows.
func (c *conn) removeLocked(s *Stream) {
	if !s.inMap {
		return
	}
	s.inMap = false
	s.stopLingerLocked()
	delete(c.streams, s.id)
	c.slotFreedLocked()
}

// slotFreedLocked follows a stream slot becoming free: a draining
// connection may now close; see also side.unusedLocked.
func (c *conn) slotFreedLocked() {
	if c.closed || c.closing {
		return
	}
	if c.drainedLocked() {
		c.closing = true
		c.closeErr = ErrConnClosed
		c.signalWriter()
		return
	}
	c.side.unusedLocked()
}

// resetLocked ends s with RST_STREAM code sent by us. The error it may
// return is a control flood: the reset is queued regardless.
func (c *conn) resetLocked(s *Stream, code http2.ErrCode) error {
	_ = c.wfr.WriteRSTStream(s.id, code)
	c.signalWriter()
	err := &StreamError{Code: code}
	s.reset = true
	s.resetErr = err
	c.removeLocked(s)
	// abort takes s.rmu, never c.mu: safe to call here.
	c.creditConnLocked(s.abort(err))
	if !c.controlRoomLocked() {
		return c.controlFlood()
	}
	return nil
}
