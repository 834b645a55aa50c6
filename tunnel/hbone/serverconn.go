package hbone

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"runtime/debug"
	"time"

	"golang.org/x/net/http2"

	"github.com/amber-mesh/amber/internal/logkey"
)

// serverConn is the server end of an HBONE connection: it takes CONNECT
// requests and runs the Server's Handler for each (RFC 9113 §8.5).
type serverConn struct {
	*conn
	srv        *Server
	maxStreams uint32 // SETTINGS_MAX_CONCURRENT_STREAMS sent
	// ctx is the parent of the handlers' contexts; cancelled at teardown.
	ctx    context.Context
	cancel context.CancelFunc
	// slot is the connection's handshake slot, released once the client's
	// preface is complete or the connection ends. Owned by the reader
	// goroutine until then.
	slot *handshakeSlot

	handlers int // handlers running; guarded by conn.mu
}

func newServerConn(ctx context.Context, nc net.Conn, srv *Server, slot *handshakeSlot) *serverConn {
	c := &serverConn{conn: newConn(nc, srv.Settings, srv.stats, srv.log), srv: srv, maxStreams: srv.maxStreams(), slot: slot}
	c.side, c.isServer = c, true
	c.ctx, c.cancel = context.WithCancel(ctx)
	return c
}

func (c *serverConn) writePrefaceLocked() {
	_ = c.wfr.WriteSettings(c.cfg.frames(true, c.maxStreams)...)
}

func (c *serverConn) readPreface() error {
	// The server owns the handshake budget: the client preface and its
	// SETTINGS must arrive within it too, or a slow client could hold
	// the connection open without ever speaking HTTP/2.
	_ = c.nc.SetReadDeadline(time.Now().Add(c.srv.handshakeTimeout()))
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
	return nil
}

// prefaceDone: the preface is complete, so the handshake budget no longer
// applies and the peer no longer counts as unauthenticated.
func (c *serverConn) prefaceDone() {
	_ = c.nc.SetReadDeadline(time.Time{})
	c.slot.release()
}

func (c *serverConn) onHeaderBlock(hb *headerBlock) error {
	if !c.isPeerID(hb.streamID) {
		return c.protocolError(http2.ErrCodeProtocol, "HEADERS on a server stream id")
	}
	return c.onRequest(hb)
}

// peerGoAway: a client's GOAWAY refuses streams the server would open; we
// open none. Only an error code ends the connection.
func (c *serverConn) peerGoAway(ge *GoAwayError) error {
	if ge.Code != http2.ErrCodeNo {
		c.teardown(ge)
		return ge
	}
	return nil
}

func (c *serverConn) busyLocked() bool { return c.handlers > 0 }

func (c *serverConn) unusedLocked() {}

func (c *serverConn) tornDown() {
	c.slot.release()
	c.cancel()
}

