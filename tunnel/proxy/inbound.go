package proxy

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/netip"

	"github.com/amber-mesh/amber/tunnel/hbone"
	"github.com/amber-mesh/amber/tunnel/identity"
	"github.com/amber-mesh/amber/tunnel/relay"
	"github.com/amber-mesh/amber/tunnel/sockopt"
	"github.com/amber-mesh/amber/xds/state"
)

// serveHBONE answers one CONNECT, checking in the order Istio's ztunnel
// does (docs/facts.md §3, HBONE): authority against the original destination, the
// ztunnel's own ports and special addresses (400), a local destination
// workload (400), authorization (401), the upstream connection (503); 200
// only once the application accepted.
func (p *Proxy) serveHBONE(ctx context.Context, req *hbone.Request, rw hbone.Responder) {
	if c, gen, down := p.acceptHBONE(ctx, req, rw); c != nil {
		// The handler's part ends here (hbone.Release: it no longer counts
		// against the server's stream limits), and its goroutine copies a
		// direction of the relay.
		p.relay(c, gen, hbone.Release(down))
	}
}

// acceptHBONE checks a CONNECT, connects upstream and accepts; a nil
// *conn means it was refused and reported. gen is the generation of the
// snapshot that authorized it.
func (p *Proxy) acceptHBONE(ctx context.Context, req *hbone.Request, rw hbone.Responder) (c *conn, gen uint64, down *hbone.Stream) {
	origDst := sockopt.AddrPort(req.Conn.LocalAddr())
	peerAddr := sockopt.AddrPort(req.Conn.RemoteAddr())
	c = &conn{p: p, record: record{src: peerAddr, dst: req.Addr, start: now(), inbound: true, hbone: true, mtls: true}}
	r := &c.record
	reject := func(status int, err error) {
		if status == http.StatusBadRequest {
			p.stats.BadRequests.Add(1)
		}
		_ = rw.Reject(status, err.Error())
		p.refuse(c, err)
	}
	tc, ok := req.Conn.(*tls.Conn)
	if !ok {
		reject(http.StatusBadRequest, errors.New("HBONE connection is not TLS"))
		return nil, 0, nil
	}
	// Parsed once per HBONE connection, held until c is reported.
	pr, err := p.peers.acquire(tc)
	if err != nil {
		reject(http.StatusUnauthorized, err)
		return nil, 0, nil
	}
	r.peer = pr
	peer := pr.id
	snap := p.cfg.Store.Load()
	var spoof netip.Addr
	if src, w, ok := clientSource(snap, peer, peerAddr, req.Header.Get("Forwarded")); ok {
		r.src, r.srcW, spoof = src, w, src.Addr()
	}
	switch dst := req.Addr; {
	case dst.Addr() != origDst.Addr():
		reject(http.StatusBadRequest, fmt.Errorf("%w: %s on a connection to %s", errAuthority, req.Authority, origDst.Addr()))
		return nil, 0, nil
	case p.reserved[dst.Port()]:
		reject(http.StatusBadRequest, fmt.Errorf("%w: %d", errReservedPort, dst.Port()))
		return nil, 0, nil
	case !tunnelTarget(dst.Addr()):
		reject(http.StatusBadRequest, fmt.Errorf("%w: %s", errBadTarget, dst.Addr()))
		return nil, 0, nil
	}
	r.dstW = p.localWorkload(snap, req.Addr.Addr())
	if r.dstW == nil {
		p.stats.UnknownDest.Add(1)
		reject(http.StatusBadRequest, fmt.Errorf("%w: %s", errUnknownDest, req.Addr.Addr()))
		return nil, 0, nil
	}
	if d := snap.Policies().Evaluate(c.authzConn(r.dstW)); !d.Allowed {
		p.denied(d)
		reject(http.StatusUnauthorized, &DeniedError{Decision: d})
		return nil, 0, nil
	}
	if testHookAuthorized != nil {
		testHookAuthorized()
	}
	// ctx ends when the client resets the stream or its connection ends
	// (or the proxy closes): a stream its client cancelled is reported as
	// such (DC), never as an upstream failure, and costs no upstream
	// connection once cancelled.
	clientGone := func() bool { return ctx.Err() != nil && p.ctx.Err() == nil }
	cancelled := func(err error) {
		p.stats.ClientCancelled.Add(1)
		p.refuse(c, fmt.Errorf("%w: %w", errCancelled, err))
	}
	if clientGone() {
		cancelled(context.Cause(ctx))
		return nil, 0, nil
	}
	dctx, cancel := context.WithTimeout(ctx, p.cfg.ConnectTimeout)
	up, err := p.cfg.Sockets.Dial(dctx, req.Addr, spoof)
	cancel()
	if err != nil {
		if clientGone() {
			cancelled(err)
			return nil, 0, nil
		}
		p.stats.UpstreamErrors.Add(1)
		reject(http.StatusServiceUnavailable, fmt.Errorf("connect %s: %w", req.Addr, err))
		return nil, 0, nil
	}
	down, err = rw.Accept()
	if err != nil {
		up.Close()
		if clientGone() {
			cancelled(err)
			return nil, 0, nil
		}
		p.refuse(c, fmt.Errorf("accept CONNECT: %w", err))
		return nil, 0, nil
	}
	// The relay outlives this handler and closes the stream itself.
	hbone.Detach(down)
	c.pair = relay.NewPair(down, up)
	return c, snap.Generation(), down
}

