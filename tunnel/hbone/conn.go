package hbone

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"

	"github.com/amber-mesh/amber/internal/logkey"
	"github.com/amber-mesh/amber/tunnel/nonblock"
)

const (
	maxStreamID = 1<<31 - 1

	// Budgets for frames that cost us work but carry no data. Legitimate
	// peers send a PING every few seconds and SETTINGS once or twice.
	pingBurst, pingRate         = 100, 20
	settingsBurst, settingsRate = 20, 2
	// Streams the client resets before they were answered: the shape of
	// the HTTP/2 rapid reset attack (CVE-2023-44487), where each reset
	// stream costs the server a handler start.
	resetBurst, resetRate = 200, 50
	// Stream errors the peer provokes (malformed requests, frames on
	// half-closed streams, window overflows) each cost us a reply.
	streamErrBurst, streamErrRate = 200, 20
	// Frames that cost us a frame's work and carry nothing (CVE-2019-9518,
	// CVE-2019-9513): DATA without data or END_STREAM, WINDOW_UPDATEs no
	// DATA of ours prompted, PRIORITY frames beyond one per stream the
	// peer opened. No HBONE client sends the first, and the others come
	// from what we did: each DATA frame we send earns the peer
	// updatesPerData WINDOW_UPDATEs (one for the stream and one for the
	// connection, twice over for peers that return window in pieces), and
	// each stream it opens one PRIORITY. Earned frames are free up to
	// maxEarned; the rest spend from a budget like PING's.
	emptyBurst, emptyRate       = 100, 20
	updateBurst, updateRate     = 100, 20
	priorityBurst, priorityRate = 100, 20
	updatesPerData              = 4
	maxEarned                   = 4096
	// maxSettingsFrame bounds one SETTINGS frame: 64 settings, several
	// times as many as are defined.
	maxSettingsFrame = 64 * 6
	// maxGoAwayDebug bounds the GOAWAY debug data kept.
	maxGoAwayDebug = 256
	// maxContinuations bounds the CONTINUATION frames of one header block
	// (CVE-2024-27316 and relatives).
	maxContinuations = 64
	// closeFlushTimeout bounds how long a closing connection waits to
	// flush its GOAWAY to a peer that does not read.
	closeFlushTimeout = time.Second
)

var clientPreface = []byte(http2.ClientPreface)

