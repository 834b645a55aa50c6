package proxy

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"net/http"
	"net/netip"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/net/http2"

	"github.com/amber-mesh/amber/tunnel/certs"
	"github.com/amber-mesh/amber/tunnel/hbone"
	"github.com/amber-mesh/amber/tunnel/identity"
	"github.com/amber-mesh/amber/waypoint/config"
	"github.com/amber-mesh/amber/xds/state"
)

// encapCluster is istiod's cluster for workload-addressed chains
// (direct-http, direct-tcp): HBONE to the stream's original destination.
const encapCluster = config.Encap

// dialError is a failure to reach an endpoint: no connection, no HBONE
// stream, or a peer that is not the destination workload.
type dialError struct {
	cause string
	err   error
}

func (e *dialError) Error() string { return e.err.Error() }
func (e *dialError) Unwrap() error { return e.err }

// clusterState is what the data path keeps per cluster name across
// configurations: load-balancing state, circuit-breaker counts and the
// HTTP transports (connection pools) to its endpoints.
type clusterState struct {
	requests atomic.Int64 // active requests, for max_requests
	retries  atomic.Int64 // active retries, for max_retries

	mu       sync.Mutex // guards the fields below
	rr       uint64
	inflight map[netip.AddrPort]int // active requests per endpoint (least request)
	settings transportSettings
	h1       *http.Transport
	h2       *http2.Transport
}

// transportSettings are the cluster fields its transports are built from;
// a configuration that changes them gets new transports.
type transportSettings struct {
	connectTimeout time.Duration
	idleTimeout    time.Duration
	maxConns       uint32
	originatePort  uint16
}

func (p *Proxy) clusterState(name string) *clusterState {
	p.mu.Lock()
	defer p.mu.Unlock()
	cs := p.clusters[name]
	if cs == nil {
		cs = &clusterState{inflight: map[netip.AddrPort]int{}}
		p.clusters[name] = cs
	}
	return cs
}

func (cs *clusterState) closeIdle() {
	cs.mu.Lock()
	defer cs.mu.Unlock()
	if cs.h1 != nil {
		cs.h1.CloseIdleConnections()
	}
	if cs.h2 != nil {
		cs.h2.CloseIdleConnections()
	}
}

// acquire counts an active request against max; false when the cluster
// is at its circuit-breaker limit (Envoy answers 503 UO).
func acquire(n *atomic.Int64, max uint32) bool {
	if v := n.Add(1); uint64(v) > uint64(max) {
		n.Add(-1)
		return false
	}
	return true
}

// pick chooses an endpoint of cl with its load-balancing policy among
// the healthy ones of the lowest priority that has any, avoiding those in
// avoid (previous_hosts) while others remain.
func (cs *clusterState) pick(cl *config.Cluster, avoid map[netip.AddrPort]bool) (config.Endpoint, bool) {
	var prio uint32
	found := false
	for _, e := range cl.Endpoints {
		if e.Healthy && e.Weight > 0 && (!found || e.Priority < prio) {
			prio, found = e.Priority, true
		}
	}
	if !found {
		return config.Endpoint{}, false
	}
	var all, fresh []config.Endpoint
	for _, e := range cl.Endpoints {
		if e.Healthy && e.Weight > 0 && e.Priority == prio {
			all = append(all, e)
			if !avoid[e.Address] {
				fresh = append(fresh, e)
			}
		}
	}
	if len(fresh) == 0 {
		// Envoy takes an already tried host once its host selection
		// attempts are spent.
		fresh = all
	}
	cs.mu.Lock()
	defer cs.mu.Unlock()
	switch cl.LB {
	case config.RoundRobin:
		cs.rr++
		return weighted(fresh, cs.rr), true
	case config.LeastRequest:
		// Envoy's unweighted least request: the least loaded of
		// choice_count random picks (power of two choices).
		n := max(int(cl.ChoiceCount), 1)
		best := fresh[rand.IntN(len(fresh))]
		for i := 1; i < n; i++ {
			c := fresh[rand.IntN(len(fresh))]
			if cs.inflight[c.Address] < cs.inflight[best.Address] {
				best = c
			}
		}
		return best, true
	}
	return weighted(fresh, rand.Uint64()), true
}

// weighted maps v onto eps by their cumulative weights.
func weighted(eps []config.Endpoint, v uint64) config.Endpoint {
	var total uint64
	for _, e := range eps {
		total += uint64(e.Weight)
	}
	v %= total
	for _, e := range eps {
		if v < uint64(e.Weight) {
			return e
		}
		v -= uint64(e.Weight)
	}
	return eps[len(eps)-1]
}

