package proxy

import (
	"cmp"
	"context"
	crand "crypto/rand"
	"encoding/hex"
	"fmt"
	"math/rand/v2"
	"net"
	"net/http"
	"net/netip"
	"strconv"

	"github.com/amber-mesh/amber/tunnel/hbone"
	"github.com/amber-mesh/amber/tunnel/identity"
	"github.com/amber-mesh/amber/tunnel/relay"
	"github.com/amber-mesh/amber/tunnel/sockopt"
	"github.com/amber-mesh/amber/xds/state"
)

// route is where an outbound connection goes.
type route struct {
	hbone     bool
	addr      netip.AddrPort  // dialled: HBONE peer (pod or waypoint :15008) or the plain destination
	authority string          // CONNECT :authority, for HBONE
	peer      *state.Workload // the workload whose identity the HBONE peer must present
	dstW      *state.Workload
	svc       *state.Service
}

// handleOutbound serves a connection captured leaving a local pod. The
// accepted socket's local address is the original destination: the
// datapath assigns the SYN to the listener without NAT (ARCHITECTURE.md,
// "Datapath") — unless the host's Service NAT (kube-proxy) translated a
// Service address after the assignment; conntrack then still knows the
// Service address, and the local address is where the node sent it.
func (p *Proxy) handleOutbound(c net.Conn) {
	dst := sockopt.AddrPort(c.LocalAddr())
	var translated netip.AddrPort
	if tc, ok := c.(*net.TCPConn); ok {
		if od, ok := sockopt.OriginalDst(tc); ok && od != dst {
			dst, translated = od, dst
		}
	}
	p.outbound(c.(relay.Conn), sockopt.AddrPort(c.RemoteAddr()), dst, translated)
}

func (p *Proxy) outbound(down relay.Conn, src, dst, translated netip.AddrPort) {
	if c, up := p.connectOutbound(down, src, dst, translated); up != nil {
		// Called on the connection's own goroutine (captured), which
		// then has nothing else to do.
		c.pair = relay.NewPair(down, up)
		p.relay(c, 0, true)
	}
}

// connectOutbound resolves and connects an outbound connection; a nil
// relay.Conn means it was refused and reported.
func (p *Proxy) connectOutbound(down relay.Conn, src, dst, translated netip.AddrPort) (*conn, relay.Conn) {
	c := &conn{p: p, record: record{src: src, dst: dst, start: now()}}
	r := &c.record
	// A captured pod must be known: anything else would let an unknown
	// address borrow the node's mesh identity. A pod's first connection
	// can beat istiod's description of it (the datapath captures it from
	// its first packet): wait for it a little, as Istio's ztunnel does.
	snap, srcW := p.waitLocalWorkload(src.Addr())
	r.srcW = srcW
	if r.srcW == nil {
		p.stats.UnknownSource.Add(1)
		down.Close()
		p.refuse(c, fmt.Errorf("%w: %s", errUnknownSource, src.Addr()))
		return c, nil
	}
	rt, err := p.routeOutbound(snap, dst, translated)
	if err != nil {
		p.stats.NoRoute.Add(1)
		down.Close()
		p.refuse(c, err)
		return c, nil
	}
	r.dstW, r.svc = rt.dstW, rt.svc
	ctx, cancel := context.WithTimeout(p.ctx, p.cfg.ConnectTimeout)
	defer cancel()
	var up relay.Conn
	if rt.hbone {
		r.hbone, r.mtls, r.hboneAddr, r.peerW = true, true, rt.addr, rt.peer
		hdr := http.Header{}
		hdr.Set("Forwarded", formatForwarded(src, rt.svc))
		hdr.Set("Baggage", baggage(r.srcW))
		hdr.Set("Traceparent", newTraceparent())
		key := hbone.Key{Src: workloadID(r.srcW).String(), Dst: workloadID(rt.peer).String(), SrcAddr: hboneSource(r.srcW, src.Addr(), rt.addr.Addr()), Addr: rt.addr}
		up, err = p.pool.Connect(ctx, key, rt.authority, hdr)
	} else if p.cfg.Captured != nil && p.cfg.Captured(rt.addr.Addr()) {
		// A pod this node captures, which the mesh does not describe as
		// HBONE (not yet: a new pod, a ztunnel just started, a capture
		// istiod has not seen): its inbound checks are this ztunnel's.
		up, err = p.dialLocalInbound(src, rt.addr)
	} else {
		// Plain TCP leaves from the pod's own address, as it would without
		// the mesh; the reply finds this socket through the datapath's
		// established-socket lookup.
		up, err = p.cfg.Sockets.Dial(ctx, rt.addr, src.Addr())
	}
	if err != nil {
		p.stats.UpstreamErrors.Add(1)
		down.Close()
		p.refuse(c, fmt.Errorf("connect %s: %w", rt.addr, err))
		return c, nil
	}
	return c, up
}

