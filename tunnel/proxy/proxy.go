// Package proxy is the ztunnel's data plane: it serves the transparent
// outbound (15001), inbound plaintext (15006) and inbound HBONE (15008)
// listeners, resolves workloads and services from the xDS state, carries
// mesh traffic over HBONE with workload certificates, enforces L4
// authorization at the destination and reports every connection as Istio
// metrics and an access-log line.
package proxy

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"github.com/amber-mesh/amber/internal/logkey"
	"github.com/amber-mesh/amber/tunnel/accept"
	"github.com/amber-mesh/amber/tunnel/certs"
	"github.com/amber-mesh/amber/tunnel/hbone"
	"github.com/amber-mesh/amber/tunnel/identity"
	"github.com/amber-mesh/amber/tunnel/metrics"
	"github.com/amber-mesh/amber/tunnel/relay"
	"github.com/amber-mesh/amber/tunnel/sockopt"
	"github.com/amber-mesh/amber/xds/state"
)

// Default ports: Istio's (docs/facts.md §3, Ports; ARCHITECTURE.md, Ports).
const (
	DefaultOutboundPort  = 15001
	DefaultInboundPort   = 15006
	DefaultHBONEPort     = 15008
	DefaultAdminPort     = 15000
	DefaultMetricsPort   = 15020
	DefaultReadinessPort = 15021
)

// Sentinel errors.
var (
	ErrClosed = errors.New("proxy closed")
	ErrNoCA   = errors.New("proxy: Config.Certs is required")
	ErrNoData = errors.New("proxy: Config.Store is required")
)

// Config configures a Proxy.
type Config struct {
	// Store is the mesh state kept by the xDS client. Required.
	Store *state.Store
	// Certs provides workload certificates for HBONE. Required.
	Certs *certs.Manager
	// TrustDomain is the only trust domain HBONE peers may come from.
	// Zero means state.DefaultTrustDomain.
	TrustDomain string
	// NodeName selects the workloads this ztunnel serves (Workload.Node).
	// Zero means every workload in the store is local (single-node
	// setups and tests).
	NodeName string
	// Metrics receives the istio_tcp_* metrics. Nil means a private
	// registry (see Proxy.Metrics).
	Metrics *metrics.Metrics
	// Logger receives the access log (one Info line per connection) and
	// errors. Nil discards them.
	Logger *slog.Logger
	// Sockets are the options of every socket the proxy dials. The zero
	// value marks them with the bypass mark and binds the client's address
	// towards applications (needs CAP_NET_ADMIN).
	Sockets sockopt.Options
	// HBONEPort is the port HBONE is dialled on at destination pods.
	// Zero means DefaultHBONEPort.
	HBONEPort uint16
	// Captured reports whether the node's datapath captures an address:
	// a pod of this node whose connections this ztunnel checks. A plain
	// TCP connection to it is passed through this ztunnel's inbound
	// checks in process (see dialLocalInbound), never dialled directly.
	// Nil means nothing is captured (no datapath).
	Captured func(netip.Addr) bool
	// ReservedPorts are refused as CONNECT targets in addition to the
	// default ztunnel ports (15000, 15001, 15006, 15008, 15020, 15021):
	// a tunnel must never reach the ztunnel itself.
	ReservedPorts []uint16
	// WorkloadWait is how long a connection from a local address the
	// control plane has not described yet waits for it before it is
	// refused. Zero means it is refused at once.
	WorkloadWait time.Duration
	// ConnectTimeout bounds connecting upstream (TCP dial or HBONE
	// CONNECT). Zero means 10s.
	ConnectTimeout time.Duration
	// Handshakes bound unauthenticated connections on the HBONE
	// listener. The zero value is hbone's defaults.
	Handshakes hbone.HandshakeLimits
}