func (cs *clusterState) begin(a netip.AddrPort) {
	cs.mu.Lock()
	cs.inflight[a]++
	cs.mu.Unlock()
}

func (cs *clusterState) end(a netip.AddrPort) {
	cs.mu.Lock()
	if cs.inflight[a]--; cs.inflight[a] <= 0 {
		delete(cs.inflight, a)
	}
	cs.mu.Unlock()
}

// countedConn is an upstream connection that counts the requests it
// carried, for max_requests_per_connection.
type countedConn struct {
	net.Conn
	n atomic.Int64
}

// dialTarget is what a transport's dial needs, carried in the request's
// context: pools are keyed by the endpoint's address, so every request a
// connection serves has the same target.
type dialTarget struct {
	ep             config.Endpoint
	connectTimeout time.Duration
	originatePort  uint16
	// gatewayTD is set for an ingress gateway: the trust domain onward
	// HBONE peers must be in (istiod's SAN prefix for routers); a gateway
	// has no workload discovery to know the exact identity.
	gatewayTD string
}

type dialKey struct{}

// transport returns the round tripper to cl's endpoints for the HTTP
// version: HTTP/1.1, or HTTP/2 with prior knowledge (no TLS to the
// application; HBONE carries the mutual TLS).
func (p *Proxy) transport(cs *clusterState, cl *config.Cluster, orig *config.Originate, h2 bool) http.RoundTripper {
	s := transportSettings{connectTimeout: cl.ConnectTimeout, idleTimeout: cl.IdleTimeout, maxConns: cl.Limits.MaxConnections}
	if orig != nil {
		s.originatePort = orig.Port
	}
	cs.mu.Lock()
	defer cs.mu.Unlock()
	if s != cs.settings {
		if cs.h1 != nil {
			cs.h1.CloseIdleConnections()
		}
		if cs.h2 != nil {
			cs.h2.CloseIdleConnections()
		}
		cs.h1, cs.h2, cs.settings = nil, nil, s
	}
	dial := func(ctx context.Context, _, _ string) (net.Conn, error) {
		t, ok := ctx.Value(dialKey{}).(*dialTarget)
		if !ok {
			return nil, errors.New("waypoint proxy: dial without a target")
		}
		c, err := p.dialEndpoint(ctx, t)
		if err != nil {
			return nil, err
		}
		return &countedConn{Conn: c}, nil
	}
	if h2 {
		if cs.h2 == nil {
			cs.h2 = &http2.Transport{
				AllowHTTP: true,
				DialTLSContext: func(ctx context.Context, network, addr string, _ *tls.Config) (net.Conn, error) {
					return dial(ctx, network, addr)
				},
				DisableCompression: true,
				MaxHeaderListSize:  uint32(p.lim.MaxResponseHeaderBytes),
				IdleConnTimeout:    s.idleTimeout,
			}
		}
		return cs.h2
	}
	if cs.h1 == nil {
		t := &http.Transport{
			DialContext:            dial,
			DisableCompression:     true,
			MaxIdleConnsPerHost:    1024,
			IdleConnTimeout:        s.idleTimeout,
			MaxResponseHeaderBytes: int64(p.lim.MaxResponseHeaderBytes),
			ExpectContinueTimeout:  time.Second,
		}
		if s.maxConns < 1<<31 {
			t.MaxConnsPerHost = int(s.maxConns)
		}
		t.Protocols = new(http.Protocols)
		t.Protocols.SetHTTP1(true)
		cs.h1 = t
	}
	return cs.h1
}

// dialEndpoint connects to an endpoint: plain TCP for one outside the
// mesh; otherwise an HBONE stream to podIP:15008 with :authority
// podIP:port, from the waypoint's own identity, to a peer that must be
// exactly the identity workload discovery gives the pod. Envoy accepts
// any identity of the trust domain there (istiod's SAN prefixes): a
// workload of another service account at that address — a pod IP reused
// before discovery caught up — would get the request. amber refuses it,
// and refuses an endpoint discovery does not know.
func (p *Proxy) dialEndpoint(ctx context.Context, t *dialTarget) (net.Conn, error) {
	if t.connectTimeout > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, t.connectTimeout)
		defer cancel()
	}
	addr := t.ep.Address
	if t.ep.Err != nil {
		return nil, &dialError{cause: causeSidecarMTLS, err: fmt.Errorf("endpoint %s: %w", addr, t.ep.Err)}
	}
	if t.gatewayTD != "" && t.ep.HBONE {
		return p.dialGatewayHBONE(ctx, t)
	}
	if !t.ep.HBONE {
		c, err := p.cfg.Dial(ctx, addr)
		if err != nil {
			return nil, &dialError{cause: causeConnectFailure, err: fmt.Errorf("connect %s: %w", addr, err)}
		}
		return c, nil
	}
	w := p.cfg.Store.Load().WorkloadByAddr(state.NetworkAddr{Addr: addr.Addr()})
	if w == nil {
		return nil, &dialError{cause: causeUpstreamIdentity, err: fmt.Errorf("no workload at %s in workload discovery: its identity is unknown", addr.Addr())}
	}
	return p.connectHBONE(ctx, workloadID(w).String(), netip.AddrPortFrom(addr.Addr(), t.originatePort), addr)
}

