package hbone

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"slices"
	"sync"
	"time"

	"golang.org/x/net/http2"
)

// Request is a CONNECT request the Server accepted for its Handler.
type Request struct {
	Method    string         // always CONNECT: the server answers anything else with 400
	Authority string         // the :authority as sent
	Addr      netip.AddrPort // Authority parsed by ParseAuthority
	// Header holds the regular header fields (forwarded, baggage,
	// traceparent, ...) in canonical form.
	Header http.Header
	// Conn is the connection the stream arrived on: for a transparent
	// listener LocalAddr is the original destination, and a *tls.Conn
	// carries the peer's certificate in ConnectionState.
	Conn net.Conn
}

// Handler serves CONNECT streams. ServeHBONE runs in its own goroutine per
// stream; the stream is closed when it returns. ctx is cancelled when the
// client resets the stream or the connection ends.
type Handler interface {
	ServeHBONE(ctx context.Context, req *Request, rw Responder)
}

// HandlerFunc adapts a function to Handler.
type HandlerFunc func(ctx context.Context, req *Request, rw Responder)

func (f HandlerFunc) ServeHBONE(ctx context.Context, req *Request, rw Responder) {
	f(ctx, req, rw)
}

// Server accepts HBONE connections. It owns the TLS handshake so that it
// can bound it; the TLSConfig decides which client certificates are
// accepted.
type Server struct {
	// TLSConfig is required by Serve. "h2" is added to NextProtos when
	// missing, and connections that do not negotiate h2 are closed.
	TLSConfig *tls.Config
	// HandshakeTimeout bounds the TLS handshake plus the HTTP/2 preface.
	// Zero means 10s.
	HandshakeTimeout time.Duration
	// Handler serves accepted CONNECT requests. Required.
	Handler Handler
	// MaxConcurrentStreams is advertised as SETTINGS_MAX_CONCURRENT_STREAMS
	// per connection; streams beyond it are refused. Zero means 100.
	MaxConcurrentStreams uint32
	// Settings are the HTTP/2 parameters. The zero value is ztunnel's.
	Settings Settings
	// Stats, if set, receives the server's counters.
	Stats *Stats
	// Logger, if set, receives debug logs about failed connections.
	Logger *slog.Logger

	initOnce sync.Once
	ctx      context.Context // cancelled by Close
	cancel   context.CancelFunc
	tlsConf  *tls.Config
	stats    *Stats
	log      *slog.Logger

	mu        sync.Mutex // guards the fields below
	listeners map[net.Listener]struct{}
	raw       map[net.Conn]struct{} // connections in their TLS handshake
	conns     map[*conn]struct{}
	changed   chan struct{} // closed and replaced when a connection ends
	down      bool
}

func (srv *Server) init() {
	srv.initOnce.Do(func() {
		srv.ctx, srv.cancel = context.WithCancel(context.Background())
		srv.stats = srv.Stats
		if srv.stats == nil {
			srv.stats = new(Stats)
		}
		srv.log = srv.Logger
		if srv.log == nil {
			srv.log = slog.New(slog.DiscardHandler)
		}
		if srv.TLSConfig != nil {
			srv.tlsConf = srv.TLSConfig.Clone()
			if !slices.Contains(srv.tlsConf.NextProtos, http2.NextProtoTLS) {
				srv.tlsConf.NextProtos = append(srv.tlsConf.NextProtos, http2.NextProtoTLS)
			}
		}
		srv.listeners = make(map[net.Listener]struct{})
		srv.raw = make(map[net.Conn]struct{})
		srv.conns = make(map[*conn]struct{})
		srv.changed = make(chan struct{})
	})
}

func (srv *Server) handshakeTimeout() time.Duration {
	if srv.HandshakeTimeout > 0 {
		return srv.HandshakeTimeout
	}
	return 10 * time.Second
}

func (srv *Server) maxStreams() uint32 {
	if srv.MaxConcurrentStreams > 0 {
		return srv.MaxConcurrentStreams
	}
	return 100
}

// Serve accepts connections on ln until Shutdown or Close, when it returns
// ErrServerClosed.
func (srv *Server) Serve(ln net.Listener) error {
	srv.init()
	if srv.tlsConf == nil {
		return errors.New("hbone: serve: Server.TLSConfig is nil")
	}
	if srv.Handler == nil {
		return errors.New("hbone: serve: Server.Handler is nil")
	}
	srv.mu.Lock()
	if srv.down {
		srv.mu.Unlock()
		return ErrServerClosed
	}
	srv.listeners[ln] = struct{}{}
	srv.mu.Unlock()
	defer func() {
		srv.mu.Lock()
		delete(srv.listeners, ln)
		srv.mu.Unlock()
	}()
	var delay time.Duration
	for {
		nc, err := ln.Accept()
		if err != nil {
			srv.mu.Lock()
			down := srv.down
			srv.mu.Unlock()
			if down {
				return ErrServerClosed
			}
			if errors.Is(err, net.ErrClosed) {
				return fmt.Errorf("hbone: accept: %w", err)
			}
			// Out of file descriptors and the like: back off and retry.
			delay = min(max(2*delay, 5*time.Millisecond), time.Second)
			srv.log.Debug("hbone: accept failed", "error", err, "retry_in", delay)
			select {
			case <-time.After(delay):
			case <-srv.ctx.Done():
				return ErrServerClosed
			}
			continue
		}
		delay = 0
		go srv.serveTLS(nc)
	}
}