// Stats counts what the proxy refused, by cause.
type Stats struct {
	UnknownSource   atomic.Uint64 // outbound from an address no local workload owns
	NoRoute         atomic.Uint64 // outbound to a service without endpoints, or an unusable waypoint
	UpstreamErrors  atomic.Uint64 // dial or CONNECT towards the destination failed
	ClientCancelled atomic.Uint64 // inbound CONNECT reset by its client (or its connection gone) before the answer: flag DC
	BadRequests     atomic.Uint64 // inbound CONNECT refused with 400
	UnknownDest     atomic.Uint64 // inbound to an address no local workload owns
	AuthzDenied     atomic.Uint64 // inbound refused by policy
	// AuthzRejectedPolicy counts inbound connections refused by the
	// stand-in of a policy the xDS client rejected (enforced fail-closed,
	// tunnel/authz); they are not in AuthzDenied.
	AuthzRejectedPolicy atomic.Uint64
	AuthzRevoked        atomic.Uint64 // live connections closed after a policy change
	HandshakeErrors     atomic.Uint64 // outbound HBONE TLS handshakes that failed
	// NotCaptured counts connections reset at accept on the outbound or
	// inbound listener because they were addressed to the listener's own
	// port: made to the ztunnel directly, not captured (see captured).
	NotCaptured atomic.Uint64
}

// Proxy is a running data plane. Create it with New; Close stops it.
type Proxy struct {
	cfg      Config
	log      *slog.Logger
	metrics  *metrics.Metrics
	stats    Stats
	hstats   hbone.Stats
	accepts  [numListeners]accept.Stats
	pool     *hbone.Pool
	server   *hbone.Server
	reserved map[uint16]bool
	parker   *relay.Parker // nil: idle connections keep their goroutines
	ctx      context.Context
	cancel   context.CancelFunc
	wg       sync.WaitGroup
	draining atomic.Bool // Drain closed the listeners

	mu        sync.Mutex // guards the fields below
	listeners map[net.Listener]struct{}
	conns     map[*conn]struct{}
	closed    bool

	peers peers // of the HBONE connections with live inbound streams
}

// New returns a proxy and starts re-checking its live inbound connections
// when cfg.Store's policies or workloads change.
func New(cfg Config) (*Proxy, error) {
	if cfg.Store == nil {
		return nil, ErrNoData
	}
	if cfg.Certs == nil {
		return nil, ErrNoCA
	}
	if cfg.TrustDomain == "" {
		cfg.TrustDomain = state.DefaultTrustDomain
	}
	if cfg.HBONEPort == 0 {
		cfg.HBONEPort = DefaultHBONEPort
	}
	if cfg.ConnectTimeout <= 0 {
		cfg.ConnectTimeout = 10 * time.Second
	}
	p := &Proxy{
		cfg:       cfg,
		log:       cfg.Logger,
		metrics:   cfg.Metrics,
		listeners: make(map[net.Listener]struct{}),
		conns:     make(map[*conn]struct{}),
		reserved:  make(map[uint16]bool),
	}
	if p.log == nil {
		p.log = slog.New(slog.DiscardHandler)
	}
	if p.metrics == nil {
		p.metrics = metrics.New()
	}
	for _, port := range []uint16{DefaultAdminPort, DefaultOutboundPort, DefaultInboundPort, DefaultHBONEPort, DefaultMetricsPort, DefaultReadinessPort, cfg.HBONEPort} {
		p.reserved[port] = true
	}
	for _, port := range cfg.ReservedPorts {
		p.reserved[port] = true
	}
	p.ctx, p.cancel = context.WithCancel(context.Background())
	p.pool = &hbone.Pool{Dial: p.dialHBONE, Stats: &p.hstats, Logger: p.log}
	p.server = &hbone.Server{
		TLSConfig:       cfg.Certs.ServerConfig(p.certFor, cfg.TrustDomain),
		HandshakeLimits: cfg.Handshakes,
		Handler:         hbone.HandlerFunc(p.serveHBONE),
		Stats:           &p.hstats,
		Logger:          p.log,
	}
	if pk, err := relay.NewParker(); err != nil {
		p.log.Warn("idle connections will keep their goroutines", logkey.Error, err)
	} else {
		p.parker = pk
	}
	sub := cfg.Store.Subscribe()
	p.wg.Add(1)
	go p.watchPolicies(sub)
	return p, nil
}

// Metrics returns the registry the proxy reports to.
func (p *Proxy) Metrics() *metrics.Metrics { return p.metrics }

// Stats returns the proxy's refusal counters.
func (p *Proxy) Stats() *Stats { return &p.stats }