// handleInbound serves a plaintext connection to a local pod from a client
// outside the mesh. It has no identity, so no principal can match it.
func (p *Proxy) handleInbound(nc net.Conn) {
	src, dst := sockopt.AddrPort(nc.RemoteAddr()), sockopt.AddrPort(nc.LocalAddr())
	c := &conn{p: p, record: record{src: src, dst: dst, start: now(), inbound: true}}
	r := &c.record
	snap := p.cfg.Store.Load()
	r.srcW = snap.WorkloadByAddr(state.NetworkAddr{Addr: src.Addr()})
	r.dstW = p.localWorkload(snap, dst.Addr())
	refuse := func(err error) {
		nc.Close()
		p.refuse(c, err)
	}
	if r.dstW == nil {
		p.stats.UnknownDest.Add(1)
		refuse(fmt.Errorf("%w: %s", errUnknownDest, dst.Addr()))
		return
	}
	if p.reserved[dst.Port()] {
		refuse(fmt.Errorf("%w: %d", errReservedPort, dst.Port()))
		return
	}
	if d := snap.Policies().Evaluate(c.authzConn(r.dstW)); !d.Allowed {
		p.denied(d)
		refuse(&DeniedError{Decision: d})
		return
	}
	if testHookAuthorized != nil {
		testHookAuthorized()
	}
	ctx, cancel := context.WithTimeout(p.ctx, p.cfg.ConnectTimeout)
	up, err := p.cfg.Sockets.Dial(ctx, dst, src.Addr())
	cancel()
	if err != nil {
		p.stats.UpstreamErrors.Add(1)
		refuse(fmt.Errorf("connect %s: %w", dst, err))
		return
	}
	// On the connection's own goroutine (captured, dialLocalInbound).
	c.pair = relay.NewPair(nc.(relay.Conn), up)
	p.relay(c, snap.Generation(), true)
}

// clientSource is the address of an inbound CONNECT's client as the
// application is to see it: the Forwarded header's (an amber or Istio
// ztunnel names the client pod), else the TCP peer's (a waypoint dials
// from its own pod's address and sends no Forwarded; Istio's ztunnel then
// shows the application the waypoint's address). Either is taken only
// when the workload at that address has the very identity the peer
// proved, so a peer cannot borrow another workload's address: source-IP
// policies and the preserved source depend on it. !ok: neither is, and
// the application connection is not source-preserved.
func clientSource(snap *state.Snapshot, peer identity.ID, peerAddr netip.AddrPort, forwarded string) (src netip.AddrPort, w *state.Workload, ok bool) {
	owned := func(a netip.Addr) *state.Workload {
		if w := snap.WorkloadByAddr(state.NetworkAddr{Addr: a.Unmap()}); w != nil && workloadID(w) == peer {
			return w
		}
		return nil
	}
	if fwd, ok := hbone.ForwardedFor(forwarded); ok {
		if w := owned(fwd.Addr()); w != nil {
			return fwd, w, true
		}
	}
	if w := owned(peerAddr.Addr()); w != nil {
		return netip.AddrPortFrom(peerAddr.Addr().Unmap(), peerAddr.Port()), w, true
	}
	return netip.AddrPort{}, nil, false
}

// tunnelTarget reports whether a CONNECT may reach addr: never the
// ztunnel's host itself or addresses with no meaning across nodes.
func tunnelTarget(a netip.Addr) bool {
	return a.IsValid() && !a.IsLoopback() && !a.IsUnspecified() && !a.IsLinkLocalUnicast() &&
		!a.IsMulticast() && !a.IsLinkLocalMulticast() && !a.IsInterfaceLocalMulticast()
}