// connectHBONE opens a pooled CONNECT stream to authority on via, from the
// proxy's own identity to a peer that must be dst (an identity, or
// trustDomainKey and a trust domain); a peer that is not is
// causeUpstreamIdentity.
func (p *Proxy) connectHBONE(ctx context.Context, dst string, via, authority netip.AddrPort) (net.Conn, error) {
	key := hbone.Key{Src: p.cfg.Identity.String(), Dst: dst, Addr: via}
	s, err := p.pool.Connect(ctx, key, hbone.FormatAuthority(authority), nil)
	if err != nil {
		cause := causeConnectFailure
		var pe *certs.PeerError
		if errors.As(err, &pe) {
			cause = causeUpstreamIdentity
		}
		return nil, &dialError{cause: cause, err: fmt.Errorf("hbone %s via %s: %w", authority, via, err)}
	}
	return s, nil
}

// dialGatewayHBONE is an ingress gateway's onward HBONE (istiod's
// connect_originate for routers): CONNECT to the endpoint's address, on
// the endpoint's podIP:15008 or, for a Service's waypoint, the
// waypoint's, from the gateway's own identity, to a peer whose identity
// is in the trust domain (istiod's SAN prefix; a gateway has no workload
// discovery that would name the exact one).
func (p *Proxy) dialGatewayHBONE(ctx context.Context, t *dialTarget) (net.Conn, error) {
	addr := t.ep.Address
	via := netip.AddrPortFrom(addr.Addr(), t.originatePort)
	if t.ep.Via.IsValid() {
		via = t.ep.Via
	}
	return p.connectHBONE(ctx, trustDomainKey+t.gatewayTD, via, addr)
}

// trustDomainKey prefixes an HBONE pool key's Dst that names a trust
// domain, not an identity.
const trustDomainKey = "trust-domain:"

// dialHBONE is the pool's dial: TCP to the endpoint's HBONE port and TLS
// with the waypoint's certificate (every key's source is the waypoint),
// the server required to be exactly key.Dst, or in the trust domain a
// gateway's key names.
func (p *Proxy) dialHBONE(ctx context.Context, key hbone.Key) (net.Conn, error) {
	var dst identity.ID
	var err error
	if td, ok := strings.CutPrefix(key.Dst, trustDomainKey); ok {
		dst = identity.ID{TrustDomain: td}
	} else if dst, err = identity.Parse(key.Dst); err != nil {
		return nil, fmt.Errorf("hbone dial %s: destination: %w", key.Addr, err)
	}
	nc, err := p.cfg.Dial(ctx, key.Addr)
	if err != nil {
		return nil, fmt.Errorf("hbone dial %s: %w", key.Addr, err)
	}
	tc := hbone.TLSClient(nc, p.cfg.Certs.ClientConfig(p.cfg.Identity, dst))
	if err := tc.HandshakeContext(ctx); err != nil {
		nc.Close()
		return nil, fmt.Errorf("hbone dial %s: %w", key.Addr, err)
	}
	return tc, nil
}

// resolveCluster returns the cluster a route names, the synthetic encap
// cluster for a workload-addressed chain, or nil.
func (x *exchange) resolveCluster(snap *snapshot, name string) *config.Cluster {
	if name == encapCluster {
		return encap(snap, x.d.in.Destination)
	}
	return snap.cfg.Clusters[name]
}

// encap is the cluster of one endpoint, the original destination, reached
// through connect_originate.
func encap(snap *snapshot, dst netip.AddrPort) *config.Cluster {
	cl := &config.Cluster{
		Name: encapCluster, LB: config.RoundRobin, Protocol: config.UpstreamAsDownstream,
		IdleTimeout: time.Hour,
		Limits:      config.Limits{MaxConnections: ^uint32(0), MaxPendingRequests: ^uint32(0), MaxRequests: ^uint32(0), MaxRetries: ^uint32(0)},
		Endpoints:   []config.Endpoint{{Address: dst, HBONE: true, Weight: 1, Healthy: true}},
	}
	if o := snap.cfg.Originate; o != nil {
		cl.ConnectTimeout = o.ConnectTimeout
	}
	return cl
}