// conn is one HTTP/2 connection, client or server side. A reader goroutine
// parses frames; frames every other goroutine appends to the batch under
// mu are written by whoever finds the connection idle: a stream's writer
// writes its DATA itself when no batch is in flight (see flushLocked), and
// the writer goroutine drains what queues up meanwhile. The reader never
// waits for a write, so two peers blocked writing to each other still read
// each other's WINDOW_UPDATEs.
type conn struct {
	nc         net.Conn
	bc         *batchConn // under nc's TLS, if there
	br         io.Reader
	fr         *http2.Framer // reads; owned by the reader goroutine
	server     *Server       // nil on the client side
	cfg        Settings      // resolved
	maxStreams uint32        // server: SETTINGS_MAX_CONCURRENT_STREAMS sent
	stats      *Stats
	log        *slog.Logger

	// ctx is the parent of server handler contexts; cancelled at teardown.
	ctx    context.Context
	cancel context.CancelFunc

	// Client-side hooks, set before start.
	pool        *Pool
	key         Key
	idleTimeout time.Duration

	writeSig  chan struct{} // wakes the writer; capacity 1
	readDone  chan struct{} // closed when the reader returns
	writeDone chan struct{} // closed when the writer returns
	torn      chan struct{} // closed by teardown

	connUnacked atomic.Int64 // bytes read by the application, not yet returned with WINDOW_UPDATE

	// Owned by the reader goroutine.
	hdec           *hpack.Decoder
	hb             headerBlock
	pingBudget     rateLimit
	settingsBudget rateLimit
	resetBudget    rateLimit
	streamErrs     rateLimit
	emptyBudget    rateLimit
	updateBudget   rateLimit // spent when updatesEarned, under mu, is 0
	priorityBudget rateLimit
	prioritiesEarn int // PRIORITY frames the peer may send without spending priorityBudget
	sawSettings    bool
	// slot is the server's handshake slot, released once the client's
	// preface is complete or the connection ends.
	slot *handshakeSlot

	mu        sync.Mutex // guards the fields below
	pending   []byte     // frames queued for the writer
	marks     []dataMark // the DATA in pending
	flying    []dataMark // the DATA in the batch being written
	spare     []byte     // the batch the writer last wrote, for reuse
	writing   bool       // a batch is being written; only its writer may write to nc
	leftover  bool       // an inline write left bytes in bc for the writer goroutine
	wfr       *http2.Framer
	henc      *hpack.Encoder
	hbuf      bytes.Buffer
	streams   map[uint32]*Stream
	blocked   []*Stream // writers waiting for connection window or batch room
	nextID    uint32    // client: next stream id
	maxPeerID uint32    // server: highest stream id the client opened
	sendWin   int64     // connection send window (RFC 9113 §6.9.1)
	recvWin   int64     // connection receive window the peer may still use

	peerInitWin       int64
	peerMaxFrame      uint32
	peerMaxStreams    uint32
	peerMaxHeaderList uint32

	handlers   int // server: handlers running
	reserved   int // client: stream slots promised to Connect callers
	idleSince  time.Time
	idleTimer  *time.Timer
	goAwaySent bool // no new streams are accepted
	goAwayRecv bool // no new streams may be opened
	exhausted  bool // client: stream ids used up
	closing    bool // final GOAWAY queued; the writer tears down after flushing
	linger     bool // closing after a connection error: drain input before closing
	closeErr   error
	closed     bool
	err        error

	updatesEarned int // WINDOW_UPDATEs the peer may send without spending updateBudget

	pingOut   bool
	pingData  [8]byte
	pingSent  time.Time
	pingSeq   uint64
	keepTimer *time.Timer
}

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
		sendWin:        initialWindow,
		peerInitWin:    initialWindow,
		peerMaxFrame:   minFrameSize,
		peerMaxStreams: 100, // assumed until the peer's SETTINGS arrive, as x/net and h2 do
		// RFC 9113 §6.5.2: MAX_HEADER_LIST_SIZE starts unlimited.
		peerMaxHeaderList: ^uint32(0),
		pingBudget:        newRateLimit(pingBurst, pingRate),
		settingsBudget:    newRateLimit(settingsBurst, settingsRate),
		resetBudget:       newRateLimit(resetBurst, resetRate),
		streamErrs:        newRateLimit(streamErrBurst, streamErrRate),
		emptyBudget:       newRateLimit(emptyBurst, emptyRate),
		updateBudget:      newRateLimit(updateBurst, updateRate),
		priorityBudget:    newRateLimit(priorityBurst, priorityRate),
	}
	c.recvWin = int64(c.cfg.ConnWindow)
	c.bc = batcher(nc)
	if c.bc != nil {
		c.bc.raw = nonblock.Raw(c.bc.Conn)
	}
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

// start queues the connection preface (RFC 9113 §3.4) and starts the
// reader, the writer and keepalive.
func (c *conn) start() {
	c.stats.ConnsOpened.Add(1)
	c.mu.Lock()
	if c.server == nil {
		_, _ = batchWriter{c}.Write(clientPreface)
	}
	_ = c.wfr.WriteSettings(c.cfg.frames(c.server != nil, c.maxStreams)...)
	if inc := c.cfg.ConnWindow - initialWindow; inc > 0 {
		// The connection window can only be raised with WINDOW_UPDATE
		// (RFC 9113 §6.9.2).
		_ = c.wfr.WriteWindowUpdate(0, inc)
	}
	if c.cfg.PingInterval > 0 {
		c.keepTimer = time.AfterFunc(c.cfg.PingInterval, c.keepalive)
	}
	c.mu.Unlock()
	c.signalWriter()
	go c.writeLoop()
	go c.readLoop()
}