// routeOutbound is route for an outbound connection whose destination
// the node translated (translated is where to; zero when it did not).
// A destination the mesh knows (a Service, a workload) is routed as the
// mesh says. One it does not know — a Service istiod does not describe,
// that kube-proxy translates — is routed by the address the node
// translated it to: passthrough dials that endpoint (a workload's there
// gets HBONE). Dialling the Service address instead would have the node
// translate the ztunnel's own dial a second time, in OUTPUT, to an
// endpoint of its choosing, and a remote endpoint's replies, addressed
// to the pod and coming from the endpoint, would match no ztunnel
// socket; the client's connection was translated once already, to this
// endpoint.
func (p *Proxy) routeOutbound(snap *state.Snapshot, dst, translated netip.AddrPort) (*route, error) {
	rt, err := p.route(snap, dst)
	if err != nil || !translated.IsValid() || rt.svc != nil || rt.dstW != nil {
		return rt, err
	}
	return p.route(snap, translated)
}

// route resolves the original destination: a service VIP is replaced by
// one of its endpoints; a waypoint of the service or workload takes the
// traffic; an HBONE-capable workload is reached over HBONE on its own IP;
// anything else passes through as plain TCP.
func (p *Proxy) route(snap *state.Snapshot, dst netip.AddrPort) (*route, error) {
	rt := &route{addr: dst}
	na := state.NetworkAddr{Addr: dst.Addr()}
	target := dst
	if svc := snap.ServiceByVIP(na, dst.Port()); svc != nil {
		rt.svc = svc
		if svc.Waypoint != nil {
			return p.viaWaypoint(snap, rt, svc.Waypoint, dst)
		}
		ep, ok := pickEndpoint(snap.Endpoints(svc.Key()))
		if !ok {
			return nil, fmt.Errorf("%w: %s", errNoEndpoint, svc.Hostname)
		}
		rt.dstW = ep.Workload
		target = netip.AddrPortFrom(endpointAddr(ep.Workload, dst.Addr()), ep.TargetPort(svc, dst.Port()))
	} else {
		rt.dstW = snap.WorkloadByAddr(na)
	}
	rt.addr = target
	w := rt.dstW
	if w == nil {
		return rt, nil
	}
	if w.Waypoint != nil {
		return p.viaWaypoint(snap, rt, w.Waypoint, target)
	}
	if w.Protocol == state.ProtocolHBONE {
		rt.hbone = true
		rt.peer = w
		rt.authority = hbone.FormatAuthority(target)
		rt.addr = netip.AddrPortFrom(target.Addr(), p.cfg.HBONEPort)
	}
	return rt, nil
}

// viaWaypoint sends the connection to the waypoint with the original
// destination as :authority, as Istio's ztunnel does.
func (p *Proxy) viaWaypoint(snap *state.Snapshot, rt *route, gw *state.GatewayAddress, authority netip.AddrPort) (*route, error) {
	var wp *state.Workload
	var addr netip.Addr
	if gw.ByHostname() {
		svc := snap.Service(gw.Hostname)
		if svc == nil {
			return nil, fmt.Errorf("%w: service %s unknown", errWaypoint, gw.Hostname)
		}
		ep, ok := pickEndpoint(snap.Endpoints(svc.Key()))
		if !ok {
			return nil, fmt.Errorf("%w: %s has no endpoint", errWaypoint, gw.Hostname)
		}
		wp, addr = ep.Workload, endpointAddr(ep.Workload, authority.Addr())
	} else {
		addr = gw.Address.Addr
		wp = snap.WorkloadByAddr(gw.Address)
	}
	if wp == nil {
		// Without a workload there is no identity to verify the waypoint
		// against; never send mesh traffic to an unverified peer.
		return nil, fmt.Errorf("%w: no workload at %s", errWaypoint, addr)
	}
	port := gw.HBONEPort
	if port == 0 {
		port = DefaultHBONEPort
	}
	rt.hbone = true
	rt.peer = wp
	rt.authority = hbone.FormatAuthority(authority)
	rt.addr = netip.AddrPortFrom(addr, port)
	return rt, nil
}

// pickEndpoint chooses a healthy endpoint at random; endpointAddr then
// prefers its address of the destination's family.
func pickEndpoint(eps []state.Endpoint) (state.Endpoint, bool) {
	var ok []state.Endpoint
	for _, ep := range eps {
		if ep.Workload.Healthy && len(ep.Workload.Addresses) > 0 {
			ok = append(ok, ep)
		}
	}
	if len(ok) == 0 {
		return state.Endpoint{}, false
	}
	return ok[rand.IntN(len(ok))], true
}

