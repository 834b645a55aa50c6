package hbone

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"strconv"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
)

// clientConn is the client end of an HBONE connection, in a Pool: it opens
// CONNECT streams and waits for their responses (RFC 9113 §8.5). Its
// fields but the ones set before start are guarded by conn.mu.
type clientConn struct {
	*conn
	pool        *Pool
	key         Key
	idleTimeout time.Duration

	reserved  int  // stream slots promised to Connect callers
	exhausted bool // stream ids used up
	idleSince time.Time
	idleTimer *time.Timer
}

func newClientConn(nc net.Conn, p *Pool, key Key) *clientConn {
	c := &clientConn{conn: newConn(nc, p.Settings, p.stats, p.log), pool: p, key: key, idleTimeout: p.idleTimeout()}
	c.side = c
	return c
}

func (c *clientConn) writePrefaceLocked() {
	_, _ = batchWriter{c.conn}.Write(clientPreface)
	_ = c.wfr.WriteSettings(c.cfg.frames(false, 0)...)
}

func (c *clientConn) readPreface() error { return nil } // a server's preface is its SETTINGS

func (c *clientConn) prefaceDone() {}

func (c *clientConn) onHeaderBlock(hb *headerBlock) error { return c.onResponse(hb) }

func (c *clientConn) peerGoAway(ge *GoAwayError) error {
	last, code := ge.LastStreamID, ge.Code
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
	c.pool.remove(c)
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

func (c *clientConn) busyLocked() bool { return c.reserved > 0 }

// unusedLocked starts the idle timer of a connection left without streams.
func (c *clientConn) unusedLocked() {
	if len(c.streams) == 0 && c.reserved == 0 {
		c.idleSince = time.Now()
		if c.idleTimer == nil {
			c.idleTimer = time.AfterFunc(c.idleTimeout, c.idleCheck)
		} else {
			c.idleTimer.Reset(c.idleTimeout)
		}
	}
}

func (c *clientConn) tornDown() {
	c.mu.Lock()
	if c.idleTimer != nil {
		c.idleTimer.Stop()
	}
	c.mu.Unlock()
	c.pool.remove(c)
}

// tryReserve claims a stream slot for a Connect, within limit and the
// server's SETTINGS_MAX_CONCURRENT_STREAMS.
func (c *clientConn) tryReserve(limit int) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed || c.closing || c.goAwaySent || c.goAwayRecv || c.exhausted {
		return false
	}
	if len(c.streams)+c.reserved >= min(limit, int(c.peerMaxStreams)) {
		return false
	}
	c.reserved++
	return true
}

// connect opens a stream in a reserved slot and waits for the response.
func (c *clientConn) connect(ctx context.Context, fields []hpack.HeaderField, size uint32) (*Stream, error) {
	c.mu.Lock()
	c.reserved--
	var err error
	switch {
	case c.closed:
		err = retryableError{c.err}
	case c.closing || c.goAwaySent || c.goAwayRecv:
		err = retryableError{ErrConnClosed}
	case c.nextID > maxStreamID:
		c.exhausted = true
		err = retryableError{errors.New("hbone: stream ids exhausted")}
	case size > c.peerMaxHeaderList:
		err = fmt.Errorf("hbone: request header list of %d bytes over the server's limit of %d", size, c.peerMaxHeaderList)
	}
	if err != nil {
		c.slotFreedLocked()
		c.mu.Unlock()
		return nil, err
	}
	if c.idleTimer != nil {
		c.idleTimer.Stop()
	}
	id := c.nextID
	c.nextID += 2
	s := c.newStreamLocked(id)
	s.resp = make(chan struct{})
	c.writeHeadersLocked(id, fields, false)
	if err := c.flushLocked(); err != nil {
		_ = s.Close()
		return nil, retryableError{err}
	}

	select {
	case <-s.resp:
	case <-ctx.Done():
		_ = s.Close()
		return nil, ctx.Err()
	}
	if s.respErr != nil {
		_ = s.Close()
		return nil, s.respErr
	}
	if s.status != http.StatusOK {
		c.stats.StreamsRejected.Add(1)
		_ = s.Close()
		return nil, &StatusError{Code: int(s.status)}
	}
	c.stats.StreamsOpened.Add(1)
	// The response is in and its channel closed: an idle tunnel keeps its
	// Stream, not the channel.
	s.rmu.Lock()
	s.resp = nil
	s.rmu.Unlock()
	return s, nil
}

// idleCheck closes the connection if it is still unused after
// IdleTimeout.
func (c *clientConn) idleCheck() {
	p := c.pool
	p.mu.Lock()
	defer p.mu.Unlock()
	c.mu.Lock()
	idle := !c.closed && !c.closing && len(c.streams) == 0 && c.reserved == 0
	if idle {
		if wait := c.idleTimeout - time.Since(c.idleSince); wait > 0 {
			c.idleTimer.Reset(wait)
			c.mu.Unlock()
			return
		}
		_ = c.wfr.WriteGoAway(0, http2.ErrCodeNo, nil)
		c.goAwaySent = true
		c.closing = true
		c.closeErr = ErrConnClosed
		c.signalWriter()
	}
	c.mu.Unlock()
	if idle {
		p.stats.IdleCloses.Add(1)
		p.removeLocked(c)
	}
}

// onResponse handles a complete response header block on the client.
func (c *clientConn) onResponse(hb *headerBlock) error {
	id := hb.streamID
	c.mu.Lock()
	if !c.isPeerID(id) && id >= c.nextID || c.isPeerID(id) {
		// Servers open no streams here (push is disabled), and never
		// answer a stream not yet opened (RFC 9113 §5.1).
		c.mu.Unlock()
		return c.protocolError(http2.ErrCodeProtocol, "HEADERS on idle stream")
	}
	s := c.streams[id]
	if s == nil {
		c.mu.Unlock()
		return nil // closed by us; the block was decoded, that is all it needs
	}
	if s.responded {
		return c.onTrailersLocked(s, hb)
	}
	var status int
	if hb.tooLarge {
		c.stats.HeaderListTooLarge.Add(1)
	} else if hb.invalid == nil && !hb.selfDep && hb.seen&seenStatus != 0 && len(hb.status) == 3 {
		status, _ = strconv.Atoi(hb.status)
	}
	if status < 100 || status > 599 || status == http.StatusSwitchingProtocols || (status < 200 && hb.endStream) {
		// Malformed response (RFC 9113 §8.1.1, §8.6).
		err := c.resetLocked(s, http2.ErrCodeProtocol)
		c.mu.Unlock()
		return err
	}
	if status < 200 {
		c.mu.Unlock()
		return nil // informational: the final response follows
	}
	s.responded = true
	s.status = int32(status)
	c.mu.Unlock()
	s.deliverResponse(nil)
	if hb.endStream {
		c.onEndStream(s)
	}
	return nil
}