// HBONEStats returns the counters of the HBONE client pool and server.
func (p *Proxy) HBONEStats() *hbone.Stats { return &p.hstats }

// The data plane's listeners, for accept statistics.
const (
	listenerOutbound = iota
	listenerInbound
	listenerHBONE
	numListeners
)

var listenerNames = [numListeners]string{"outbound", "inbound", "hbone"}

// AcceptErrors returns the failed accepts by listener ("outbound",
// "inbound", "hbone") and errno.
func (p *Proxy) AcceptErrors() map[string]map[string]uint64 {
	out := make(map[string]map[string]uint64, numListeners)
	for i := range p.accepts {
		out[listenerNames[i]] = p.accepts[i].Counts()
	}
	return out
}

// ServeOutbound accepts connections captured from local pods (15001) until
// ln is closed or Close is called.
func (p *Proxy) ServeOutbound(ln net.Listener) error {
	return p.serve(ln, listenerOutbound, p.captured(ln, p.handleOutbound))
}

// ServeInbound accepts plaintext connections to local pods (15006).
func (p *Proxy) ServeInbound(ln net.Listener) error {
	return p.serve(ln, listenerInbound, p.captured(ln, p.handleInbound))
}

// ServeHBONE accepts HBONE connections to local pods (15008).
func (p *Proxy) ServeHBONE(ln net.Listener) error {
	return p.serve(ln, listenerHBONE, p.server.ServeAccepted)
}

// serve runs ln's accept loop, which survives running out of descriptors
// (package accept), until ln is closed; handle gets each connection and
// must not block.
func (p *Proxy) serve(ln net.Listener, kind int, handle func(net.Conn)) error {
	if !p.trackListener(ln) {
		return ErrClosed
	}
	defer p.untrackListener(ln)
	err := accept.Serve(p.ctx, ln, accept.Options{Name: listenerNames[kind], Logger: p.log, Stats: &p.accepts[kind]}, handle)
	if p.ctx.Err() != nil || p.draining.Load() {
		return ErrClosed
	}
	return fmt.Errorf("accept on %s: %w", ln.Addr(), err)
}

// captured returns the accept handler of a transparent plaintext listener
// (15001, 15006): each connection is served on a goroutine of its own,
// except those addressed to the listener's own port, which are reset at
// once. A connection the datapath (or nftables TPROXY) hands over keeps
// its original destination as local address; one addressed to the
// listener's port was made to the ztunnel itself: from the network to a
// node address (where the listener is reachable without the datapath),
// from the node to loopback, or from a pod to some host's 15001 or
// 15006, which Istio's ztunnel refuses too (a call to its own ports).
// Serving it would hold it for WorkloadWait and log a warning each time,
// for anyone who can reach the node.
func (p *Proxy) captured(ln net.Listener, handle func(net.Conn)) func(net.Conn) {
	port := sockopt.AddrPort(ln.Addr()).Port()
	return func(c net.Conn) {
		if sockopt.AddrPort(c.LocalAddr()).Port() == port {
			p.stats.NotCaptured.Add(1)
			p.log.Debug("not captured: connection to the listener's own port reset", logKeyListener, ln.Addr(), logKeySrcAddr, c.RemoteAddr(), logKeyDstAddr, c.LocalAddr())
			if tc, ok := c.(*net.TCPConn); ok {
				_ = tc.SetLinger(0)
			}
			_ = c.Close()
			return
		}
		p.wg.Add(1)
		go func() {
			defer p.wg.Done()
			handle(c)
		}()
	}
}

func (p *Proxy) trackListener(ln net.Listener) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		ln.Close()
		return false
	}
	p.listeners[ln] = struct{}{}
	return true
}

func (p *Proxy) untrackListener(ln net.Listener) {
	p.mu.Lock()
	delete(p.listeners, ln)
	p.mu.Unlock()
}