func endpointAddr(w *state.Workload, like netip.Addr) netip.Addr {
	for _, a := range w.Addresses {
		if a.Is4() == like.Unmap().Is4() {
			return a
		}
	}
	return w.Addresses[0]
}

// hboneSource is the address HBONE to dst leaves from: the client pod's
// own, of dst's family, as Istio's ztunnel dials from inside the pod, so
// that the peer (a waypoint, the destination ztunnel, a NetworkPolicy)
// sees the pod rather than the node. The replies reach the ztunnel's
// socket through the datapath's established-socket lookup, as for plain
// TCP from the pod's address. A pod without an address of dst's family
// (an IPv6 connection to a workload whose waypoint is IPv4-only) leaves
// the choice to the host.
func hboneSource(w *state.Workload, src, dst netip.Addr) netip.Addr {
	src, v4 := src.Unmap(), dst.Unmap().Is4()
	if src.Is4() == v4 {
		return src
	}
	for _, a := range w.Addresses {
		if a.Is4() == v4 {
			return a
		}
	}
	return netip.Addr{}
}

// formatForwarded is the CONNECT's RFC 7239 Forwarded header, as Istio's
// ztunnel writes it: the client as for="ip:port", IPv6 in brackets (§6:
// such a node must be quoted), and, for a Service destination, its
// hostname. It is built without fmt, as are the other per-connection
// headers below: each costs a connection fewer allocations that way.
func formatForwarded(src netip.AddrPort, svc *state.Service) string {
	var buf [64]byte
	b := append(buf[:0], "for="...)
	b = strconv.AppendQuote(b, src.String())
	if svc != nil {
		b = append(append(b, ";host="...), svc.Hostname...)
	}
	return string(b)
}

// baggage is the CONNECT's W3C baggage header describing the source
// workload, with the keys Istio's ztunnel sends (waypoints and the peer
// ztunnel read them for telemetry).
func baggage(w *state.Workload) string {
	return "k8s.cluster.name=" + w.ClusterID + ",k8s.namespace.name=" + w.Namespace +
		",k8s." + cmp.Or(w.WorkloadType, "pod") + ".name=" + workloadName(w) +
		",service.name=" + w.CanonicalName + ",service.version=" + w.CanonicalRevision +
		",cloud.region=" + w.Locality.Region + ",cloud.availability_zone=" + w.Locality.Zone
}

// newTraceparent is a W3C traceparent header with a random trace and span
// id, one per proxied connection, not sampled.
func newTraceparent() string {
	var id [24]byte
	crand.Read(id[:])
	var b [3 + 32 + 1 + 16 + 3]byte // 00-<trace id>-<span id>-00
	copy(b[:], "00-")
	hex.Encode(b[3:35], id[:16])
	b[35] = '-'
	hex.Encode(b[36:52], id[16:])
	copy(b[52:], "-00")
	return string(b[:])
}

// dialHBONE opens the mutual-TLS connection under an HBONE pool entry:
// the source workload's certificate, the destination's identity required
// of the peer. A captured pod on this node is reached in process (see
// dialLocal): the node cannot route to its own pods' :15008 through the
// capture. Any other pod on this node serves its own :15008 (a waypoint)
// and is dialled like a remote one.
func (p *Proxy) dialHBONE(ctx context.Context, key hbone.Key) (net.Conn, error) {
	src, err := identity.Parse(key.Src)
	if err != nil {
		return nil, fmt.Errorf("hbone dial: source: %w", err)
	}
	dst, err := identity.Parse(key.Dst)
	if err != nil {
		return nil, fmt.Errorf("hbone dial: destination: %w", err)
	}
	var nc net.Conn
	if key.Addr.Port() == p.cfg.HBONEPort && p.capturedWorkload(p.cfg.Store.Load(), key.Addr.Addr()) != nil {
		nc, err = p.dialLocal(key.SrcAddr, key.Addr)
	} else {
		nc, err = p.cfg.Sockets.Dial(ctx, key.Addr, key.SrcAddr)
	}
	if err != nil {
		return nil, fmt.Errorf("hbone dial %s: %w", key.Addr, err)
	}
	// TLSClient batches TLS record writes and reads like the HBONE
	// server side does (measured ≈ +13% on one stream).
	tc := hbone.TLSClient(nc, p.cfg.Certs.ClientConfig(src, dst))
	if err := tc.HandshakeContext(ctx); err != nil {
		p.stats.HandshakeErrors.Add(1)
		nc.Close()
		return nil, fmt.Errorf("hbone dial %s: %w", key.Addr, err)
	}
	return tc, nil
}
