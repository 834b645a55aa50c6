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
	"os"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/net/http2"

	"github.com/amber-mesh/amber/internal/logkey"
	"github.com/amber-mesh/amber/tunnel/accept"
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

// Server accepts HBONE connections. It owns the TLS handshake so that it
// can bound it; the TLSConfig decides which client certificates are
// accepted.
//
// Until a connection has completed the TLS handshake and the HTTP/2
// preface its peer is unauthenticated, and anyone who can route to the
// port can open such connections: they are bounded in time (HelloTimeout,
// HandshakeTimeout) and in number, all sources together and per source
// address. A connection over either bound is reset at once, before it
// costs a goroutine or a TLS state.
type Server struct {
	// TLSConfig is required by Serve. "h2" is added to NextProtos when
	// missing, and connections that do not negotiate h2 are closed.
	TLSConfig *tls.Config
	// HandshakeTimeout bounds the TLS handshake plus the HTTP/2 preface.
	// Zero means 10s.
	HandshakeTimeout time.Duration
	// HandshakeLimits bound unauthenticated connections further.
	HandshakeLimits
	// Handler serves accepted CONNECT requests. Required.
	Handler Handler
	// MaxConcurrentStreams is advertised as SETTINGS_MAX_CONCURRENT_STREAMS
	// per connection; streams beyond it are refused. Zero means 100.
	MaxConcurrentStreams uint32
	// Settings are the HTTP/2 parameters. The zero value is ztunnel's.
	Settings Settings
	// Stats, if set, receives the server's counters.
	Stats *Stats
	// Logger, if set, receives debug logs about failed connections and,
	// from Serve, a warning per burst of failed accepts.
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
	conns     map[*serverConn]struct{}
	changed   chan struct{} // closed and replaced when a connection ends
	down      bool
	pending   int                // connections before the end of their preface
	bySource  map[netip.Addr]int // pending, by client address
}

// HandshakeLimits bound the connections a Server holds before they are
// authenticated: accepted, but without a completed TLS handshake and
// HTTP/2 preface. The zero value is the defaults.
type HandshakeLimits struct {
	// HelloTimeout bounds the wait for the client's first bytes (its TLS
	// ClientHello, which every TLS client sends right after the TCP
	// handshake); a connection that sends nothing is reset then. Zero
	// means 2s; it never exceeds the Server's HandshakeTimeout.
	HelloTimeout time.Duration
	// MaxHandshakes bounds such connections, all sources together. Zero
	// means DefaultMaxHandshakes; negative means no bound.
	MaxHandshakes int
	// MaxHandshakesPerSource bounds them per client IP address (each
	// IPv6 address on its own). Zero means DefaultMaxHandshakesPerSource;
	// negative means no bound.
	MaxHandshakesPerSource int
}

// Defaults of the handshake bounds. A ztunnel's HBONE clients are other
// ztunnels (one per node, dialling from the node's address) and waypoints,
// each completing its handshakes within milliseconds; 256 at once from one
// address leaves room for a node or a waypoint connecting to hundreds of
// pods at the same moment, and it takes 16 addresses to fill the global
// bound. An unauthenticated connection costs ≈ 6 KiB while it has sent
// nothing and ≈ 37 KiB once its TLS handshake runs (the handshake
// goroutine's stack and TLS state; measured on the testbed), so 4096 cost
// at most ≈ 150 MiB, well within the ztunnel's memory limit.
const (
	DefaultMaxHandshakes          = 4096
	DefaultMaxHandshakesPerSource = 256
	defaultHelloTimeout           = 2 * time.Second
)

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
		srv.conns = make(map[*serverConn]struct{})
		srv.bySource = make(map[netip.Addr]int)
		srv.changed = make(chan struct{})
	})
}

func (srv *Server) handshakeTimeout() time.Duration {
	if srv.HandshakeTimeout > 0 {
		return srv.HandshakeTimeout
	}
	return 10 * time.Second
}