// serveTLS runs the TLS handshake for an accepted connection, bounded by
// HandshakeTimeout, then serves HTTP/2 on it.
func (srv *Server) serveTLS(nc net.Conn) {
	srv.mu.Lock()
	if srv.down {
		srv.mu.Unlock()
		_ = nc.Close()
		return
	}
	srv.raw[nc] = struct{}{}
	srv.mu.Unlock()
	untrack := func() {
		srv.mu.Lock()
		delete(srv.raw, nc)
		srv.mu.Unlock()
	}

	_ = nc.SetDeadline(time.Now().Add(srv.handshakeTimeout()))
	tc := tls.Server(&batchConn{Conn: nc}, srv.tlsConf)
	err := tc.HandshakeContext(srv.ctx)
	if err == nil && tc.ConnectionState().NegotiatedProtocol != http2.NextProtoTLS {
		err = errors.New("ALPN did not negotiate h2")
	}
	if err != nil {
		untrack()
		var ne net.Error
		if errors.As(err, &ne) && ne.Timeout() {
			srv.stats.HandshakeTimeouts.Add(1)
		} else {
			srv.stats.HandshakeErrors.Add(1)
		}
		srv.log.Debug("hbone: TLS handshake failed", "remote", nc.RemoteAddr(), "error", err)
		_ = nc.Close()
		return
	}
	_ = nc.SetDeadline(time.Time{})
	untrack()
	if err := srv.ServeConn(srv.ctx, tc); err != nil {
		srv.log.Debug("hbone: connection ended", "remote", nc.RemoteAddr(), "error", err)
	}
}

// ServeConn serves HTTP/2 on nc, which must already be established (TLS
// with h2 negotiated, or a test's plain connection), until the connection
// ends. Cancelling ctx closes it, and cancels the handlers' contexts.
func (srv *Server) ServeConn(ctx context.Context, nc net.Conn) error {
	srv.init()
	if srv.Handler == nil {
		_ = nc.Close()
		return errors.New("hbone: serve: Server.Handler is nil")
	}
	c := newConn(nc, srv.Settings, srv.stats, srv.log)
	c.server = srv
	c.maxStreams = srv.maxStreams()
	c.ctx, c.cancel = context.WithCancel(ctx)

	srv.mu.Lock()
	if srv.down {
		srv.mu.Unlock()
		_ = nc.Close()
		return ErrServerClosed
	}
	srv.conns[c] = struct{}{}
	srv.mu.Unlock()

	cancelled := func() {
		err := context.Cause(ctx)
		if srv.ctx.Err() != nil {
			err = ErrServerClosed // ctx may be srv.ctx, or cancelled with it
		}
		c.teardown(err)
	}
	stopCtx := context.AfterFunc(ctx, cancelled)
	stopSrv := context.AfterFunc(srv.ctx, cancelled)
	c.start()
	<-c.torn
	<-c.readDone
	<-c.writeDone
	stopCtx()
	stopSrv()

	srv.mu.Lock()
	delete(srv.conns, c)
	close(srv.changed)
	srv.changed = make(chan struct{})
	srv.mu.Unlock()

	c.mu.Lock()
	err := c.err
	c.mu.Unlock()
	var ge *GoAwayError
	if errors.Is(err, ErrConnClosed) || errors.Is(err, io.EOF) || errors.Is(err, ErrServerClosed) ||
		errors.As(err, &ge) && ge.Code == http2.ErrCodeNo {
		return nil
	}
	return err
}

// Shutdown stops accepting connections, sends GOAWAY on every connection
// and waits for their streams to finish (RFC 9113 §6.8). When ctx ends
// first, the remaining connections are closed and ctx's error returned.
func (srv *Server) Shutdown(ctx context.Context) error {
	srv.init()
	err := srv.stop()
	srv.mu.Lock()
	conns := make([]*conn, 0, len(srv.conns))
	for c := range srv.conns {
		conns = append(conns, c)
	}
	srv.mu.Unlock()
	for _, c := range conns {
		c.goAway()
	}
	for {
		srv.mu.Lock()
		n, changed := len(srv.conns), srv.changed
		srv.mu.Unlock()
		if n == 0 {
			return err
		}
		select {
		case <-changed:
		case <-ctx.Done():
			return errors.Join(err, srv.Close(), ctx.Err())
		}
	}
}

// Close closes listeners and connections at once; streams fail with
// ErrServerClosed.
func (srv *Server) Close() error {
	srv.init()
	err := srv.stop()
	srv.cancel()
	for {
		srv.mu.Lock()
		n, changed := len(srv.conns), srv.changed
		srv.mu.Unlock()
		if n == 0 {
			return err
		}
		<-changed
	}
}

// stop marks the server down and closes its listeners and handshaking
// connections.
func (srv *Server) stop() error {
	srv.mu.Lock()
	defer srv.mu.Unlock()
	srv.down = true
	var errs []error
	for ln := range srv.listeners {
		if err := ln.Close(); err != nil && !errors.Is(err, net.ErrClosed) {
			errs = append(errs, fmt.Errorf("hbone: close listener: %w", err))
		}
	}
	for nc := range srv.raw {
		_ = nc.Close()
	}
	return errors.Join(errs...)
}