func (c *conn) signalWriter() {
	select {
	case c.writeSig <- struct{}{}:
	default:
	}
}

func notify(ch chan struct{}) {
	select {
	case ch <- struct{}{}:
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
		c.marks = nil
	}
	if len(c.flying) == 0 {
		c.flying = nil
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
		notify(s.wsig)
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

// readLoop reads and handles frames until the connection fails.
func (c *conn) readLoop() {
	defer close(c.readDone)
	err := c.readFrames()
	var ce connError
	if errors.As(err, &ce) {
		c.mu.Lock()
		last := c.maxPeerID
		c.mu.Unlock()
		c.shutdown(ce.code, ce.reason, &GoAwayError{Code: ce.code, LastStreamID: last, Debug: ce.reason}, true)
		c.log.Debug("hbone: connection error", logkey.Remote, c.nc.RemoteAddr(), logkey.Error, err)
		return
	}
	c.teardown(err)
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
	return len(c.streams) == 0 && c.handlers == 0 && c.reserved == 0
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
	if c.idleTimer != nil {
		c.idleTimer.Stop()
	}
	linger := c.linger
	c.mu.Unlock()

	c.slot.release()
	if !linger {
		_ = c.nc.Close()
	}
	c.signalWriter()
	for _, s := range streams {
		s.abort(err)
	}
	if c.cancel != nil {
		c.cancel()
	}
	c.stats.ConnsClosed.Add(1)
	close(c.torn)
	if c.pool != nil {
		c.pool.remove(c)
	}
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

// keepalive sends a PING every PingInterval and closes a connection whose
// PING stays unanswered for PingTimeout.
func (c *conn) keepalive() {
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return
	}
	now := time.Now()
	if c.pingOut {
		if now.Sub(c.pingSent) >= c.cfg.PingTimeout {
			c.mu.Unlock()
			c.stats.KeepaliveTimeouts.Add(1)
			c.teardown(ErrKeepaliveTimeout)
			return
		}
	} else {
		c.pingSeq++
		binary.BigEndian.PutUint64(c.pingData[:], c.pingSeq)
		c.pingOut = true
		c.pingSent = now
		_ = c.wfr.WritePing(false, c.pingData)
		c.signalWriter()
	}
	c.keepTimer.Reset(min(c.cfg.PingInterval, c.cfg.PingTimeout))
	c.mu.Unlock()
}

// readFrames runs the receive side of the connection (RFC 9113 §4-6).
func (c *conn) readFrames() error {
	if c.server != nil {
		// The server owns the handshake budget: the client preface and its
		// SETTINGS must arrive within it too, or a slow client could hold
		// the connection open without ever speaking HTTP/2.
		_ = c.nc.SetReadDeadline(time.Now().Add(c.server.handshakeTimeout()))
		var p [len(http2.ClientPreface)]byte
		if _, err := io.ReadFull(c.br, p[:]); err != nil {
			if errors.Is(err, os.ErrDeadlineExceeded) {
				c.stats.HandshakeTimeouts.Add(1)
			}
			return fmt.Errorf("hbone: read client preface: %w", err)
		}
		if !bytes.Equal(p[:], clientPreface) {
			c.stats.ProtocolErrors.Add(1)
			return connError{http2.ErrCodeProtocol, "bad client preface"}
		}
	}
	for {
		fh, err := c.fr.ReadFrameHeader()
		if err != nil {
			if c.server != nil && !c.sawSettings && errors.Is(err, os.ErrDeadlineExceeded) {
				c.stats.HandshakeTimeouts.Add(1)
			}
			return c.readError(err)
		}
		if !c.sawSettings {
			// RFC 9113 §3.4: the preface ends with a SETTINGS frame.
			if fh.Type != http2.FrameSettings || fh.Flags.Has(http2.FlagSettingsAck) {
				return c.protocolError(http2.ErrCodeProtocol, "first frame is not SETTINGS")
			}
		}
		switch fh.Type {
		case http2.FrameData:
			err = c.onData(fh)
		case http2.FrameHeaders:
			err = c.onHeaders(fh)
		case http2.FrameContinuation:
			err = c.onContinuation(fh)
		case http2.FramePriority, http2.FrameRSTStream, http2.FrameSettings, http2.FramePing,
			http2.FrameGoAway, http2.FrameWindowUpdate, http2.FramePushPromise:
			err = c.onControl(fh)
		default:
			// RFC 9113 §5.5: unknown frame types are ignored.
			_, err = io.CopyN(io.Discard, c.br, int64(fh.Length))
		}
		if err != nil {
			return err
		}
	}
}

func (c *conn) readError(err error) error {
	var ce http2.ConnectionError
	switch {
	case errors.Is(err, http2.ErrFrameTooLarge):
		return c.protocolError(http2.ErrCodeFrameSize, "frame larger than SETTINGS_MAX_FRAME_SIZE")
	case errors.As(err, &ce):
		reason := "invalid frame"
		if d := c.fr.ErrorDetail(); d != nil {
			reason = d.Error()
		}
		return c.protocolError(http2.ErrCode(ce), reason)
	case errors.Is(err, io.EOF):
		return ErrConnClosed
	}
	return fmt.Errorf("hbone: read: %w", err)
}

func (c *conn) protocolError(code http2.ErrCode, reason string) error {
	c.stats.ProtocolErrors.Add(1)
	return connError{code, reason}
}

// isPeerID reports whether id is one the peer initiates (RFC 9113 §5.1.1:
// clients use odd ids).
func (c *conn) isPeerID(id uint32) bool {
	return (id%2 == 1) == (c.server != nil)
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

// onControl handles the frames that carry no stream data.
func (c *conn) onControl(fh http2.FrameHeader) error {
	// Fixed-size frames are checked before their payload is read, so a
	// lying length cannot make the Framer buffer a megabyte.
	switch fh.Type {
	case http2.FramePing:
		if fh.Length != 8 {
			return c.protocolError(http2.ErrCodeFrameSize, "PING length")
		}
	case http2.FrameRSTStream, http2.FrameWindowUpdate:
		if fh.Length != 4 {
			return c.protocolError(http2.ErrCodeFrameSize, fh.Type.String()+" length")
		}
	case http2.FramePriority:
		if fh.Length != 5 {
			return c.protocolError(http2.ErrCodeFrameSize, "PRIORITY length")
		}
	case http2.FrameSettings:
		if fh.Length > maxSettingsFrame {
			c.stats.SettingsFloods.Add(1)
			return connError{http2.ErrCodeEnhanceYourCalm, "SETTINGS frame too large"}
		}
	case http2.FramePushPromise:
		// RFC 9113 §8.4: clients never push, and our client disables push.
		return c.protocolError(http2.ErrCodeProtocol, "PUSH_PROMISE")
	case http2.FrameGoAway:
		if fh.Length > 8+maxGoAwayDebug {
			return c.onLongGoAway(fh)
		}
	}
	f, err := c.fr.ReadFrameForHeader(fh)
	if err != nil {
		var se http2.StreamError
		if errors.As(err, &se) {
			return c.streamError(se.StreamID, se.Code)
		}
		return c.readError(err)
	}
	switch f := f.(type) {
	case *http2.SettingsFrame:
		return c.onSettings(f)
	case *http2.PingFrame:
		return c.onPing(f)
	case *http2.WindowUpdateFrame:
		return c.onWindowUpdate(f)
	case *http2.RSTStreamFrame:
		return c.onReset(f)
	case *http2.GoAwayFrame:
		return c.onGoAway(f.LastStreamID, f.ErrCode, f.DebugData())
	case *http2.PriorityFrame:
		if f.StreamDep == f.StreamID {
			// RFC 9113 §5.3.1: a stream cannot depend on itself.
			return c.streamError(f.StreamID, http2.ErrCodeProtocol)
		}
		// RFC 9113 §5.3.2 deprecates priority signalling; we ignore it,
		// and a peer that keeps sending it is flooding.
		if c.prioritiesEarn > 0 {
			c.prioritiesEarn--
		} else if !c.priorityBudget.allow(time.Now()) {
			c.stats.PriorityFloods.Add(1)
			return connError{http2.ErrCodeEnhanceYourCalm, "PRIORITY flood"}
		}
	}
	return nil
}

// onLongGoAway reads a GOAWAY whose debug data is longer than we keep.
func (c *conn) onLongGoAway(fh http2.FrameHeader) error {
	var p [8 + maxGoAwayDebug]byte
	if _, err := io.ReadFull(c.br, p[:]); err != nil {
		return c.readError(err)
	}
	if _, err := io.CopyN(io.Discard, c.br, int64(fh.Length)-int64(len(p))); err != nil {
		return c.readError(err)
	}
	if fh.StreamID != 0 {
		return c.protocolError(http2.ErrCodeProtocol, "GOAWAY on a stream")
	}
	return c.onGoAway(binary.BigEndian.Uint32(p[:4])&maxStreamID,
		http2.ErrCode(binary.BigEndian.Uint32(p[4:8])), p[8:])
}

func (c *conn) onSettings(f *http2.SettingsFrame) error {
	if f.IsAck() {
		return nil
	}
	if c.sawSettings && !c.settingsBudget.allow(time.Now()) {
		c.stats.SettingsFloods.Add(1)
		return connError{http2.ErrCodeEnhanceYourCalm, "SETTINGS flood"}
	}
	if !c.sawSettings {
		c.sawSettings = true
		if c.server != nil {
			// The preface is complete: the handshake budget no longer
			// applies, and the peer no longer counts as unauthenticated.
			_ = c.nc.SetReadDeadline(time.Time{})
			c.slot.release()
		}
	}
	for i := range f.NumSettings() {
		if err := f.Setting(i).Valid(); err != nil {
			var ce http2.ConnectionError
			if errors.As(err, &ce) {
				return c.protocolError(http2.ErrCode(ce), "invalid "+f.Setting(i).ID.String())
			}
			return c.protocolError(http2.ErrCodeProtocol, "invalid setting")
		}
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	for i := range f.NumSettings() {
		s := f.Setting(i)
		switch s.ID {
		case http2.SettingHeaderTableSize:
			c.henc.SetMaxDynamicTableSize(s.Val)
		case http2.SettingEnablePush:
			if c.server == nil && s.Val != 0 {
				// RFC 9113 §6.5.2: a server MUST NOT set ENABLE_PUSH to 1.
				c.stats.ProtocolErrors.Add(1)
				return connError{http2.ErrCodeProtocol, "server enabled push"}
			}
		case http2.SettingMaxConcurrentStreams:
			c.peerMaxStreams = s.Val
		case http2.SettingInitialWindowSize:
			// RFC 9113 §6.9.2: the change applies to every open stream.
			delta := int64(s.Val) - c.peerInitWin
			c.peerInitWin = int64(s.Val)
			for _, st := range c.streams {
				st.sendWin += delta
				if st.sendWin > maxWindow {
					c.stats.ProtocolErrors.Add(1)
					return connError{http2.ErrCodeFlowControl, "INITIAL_WINDOW_SIZE overflows a stream window"}
				}
				if delta > 0 {
					notify(st.wsig)
				}
			}
		case http2.SettingMaxFrameSize:
			c.peerMaxFrame = s.Val
		case http2.SettingMaxHeaderListSize:
			c.peerMaxHeaderList = s.Val
		}
	}
	if !c.controlRoomLocked() {
		return c.controlFlood()
	}
	_ = c.wfr.WriteSettingsAck()
	c.signalWriter()
	return nil
}

func (c *conn) onPing(f *http2.PingFrame) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if f.IsAck() {
		if c.pingOut && f.Data == c.pingData {
			c.pingOut = false
		}
		return nil
	}
	if !c.pingBudget.allow(time.Now()) {
		c.stats.PingFloods.Add(1)
		return connError{http2.ErrCodeEnhanceYourCalm, "PING flood"}
	}
	if !c.controlRoomLocked() {
		return c.controlFlood()
	}
	_ = c.wfr.WritePing(true, f.Data)
	c.signalWriter()
	return nil
}

func (c *conn) onWindowUpdate(f *http2.WindowUpdateFrame) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.updatesEarned > 0 {
		c.updatesEarned--
	} else if !c.updateBudget.allow(time.Now()) {
		c.stats.WindowUpdateFloods.Add(1)
		return connError{http2.ErrCodeEnhanceYourCalm, "WINDOW_UPDATE flood"}
	}
	inc := int64(f.Increment)
	if f.StreamID == 0 {
		c.sendWin += inc
		if c.sendWin > maxWindow {
			c.stats.ProtocolErrors.Add(1)
			return connError{http2.ErrCodeFlowControl, "connection window overflow"}
		}
		c.wakeBlockedLocked()
		return nil
	}
	s := c.streams[f.StreamID]
	if s == nil {
		if c.idleLocked(f.StreamID) {
			c.stats.ProtocolErrors.Add(1)
			return connError{http2.ErrCodeProtocol, "WINDOW_UPDATE on idle stream"}
		}
		return nil // closed stream: RFC 9113 §6.9 allows it to arrive late
	}
	s.sendWin += inc
	if s.sendWin > maxWindow {
		if err := c.streamErrorBudget(); err != nil {
			return err
		}
		return c.resetLocked(s, http2.ErrCodeFlowControl)
	}
	notify(s.wsig)
	return nil
}

func (c *conn) onReset(f *http2.RSTStreamFrame) error {
	c.mu.Lock()
	s := c.streams[f.StreamID]
	if s == nil {
		idle := c.idleLocked(f.StreamID)
		c.mu.Unlock()
		if idle {
			return c.protocolError(http2.ErrCodeProtocol, "RST_STREAM on idle stream")
		}
		return nil
	}
	answered := s.responded
	if s.inBatch > 0 {
		c.dropStreamDataLocked(s)
	}
	var err error = &StreamError{Code: f.ErrCode, Remote: true}
	if f.ErrCode == http2.ErrCodeRefusedStream {
		// RFC 9113 §8.7: a refused stream was not processed; it may be retried.
		c.stats.StreamsRefused.Add(1)
		err = retryableError{err}
	}
	s.reset = true
	s.resetErr = err
	c.removeLocked(s)
	c.mu.Unlock()
	c.stats.StreamsReset.Add(1)
	c.creditConn(s.abort(err))
	if c.server != nil && !answered && !c.resetBudget.allow(time.Now()) {
		c.stats.RapidResets.Add(1)
		return connError{http2.ErrCodeEnhanceYourCalm, "too many streams reset"}
	}
	return nil
}

func (c *conn) onGoAway(last uint32, code http2.ErrCode, debug []byte) error {
	c.stats.GoAwaysReceived.Add(1)
	ge := &GoAwayError{Code: code, LastStreamID: last, Debug: string(debug[:min(len(debug), maxGoAwayDebug)]), Remote: true}
	if c.server != nil {
		// A client's GOAWAY refuses streams the server would open; we open
		// none. Only an error code ends the connection.
		if code != http2.ErrCodeNo {
			c.teardown(ge)
			return ge
		}
		return nil
	}
	c.mu.Lock()
	c.goAwayRecv = true
	var unprocessed []*Stream
	for id, s := range c.streams {
		// RFC 9113 §6.8: streams we opened above last were not processed
		// and may be retried on another connection.
		if !c.isPeerID(id) && id > last {
			unprocessed = append(unprocessed, s)
		}
	}
	for _, s := range unprocessed {
		s.reset = true
		s.resetErr = retryableError{ge}
		c.removeLocked(s)
	}
	done := c.drainedLocked()
	c.mu.Unlock()
	for _, s := range unprocessed {
		c.creditConn(s.abort(retryableError{ge}))
	}
	if c.pool != nil {
		c.pool.remove(c)
	}
	if code != http2.ErrCodeNo {
		c.teardown(ge)
		return ge
	}
	if done {
		c.teardown(ge)
		return ge
	}
	return nil
}

// streamError answers a stream error (RFC 9113 §5.4.2) with RST_STREAM.
func (c *conn) streamError(id uint32, code http2.ErrCode) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if err := c.streamErrorBudget(); err != nil {
		return err
	}
	s := c.streams[id]
	if s == nil {
		if c.idleLocked(id) {
			c.stats.ProtocolErrors.Add(1)
			return connError{http2.ErrCodeProtocol, "frame on idle stream"}
		}
		_ = c.wfr.WriteRSTStream(id, code)
		c.signalWriter()
		if !c.controlRoomLocked() {
			return c.controlFlood()
		}
		return nil
	}
	return c.resetLocked(s, code)
}

// streamErrorBudget spends one stream error the peer caused. Peers that
// keep causing them are answered with GOAWAY rather than an RST each.
// Called on the reader goroutine.
func (c *conn) streamErrorBudget() error {
	if c.streamErrs.allow(time.Now()) {
		return nil
	}
	c.stats.StreamErrorFloods.Add(1)
	return connError{http2.ErrCodeEnhanceYourCalm, "too many stream errors"}
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

// removeLocked forgets a stream that is closed in both directions or
// reset, and does the bookkeeping that follows.
func (c *conn) removeLocked(s *Stream) {
	if !s.inMap {
		return
	}
	s.inMap = false
	delete(c.streams, s.id)
	c.slotFreedLocked()
}

// newStreamLocked registers a stream opened by either side.
func (c *conn) newStreamLocked(id uint32) *Stream {
	s := &Stream{
		c:       c,
		id:      id,
		sendWin: c.peerInitWin,
		recvWin: int64(c.cfg.StreamWindow),
		inMap:   true,
		wsig:    make(chan struct{}, 1),
		rsig:    make(chan struct{}, 1),
	}
	c.streams[id] = s
	return s
}

// onData handles a DATA frame, reading its payload straight into the
// stream's receive buffer.
func (c *conn) onData(fh http2.FrameHeader) error {
	id, n := fh.StreamID, int64(fh.Length)
	if id == 0 {
		return c.protocolError(http2.ErrCodeProtocol, "DATA on stream 0")
	}
	c.mu.Lock()
	if n > c.recvWin {
		c.mu.Unlock()
		return c.protocolError(http2.ErrCodeFlowControl, "connection window exceeded")
	}
	c.recvWin -= n
	s := c.streams[id]
	var rstCode http2.ErrCode
	switch {
	case s == nil:
		if c.idleLocked(id) {
			c.mu.Unlock()
			return c.protocolError(http2.ErrCodeProtocol, "DATA on idle stream")
		}
		// A stream we closed or reset: data in flight is dropped, but it
		// still counts against the connection window (RFC 9113 §6.9).
	case s.recvEnded:
		rstCode = http2.ErrCodeStreamClosed // RFC 9113 §5.1 half-closed (remote)
	case !s.responded && c.server == nil:
		rstCode = http2.ErrCodeProtocol // RFC 9113 §8.1: a response starts with HEADERS
	case n > s.recvWin:
		rstCode = http2.ErrCodeFlowControl
	default:
		s.recvWin -= n
	}
	if rstCode != 0 {
		if err := c.streamErrorBudget(); err != nil {
			c.mu.Unlock()
			return err
		}
		if err := c.resetLocked(s, rstCode); err != nil {
			c.mu.Unlock()
			return err
		}
		s = nil
	}
	c.mu.Unlock()

	data := n
	if fh.Flags.Has(http2.FlagDataPadded) {
		var pad [1]byte
		if data == 0 {
			return c.protocolError(http2.ErrCodeFrameSize, "padded DATA without pad length")
		}
		if _, err := io.ReadFull(c.br, pad[:]); err != nil {
			return c.readError(err)
		}
		data -= 1 + int64(pad[0])
		if data < 0 {
			// RFC 9113 §6.1: padding as long as the payload is a connection error.
			return c.protocolError(http2.ErrCodeProtocol, "DATA padding exceeds payload")
		}
	}
	if data == 0 && !fh.Flags.Has(http2.FlagDataEndStream) && !c.emptyBudget.allow(time.Now()) {
		c.stats.EmptyFrameFloods.Add(1)
		return connError{http2.ErrCodeEnhanceYourCalm, "empty DATA flood"}
	}
	if s == nil {
		if _, err := io.CopyN(io.Discard, c.br, n-boolInt(fh.Flags.Has(http2.FlagDataPadded))); err != nil {
			return c.readError(err)
		}
		c.creditConn(n)
		return nil
	}
	if data > 0 {
		if err := s.receive(c.br, int(data)); err != nil {
			return c.readError(err)
		}
	}
	if padded := n - data; padded > 0 {
		if _, err := io.CopyN(io.Discard, c.br, padded-1); err != nil {
			return c.readError(err)
		}
		// Padding is flow controlled but never read: return it now.
		c.creditConn(padded)
		s.credit(padded)
	}
	if fh.Flags.Has(http2.FlagDataEndStream) {
		c.onEndStream(s)
	}
	return nil
}

func boolInt(b bool) int64 {
	if b {
		return 1
	}
	return 0
}

// onEndStream records the peer's END_STREAM: reads see io.EOF once the
// buffered data is consumed.
func (c *conn) onEndStream(s *Stream) {
	c.mu.Lock()
	if s.recvEnded || !s.inMap {
		c.mu.Unlock()
		return
	}
	s.recvEnded = true
	if s.sendEnded {
		c.removeLocked(s)
	}
	c.mu.Unlock()
	s.rmu.Lock()
	if s.rerr == nil {
		s.rerr = io.EOF
	}
	s.rmu.Unlock()
	s.wakeRead()
}

// creditConn returns n bytes of connection window to the peer once enough
// have accumulated to be worth a WINDOW_UPDATE.
func (c *conn) creditConn(n int64) {
	if inc := c.connCredit(n); inc > 0 {
		c.mu.Lock()
		c.sendConnUpdateLocked(inc)
		c.mu.Unlock()
	}
}

func (c *conn) creditConnLocked(n int64) {
	if inc := c.connCredit(n); inc > 0 {
		c.sendConnUpdateLocked(inc)
	}
}

func (c *conn) connCredit(n int64) int64 {
	if n <= 0 || c.connUnacked.Add(n) < int64(c.cfg.ConnWindow/4) {
		return 0
	}
	return c.connUnacked.Swap(0)
}

func (c *conn) sendConnUpdateLocked(inc int64) {
	if inc <= 0 || c.closed {
		return
	}
	c.recvWin += inc
	_ = c.wfr.WriteWindowUpdate(0, uint32(inc))
	c.signalWriter()
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