func (srv *Server) helloTimeout() time.Duration {
	t := defaultHelloTimeout
	if srv.HelloTimeout > 0 {
		t = srv.HelloTimeout
	}
	return min(t, srv.handshakeTimeout())
}

// bound resolves a limit: zero means def, negative means none (0).
func bound(v, def int) int {
	switch {
	case v == 0:
		return def
	case v < 0:
		return 0
	}
	return v
}

func (srv *Server) maxStreams() uint32 {
	if srv.MaxConcurrentStreams > 0 {
		return srv.MaxConcurrentStreams
	}
	return 100
}

// Serve accepts connections on ln until Shutdown or Close, when it returns
// ErrServerClosed. A failed accept (out of file descriptors and the like)
// is retried with backoff, as package accept does for every listener of
// the ztunnel.
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
	err := accept.Serve(srv.ctx, ln, accept.Options{Name: "hbone", Logger: srv.log}, srv.ServeAccepted)
	srv.mu.Lock()
	down := srv.down
	srv.mu.Unlock()
	if down || srv.ctx.Err() != nil {
		return ErrServerClosed
	}
	return fmt.Errorf("hbone: accept: %w", err)
}

// ServeAccepted serves a connection accepted on a listener the caller
// runs: it applies the handshake bounds at once, on the caller's
// goroutine, and then runs the TLS handshake and HTTP/2 on a goroutine of
// its own. It does not block. A connection over the bounds is reset.
func (srv *Server) ServeAccepted(nc net.Conn) {
	srv.init()
	if srv.tlsConf == nil || srv.Handler == nil {
		_ = nc.Close()
		return
	}
	slot, ok := srv.admit(nc)
	if !ok {
		return
	}
	go srv.serveTLS(nc, slot)
}

// handshakeSlot is a connection's place among the unauthenticated ones;
// release gives it back, once.
type handshakeSlot struct {
	srv  *Server
	src  netip.Addr
	once sync.Once
}

func (h *handshakeSlot) release() {
	if h == nil {
		return
	}
	h.once.Do(func() {
		srv := h.srv
		srv.mu.Lock()
		defer srv.mu.Unlock()
		srv.pending--
		if n := srv.bySource[h.src] - 1; n > 0 {
			srv.bySource[h.src] = n
		} else {
			delete(srv.bySource, h.src)
		}
	})
}

// admit takes a handshake slot for nc, or resets nc when the server is
// down or a bound is reached.
func (srv *Server) admit(nc net.Conn) (*handshakeSlot, bool) {
	src := remoteAddr(nc)
	srv.mu.Lock()
	var refused *atomic.Uint64
	limit, perSource := bound(srv.MaxHandshakes, DefaultMaxHandshakes), bound(srv.MaxHandshakesPerSource, DefaultMaxHandshakesPerSource)
	switch {
	case srv.down:
		srv.mu.Unlock()
		_ = nc.Close()
		return nil, false
	case perSource > 0 && srv.bySource[src] >= perSource:
		refused = &srv.stats.HandshakesRefusedPerSource
	case limit > 0 && srv.pending >= limit:
		refused = &srv.stats.HandshakesRefused
	default:
		srv.pending++
		srv.bySource[src]++
		srv.mu.Unlock()
		return &handshakeSlot{srv: srv, src: src}, true
	}
	srv.mu.Unlock()
	refused.Add(1)
	resetClose(nc)
	return nil, false
}

// remoteAddr is nc's peer address, unmapped; the zero Addr if unknown.
func remoteAddr(nc net.Conn) netip.Addr {
	if ta, ok := nc.RemoteAddr().(*net.TCPAddr); ok {
		return ta.AddrPort().Addr().Unmap()
	}
	return netip.Addr{}
}

// resetClose closes nc with a TCP reset (SO_LINGER 0): nothing is owed to
// a connection refused before it said anything, and a reset leaves no
// TIME_WAIT socket behind on this side.
func resetClose(nc net.Conn) {
	if tc, ok := nc.(*net.TCPConn); ok {
		_ = tc.SetLinger(0)
	}
	_ = nc.Close()
}

