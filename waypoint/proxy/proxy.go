// Package proxy is amber-waypoint's data path: everything between a TCP
// connection accepted on :15008 and the application's response. It
// terminates HBONE, dispatches each CONNECT stream to a filter chain of
// the compiled configuration (waypoint/config), serves HTTP/1.1 and HTTP/2
// with prior knowledge inside the tunnel through RBAC, routing and the
// upstream clusters, or relays TCP, and opens HBONE to the chosen
// endpoint with the waypoint's own identity. docs/waypoint.md §10 says
// where it follows Envoy and where it deliberately does not.
package proxy

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/net/http2"

	"github.com/amber-mesh/amber/tunnel/certs"
	"github.com/amber-mesh/amber/tunnel/hbone"
	"github.com/amber-mesh/amber/tunnel/identity"
	"github.com/amber-mesh/amber/tunnel/relay"
	"github.com/amber-mesh/amber/waypoint/config"
	"github.com/amber-mesh/amber/waypoint/h2guard"
	"github.com/amber-mesh/amber/waypoint/telemetry"
	"github.com/amber-mesh/amber/xds/state"
)

// Errors of New and the serving methods.
var (
	ErrClosed     = fmt.Errorf("waypoint proxy: %w", net.ErrClosed)
	ErrNoStore    = errors.New("waypoint proxy: Config.Store is required")
	ErrNoCerts    = errors.New("waypoint proxy: Config.Certs is required")
	ErrNoIdentity = errors.New("waypoint proxy: Config.Identity is required")
)

// Config configures a Proxy. Store, Certs and Identity are required; the
// zero value of every other field is documented and usable.
type Config struct {
	// Store is workload discovery: the source and destination workloads
	// by address, and their identities.
	Store *state.Store
	// Certs issues the waypoint's own certificate (served on :15008 and
	// presented to destinations) and holds the mesh roots.
	Certs *certs.Manager
	// Identity is the waypoint's own SPIFFE identity.
	Identity identity.ID
	// Metrics receives istio_requests_*, istio_tcp_* (with the waypoint's
	// 23/25 labels) and amber_waypoint_*. It must not also hold
	// tunnel/metrics' istio_tcp_* families, whose label set is the
	// ztunnel's. Nil: a private registry (Registry returns it).
	Metrics prometheus.Registerer
	// Logger receives the access log (one line per request or TCP
	// connection) and operational messages. Nil: discarded.
	Logger *slog.Logger
	// Dial opens a TCP connection to addr: an endpoint's podIP:15008 for
	// HBONE, or a plain endpoint. Nil: a net.Dialer. The control side may
	// set one that binds the pod's address or sets a mark; tests map the
	// goldens' pod addresses to loopback listeners with it.
	Dial func(ctx context.Context, addr netip.AddrPort) (net.Conn, error)
	// Handshakes bound unauthenticated connections on :15008. The zero
	// value is tunnel/hbone's defaults.
	Handshakes hbone.HandshakeLimits
	// Limits bound what a client may send inside the tunnel.
	Limits Limits
	// Self is the proxy's own workload, as telemetry reports it for an
	// ingress gateway (reporter="source": the source_* labels).
	Self telemetry.Peer
	// Listen opens an ingress gateway's listen address. Nil: TCP.
	Listen func(ctx context.Context, addr netip.AddrPort) (net.Listener, error)
}

// Limits bound requests inside the tunnel. The zero value of each field is
// documented; where istiod configures nothing, they are amber's bounds.
type Limits struct {
	// MaxRequestHeaderBytes lowers the chain's max_request_headers_kb
	// (Envoy's default 60 KiB, which istiod keeps). Zero: the chain's.
	MaxRequestHeaderBytes int
	// MaxRequestBodyBytes bounds a request body: a larger declared
	// Content-Length is answered 413 before anything is forwarded, a
	// streamed body that grows past it ends the request (413 when no
	// response has started). Zero: no bound (Envoy streams bodies without
	// one).
	MaxRequestBodyBytes int64
	// RetryBufferBytes is how much of a request body is kept to replay on
	// a retry; a request whose body outgrew it is not retried once any
	// of it was sent. Zero: 64 KiB.
	RetryBufferBytes int
	// HeaderTimeout bounds reading a request's header inside the tunnel,
	// from its first byte (HTTP/1) or from the first frame of its header
	// block (HTTP/2), when the chain sets no request_headers_timeout.
	// Zero: 10 s. istiod sets none, and Envoy then waits as long as the
	// stream lives: amber bounds it against slowloris.
	HeaderTimeout time.Duration
	// MaxResponseHeaderBytes bounds an upstream response's header. Zero:
	// 60 KiB.
	MaxResponseHeaderBytes int
	// H2 bounds HTTP/2 abuse on the inner connection. The zero value is
	// h2guard's defaults; MaxHeaderBlock defaults to the header limit.
	H2 h2guard.Limits
}