// Drain closes the listeners — what they accepted is served — and waits
// until no connection is proxied any more, or ctx ends; Close then ends
// whatever is left. A stopping ztunnel drains so that short connections
// finish rather than being reset.
func (p *Proxy) Drain(ctx context.Context) error {
	p.draining.Store(true)
	p.mu.Lock()
	for ln := range p.listeners {
		ln.Close()
	}
	p.mu.Unlock()
	tick := time.NewTicker(50 * time.Millisecond)
	defer tick.Stop()
	for {
		p.mu.Lock()
		n := len(p.conns)
		p.mu.Unlock()
		if n == 0 {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("drain: %d connections still open: %w", n, context.Cause(ctx))
		case <-tick.C:
		}
	}
}

// Close stops the listeners, every proxied connection and the HBONE pool
// and server, and waits for the proxy's goroutines.
func (p *Proxy) Close() error {
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		return nil
	}
	p.closed = true
	// Cancel first so that Serve* report ErrClosed for the listeners
	// closed below rather than an accept error.
	p.cancel()
	var errs []error
	for ln := range p.listeners {
		if err := ln.Close(); err != nil && !errors.Is(err, net.ErrClosed) {
			errs = append(errs, err)
		}
	}
	conns := make([]*conn, 0, len(p.conns))
	for c := range p.conns {
		conns = append(conns, c)
	}
	p.mu.Unlock()
	for _, c := range conns {
		c.close(ErrClosed)
	}
	errs = append(errs, p.server.Close(), p.pool.Close())
	p.wg.Wait()
	if p.parker != nil {
		errs = append(errs, p.parker.Close())
	}
	return errors.Join(errs...)
}

// localWorkload returns the local workload owning addr, or nil.
// waitLocalWorkload returns the local workload at addr, waiting up to
// Config.WorkloadWait for the control plane to describe it.
func (p *Proxy) waitLocalWorkload(addr netip.Addr) (*state.Snapshot, *state.Workload) {
	snap := p.cfg.Store.Load()
	w := p.localWorkload(snap, addr)
	if w != nil || p.cfg.WorkloadWait <= 0 {
		return snap, w
	}
	deadline := time.NewTimer(p.cfg.WorkloadWait)
	defer deadline.Stop()
	tick := time.NewTicker(50 * time.Millisecond)
	defer tick.Stop()
	for {
		select {
		case <-p.ctx.Done():
			return snap, nil
		case <-deadline.C:
			return snap, nil
		case <-tick.C:
			snap = p.cfg.Store.Load()
			if w = p.localWorkload(snap, addr); w != nil {
				return snap, w
			}
		}
	}
}

func (p *Proxy) localWorkload(snap *state.Snapshot, addr netip.Addr) *state.Workload {
	w := snap.WorkloadByAddr(state.NetworkAddr{Addr: addr.Unmap()})
	if w == nil || (p.cfg.NodeName != "" && w.Node != p.cfg.NodeName) {
		return nil
	}
	return w
}

// capturedWorkload returns the local workload at addr whose traffic this
// node's ztunnel serves, or nil. istiod marks a captured pod's workload
// HBONE (the node agent's ambient.istio.io/redirection annotation) and a
// pod serving HBONE itself HBONE with NativeTunnel; a pod outside the
// mesh, such as a waypoint (istio.io/dataplane-mode=none), stays TCP.
func (p *Proxy) capturedWorkload(snap *state.Snapshot, addr netip.Addr) *state.Workload {
	w := p.localWorkload(snap, addr)
	if w == nil || w.Protocol != state.ProtocolHBONE || w.NativeTunnel {
		return nil
	}
	return w
}

// certFor picks the certificate of the HBONE listener: the workload owning
// the original destination.
func (p *Proxy) certFor(local net.Addr) (identity.ID, error) {
	ap := sockopt.AddrPort(local)
	w := p.localWorkload(p.cfg.Store.Load(), ap.Addr())
	if w == nil {
		p.stats.UnknownDest.Add(1)
		return identity.ID{}, fmt.Errorf("no local workload at %s", ap.Addr())
	}
	return workloadID(w), nil
}

func workloadID(w *state.Workload) identity.ID {
	return identity.ID{TrustDomain: w.TrustDomain, Namespace: w.Namespace, ServiceAccount: w.ServiceAccount}
}

// IsLocal reports whether w runs on this proxy's node.
func (p *Proxy) IsLocal(w *state.Workload) bool {
	return p.cfg.NodeName == "" || w.Node == p.cfg.NodeName
}