// serveTLS runs the TLS handshake for an accepted connection, bounded by
// HelloTimeout until the first bytes and HandshakeTimeout in all, then
// serves HTTP/2 on it.
func (srv *Server) serveTLS(nc net.Conn, slot *handshakeSlot) {
	srv.mu.Lock()
	if srv.down {
		srv.mu.Unlock()
		slot.release()
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

	start := time.Now()
	_ = nc.SetDeadline(start.Add(srv.helloTimeout()))
	// Wait for the ClientHello holding no TLS state: a client that opens
	// connections and sends nothing costs little, and not for long.
	if err := awaitInput(nc); err != nil {
		untrack()
		slot.release()
		if errors.Is(err, os.ErrDeadlineExceeded) {
			srv.stats.HelloTimeouts.Add(1)
			resetClose(nc)
			return
		}
		_ = nc.Close()
		return
	}
	_ = nc.SetDeadline(start.Add(srv.handshakeTimeout()))
	tc := tls.Server(newBatchConn(nc), srv.tlsConf)
	err := tc.HandshakeContext(srv.ctx)
	if err == nil && tc.ConnectionState().NegotiatedProtocol != http2.NextProtoTLS {
		err = errors.New("ALPN did not negotiate h2")
	}
	if err != nil {
		untrack()
		slot.release()
		var ne net.Error
		if errors.As(err, &ne) && ne.Timeout() {
			srv.stats.HandshakeTimeouts.Add(1)
		} else {
			srv.stats.HandshakeErrors.Add(1)
		}
		srv.log.Debug("hbone: TLS handshake failed", logkey.Remote, nc.RemoteAddr(), logkey.Error, err)
		_ = nc.Close()
		return
	}
	_ = nc.SetDeadline(time.Time{})
	untrack()
	// The slot is released once the client's preface is read (or the
	// connection fails before).
	if err := srv.serveConn(srv.ctx, tc, slot); err != nil {
		srv.log.Debug("hbone: connection ended", logkey.Remote, nc.RemoteAddr(), logkey.Error, err)
	}
}

// ServeConn serves HTTP/2 on nc, which must already be established (TLS
// with h2 negotiated, or a test's plain connection), until the connection
// ends. Cancelling ctx closes it, and cancels the handlers' contexts.
func (srv *Server) ServeConn(ctx context.Context, nc net.Conn) error {
	return srv.serveConn(ctx, nc, nil)
}

func (srv *Server) serveConn(ctx context.Context, nc net.Conn, slot *handshakeSlot) error {
	srv.init()
	if srv.Handler == nil {
		slot.release()
		_ = nc.Close()
		return errors.New("hbone: serve: Server.Handler is nil")
	}
	c := newServerConn(ctx, nc, srv, slot)

	srv.mu.Lock()
	if srv.down {
		srv.mu.Unlock()
		slot.release()
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

// GoAway sends GOAWAY on every connection open now, which then ends once
// its streams are done, and goes on accepting new connections: the first
// half of a graceful drain, while clients that have not heard that this
// server is going away still dial it (RFC 9113 §6.8). Shutdown is the
// second half.
func (srv *Server) GoAway() {
	srv.init()
	srv.mu.Lock()
	conns := make([]*serverConn, 0, len(srv.conns))
	for c := range srv.conns {
		conns = append(conns, c)
	}
	srv.mu.Unlock()
	for _, c := range conns {
		c.goAway()
	}
}

// Shutdown stops accepting connections, sends GOAWAY on every connection
// and waits for their streams to finish (RFC 9113 §6.8). When ctx ends
// first, the remaining connections are closed and ctx's error returned.
func (srv *Server) Shutdown(ctx context.Context) error {
	srv.init()
	err := srv.stop()
	srv.GoAway()
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