func (l Limits) withDefaults() Limits {
	if l.RetryBufferBytes <= 0 {
		l.RetryBufferBytes = 64 << 10
	}
	if l.HeaderTimeout <= 0 {
		l.HeaderTimeout = 10 * time.Second
	}
	if l.MaxResponseHeaderBytes <= 0 {
		l.MaxResponseHeaderBytes = 60 << 10
	}
	if l.H2.HeaderTimeout <= 0 {
		l.H2.HeaderTimeout = l.HeaderTimeout
	}
	return l
}

// Proxy is the waypoint's data path. Create it with New, give it a
// configuration with Update and a listener with ServeHBONE.
type Proxy struct {
	cfg     Config
	lim     Limits
	log     *slog.Logger
	reg     prometheus.Registerer
	tel     *telemetry.Metrics
	counts  *counters
	cur     atomic.Pointer[snapshot]
	pool    *hbone.Pool
	hstats  hbone.Stats // the HBONE server's
	pstats  hbone.Stats // the HBONE client pool's
	ctx     context.Context
	cancel  context.CancelFunc
	closeMu sync.Once

	// The relays' Parker, opened for the first relay from a socket
	// (parkerFor); relaysWG counts the relays that have not ended.
	parkerOnce sync.Once
	parker     *relay.Parker
	relaysWG   sync.WaitGroup

	mu       sync.Mutex // guards the fields below
	servers  []*hbone.Server
	gateways map[netip.AddrPort]*gatewayListener
	clusters map[string]*clusterState
	conns    map[*downstream]struct{}
	relays   map[*relayed]struct{}
	draining bool
	closed   bool
}

// snapshot is one configuration as the data path uses it.
type snapshot struct {
	cfg *config.Config
	// trustDomains are those a client certificate may be in.
	trustDomains []string
}