// onRequest handles a complete request header block on the server.
func (c *serverConn) onRequest(hb *headerBlock) error {
	id := hb.streamID
	c.mu.Lock()
	if s := c.streams[id]; s != nil {
		return c.onTrailersLocked(s, hb)
	}
	defer c.mu.Unlock()
	if id <= c.maxPeerID {
		// RFC 9113 §5.1.1: new stream ids only grow; this one is closed.
		c.stats.ProtocolErrors.Add(1)
		return connError{http2.ErrCodeProtocol, "HEADERS on a closed stream"}
	}
	c.maxPeerID = id
	c.prioritiesEarn = min(c.prioritiesEarn+1, maxEarned)
	if !c.controlRoomLocked() {
		return c.controlFlood()
	}
	// Refusals are answered without creating the stream.
	refuse := func(code http2.ErrCode) error {
		_ = c.wfr.WriteRSTStream(id, code)
		c.signalWriter()
		return nil
	}
	respond := func(status int) error {
		c.writeHeadersLocked(id, statusFields(status), true)
		if !hb.endStream {
			// RFC 9113 §8.1: after a complete response the server may stop
			// the request with RST_STREAM(NO_ERROR).
			_ = c.wfr.WriteRSTStream(id, http2.ErrCodeNo)
		}
		c.signalWriter() // the reader never writes itself
		return nil
	}
	switch {
	case c.goAwaySent || c.closing:
		c.stats.StreamsRefused.Add(1)
		return refuse(http2.ErrCodeRefusedStream)
	case hb.tooLarge:
		c.stats.HeaderListTooLarge.Add(1)
		if err := c.streamErrorBudget(); err != nil {
			return err
		}
		return respond(http.StatusRequestHeaderFieldsTooLarge)
	case hb.invalid != nil, hb.selfDep:
		c.stats.BadRequests.Add(1)
		if err := c.streamErrorBudget(); err != nil {
			return err
		}
		return refuse(http2.ErrCodeProtocol)
	case uint32(len(c.streams)) >= c.maxStreams || c.handlers >= 2*int(c.maxStreams):
		// Handlers of streams the client already reset still count, so
		// resetting streams cannot start unbounded work (CVE-2023-44487).
		// A refusal costs no more than the HEADERS that caused it; a client
		// that sends them without reading the answers hits the control
		// backlog limit.
		c.stats.StreamsRefused.Add(1)
		return refuse(http2.ErrCodeRefusedStream)
	}
	// RFC 9113 §8.5: CONNECT carries :method and :authority only.
	addr, err := ParseAuthority(hb.authority)
	if hb.method != http.MethodConnect || hb.seen&(seenScheme|seenPath|seenProtocol) != 0 || err != nil {
		c.stats.BadRequests.Add(1)
		if err := c.streamErrorBudget(); err != nil {
			return err
		}
		return respond(http.StatusBadRequest)
	}
	s := c.newStreamLocked(id)
	s.recvEnded = hb.endStream
	if hb.endStream {
		s.rerr = io.EOF // a CONNECT that will send nothing: reads see EOF at once
	}
	c.handlers++
	req := &Request{
		Method:    hb.method,
		Authority: hb.authority,
		Addr:      addr,
		Header:    make(http.Header, len(hb.fields)),
		Conn:      c.nc,
	}
	for _, f := range hb.fields {
		req.Header.Add(http.CanonicalHeaderKey(f.Name), f.Value)
	}
	s.ctx, s.cancel = context.WithCancel(c.ctx)
	go c.serveStream(s, req)
	return nil
}

// serveStream runs the Handler for one CONNECT.
func (c *serverConn) serveStream(s *Stream, req *Request) {
	defer func() {
		if !s.released {
			c.handlerDone(s)
		}
	}()
	defer func() {
		if r := recover(); r != nil {
			if s.released {
				panic(r) // the caller's code after Release, not the handler's
			}
			// Fail closed: the stream is reset or closed by handlerDone.
			s.detached.Store(false)
			c.log.Error("hbone: handler panic", logkey.Panic, r, logkey.Stack, string(debug.Stack()))
		}
	}()
	c.srv.Handler.ServeHBONE(s.ctx, req, responder{s})
}

// handlerDone ends the stream of a returned handler: a handler that never
// answered gets its stream reset, an accepted stream is closed unless it
// was detached.
func (c *serverConn) handlerDone(s *Stream) {
	c.mu.Lock()
	if !s.responded && s.inMap {
		_ = c.resetLocked(s, http2.ErrCodeInternal)
	}
	c.mu.Unlock()
	if !s.detached.Load() {
		_ = s.Close()
	}
	s.cancel()
	// A detached stream may idle for long: it keeps no cancelled context.
	s.rmu.Lock()
	s.ctx, s.cancel = nil, nil
	s.rmu.Unlock()
	c.mu.Lock()
	c.handlers--
	c.slotFreedLocked()
	c.mu.Unlock()
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