// New returns a Proxy that refuses every stream until Update gives it a
// configuration.
func New(cfg Config) (*Proxy, error) {
	switch {
	case cfg.Store == nil:
		return nil, ErrNoStore
	case cfg.Certs == nil:
		return nil, ErrNoCerts
	case cfg.Identity.IsZero():
		return nil, ErrNoIdentity
	}
	p := &Proxy{
		cfg:      cfg,
		lim:      cfg.Limits.withDefaults(),
		log:      cfg.Logger,
		reg:      cfg.Metrics,
		clusters: map[string]*clusterState{},
		gateways: map[netip.AddrPort]*gatewayListener{},
		conns:    map[*downstream]struct{}{},
		relays:   map[*relayed]struct{}{},
	}
	if p.log == nil {
		p.log = slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	if p.reg == nil {
		p.reg = prometheus.NewRegistry()
	}
	if p.cfg.Listen == nil {
		p.cfg.Listen = defaultListen
	}
	if p.cfg.Dial == nil {
		var d net.Dialer
		p.cfg.Dial = func(ctx context.Context, a netip.AddrPort) (net.Conn, error) {
			return d.DialContext(ctx, "tcp", a.String())
		}
	}
	var err error
	if p.tel, err = telemetry.New(p.reg); err != nil {
		return nil, fmt.Errorf("waypoint proxy: metrics: %w", err)
	}
	if p.counts, err = newCounters(p); err != nil {
		return nil, fmt.Errorf("waypoint proxy: metrics: %w", err)
	}
	p.ctx, p.cancel = context.WithCancel(context.Background())
	p.pool = &hbone.Pool{Dial: p.dialHBONE, Stats: &p.pstats, Logger: p.log}
	return p, nil
}

// Registry returns the registry the metrics are registered with.
func (p *Proxy) Registry() prometheus.Registerer { return p.reg }

// Update installs c for new streams and the next request of every
// connection; requests already being served finish on the configuration
// they started with. Live TCP connections whose chain c no longer admits
// are closed.
func (p *Proxy) Update(c *config.Config) {
	s := &snapshot{cfg: c}
	if c != nil && c.Terminate != nil {
		s.trustDomains = c.Terminate.TrustDomains
	}
	if len(s.trustDomains) == 0 {
		// istiod always names the trust domain(s); without them only the
		// waypoint's own is accepted (Envoy's empty list would accept
		// any identity the roots signed).
		s.trustDomains = []string{p.cfg.Identity.TrustDomain}
	}
	p.cur.Store(s)
	p.counts.setDegraded(c)
	p.recheckTCP(s)
	p.syncGateways(c)
}

// config returns the current snapshot, nil before the first Update.
func (p *Proxy) snapshot() *snapshot { return p.cur.Load() }

// ServeHBONE serves HBONE on ln until Drain or Close, when it returns
// ErrClosed (which wraps net.ErrClosed, as does its error when ln is
// closed under it). The listener's HTTP/2 settings (streams per connection,
// keepalive) are those of the configuration current when it starts, or
// istiod's (100 streams, 10 s/20 s) before the first Update.
func (p *Proxy) ServeHBONE(ln net.Listener) error {
	srv := &hbone.Server{
		TLSConfig:            p.serverTLS(),
		HandshakeLimits:      p.cfg.Handshakes,
		Handler:              hbone.HandlerFunc(p.serveConnect),
		MaxConcurrentStreams: 100,
		Settings:             hbone.Settings{PingInterval: 10 * time.Second, PingTimeout: 20 * time.Second},
		Stats:                &p.hstats,
		Logger:               p.log,
	}
	if s := p.snapshot(); s != nil && s.cfg != nil && s.cfg.Terminate != nil {
		t := s.cfg.Terminate
		if t.MaxConcurrentStreams > 0 {
			srv.MaxConcurrentStreams = t.MaxConcurrentStreams
		}
		switch {
		case t.KeepaliveInterval > 0:
			srv.Settings.PingInterval, srv.Settings.PingTimeout = t.KeepaliveInterval, t.KeepaliveTimeout
		default:
			srv.Settings.PingInterval = -1
		}
	}
	p.mu.Lock()
	if p.closed || p.draining {
		p.mu.Unlock()
		return ErrClosed
	}
	p.servers = append(p.servers, srv)
	p.mu.Unlock()
	err := srv.Serve(ln)
	if errors.Is(err, hbone.ErrServerClosed) {
		return ErrClosed
	}
	return err
}

// serverTLS is :15008's TLS: the waypoint's certificate, a client
// certificate required that chains to the mesh roots and names an
// identity in one of the trust domains of the configuration current at
// the handshake.
func (p *Proxy) serverTLS() *tls.Config {
	own := p.cfg.Identity
	certFor := func(net.Addr) (identity.ID, error) { return own, nil }
	return &tls.Config{
		MinVersion: tls.VersionTLS13,
		NextProtos: []string{http2.NextProtoTLS},
		GetConfigForClient: func(*tls.ClientHelloInfo) (*tls.Config, error) {
			tds := []string{own.TrustDomain}
			if s := p.snapshot(); s != nil {
				tds = s.trustDomains
			}
			return p.cfg.Certs.ServerConfig(certFor, own.TrustDomain, tds...), nil
		},
	}
}

// Drain stops accepting connections, asks HTTP/2 clients to go away
// (GOAWAY on both the HBONE and the inner connections), closes idle
// HTTP/1 connections and ends the others after their current response,
// and waits for streams to finish until ctx ends; then it closes what
// remains and returns ctx's error. An ingress gateway's listeners keep
// accepting until ctx ends (each response saying Connection: close),
// and Drain returns only then.
func (p *Proxy) Drain(ctx context.Context) error {
	p.mu.Lock()
	p.draining = true
	servers := append([]*hbone.Server(nil), p.servers...)
	conns := make([]*downstream, 0, len(p.conns))
	for d := range p.conns {
		conns = append(conns, d)
	}
	gateways := len(p.gateways)
	p.mu.Unlock()
	for _, d := range conns {
		d.drain()
	}
	if gateways > 0 {
		// An ingress gateway keeps accepting for the whole drain, as
		// Envoy's listeners do while pilot-agent drains: clients still
		// sent here until the endpoint is gone get their answer, with
		// Connection: close (GOAWAY for HTTP/2), instead of a refusal.
		<-ctx.Done()
		p.closeGateways()
		p.mu.Lock()
		late := make([]*downstream, 0, len(p.conns))
		for d := range p.conns {
			late = append(late, d)
		}
		p.mu.Unlock()
		for _, d := range late {
			d.drain()
		}
	}
	var errs []error
	for _, s := range servers {
		if err := s.Shutdown(ctx); err != nil && !errors.Is(err, hbone.ErrServerClosed) {
			errs = append(errs, err)
		}
	}
	if gateways > 0 {
		errs = append(errs, ctx.Err())
	}
	return errors.Join(errs...)
}

// Close closes listeners, connections and upstream pools at once, and
// waits for the relays it closed to end.
func (p *Proxy) Close() error {
	var errs []error
	p.closeMu.Do(func() {
		p.mu.Lock()
		p.closed = true
		servers := p.servers
		clusters := p.clusters
		relays := make([]*relayed, 0, len(p.relays))
		for r := range p.relays {
			relays = append(relays, r)
		}
		p.mu.Unlock()
		p.cancel()
		p.closeGateways()
		for _, r := range relays {
			r.pair.Close(ErrClosed)
		}
		for _, s := range servers {
			if err := s.Close(); err != nil && !errors.Is(err, hbone.ErrServerClosed) {
				errs = append(errs, err)
			}
		}
		if err := p.pool.Close(); err != nil {
			errs = append(errs, err)
		}
		for _, c := range clusters {
			c.closeIdle()
		}
		// A relay still parked would never wake once its Parker is gone.
		p.relaysWG.Wait()
		p.parkerOnce.Do(func() {}) // none opened from now on
		if p.parker != nil {
			errs = append(errs, p.parker.Close())
		}
	})
	return errors.Join(errs...)
}

// track registers a live inner connection; false when the proxy is
// closed.
func (p *Proxy) track(d *downstream) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		return false
	}
	p.conns[d] = struct{}{}
	return true
}

func (p *Proxy) untrack(d *downstream) {
	p.mu.Lock()
	delete(p.conns, d)
	p.mu.Unlock()
}

func (p *Proxy) isDraining() bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.draining || p.closed
}
