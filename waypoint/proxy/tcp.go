package proxy

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"sync"
	"time"

	"github.com/amber-mesh/amber/tunnel/hbone"
	"github.com/amber-mesh/amber/waypoint/config"
	"github.com/amber-mesh/amber/waypoint/rbac"
	"github.com/amber-mesh/amber/waypoint/telemetry"
)

// Why a TCP connection was refused or ended.
var (
	errTCPDenied    = errors.New("network RBAC denied the connection")
	errRevoked      = errors.New("the configuration no longer admits the connection")
	errIdleTimeout  = errors.New("idle timeout")
	errMaxDuration  = errors.New("max_downstream_connection_duration reached")
	errNoTCPCluster = errors.New("no cluster for the connection")
)

// tcpConn is a live TCP chain connection, re-checked when the
// configuration changes.
type tcpConn struct {
	d     *downstream
	close func(error)
}

// serveTCP serves a stream dispatched to a TCP chain: network RBAC
// (decided once, as Envoy's ONE_TIME_ON_FIRST_BYTE enforcement), then
// tcp_proxy to the chain's cluster (or a weighted one) over HBONE. When
// the stream was not accepted yet (no sniffing needed), a refusal is the
// CONNECT's status and the 200 goes out only once the upstream accepted,
// as Istio's ztunnel does; otherwise the stream is closed.
func (p *Proxy) serveTCP(ctx context.Context, d *downstream, snap *snapshot, ch *config.Chain, rw hbone.Responder, s *hbone.Stream, br *bufio.Reader) {
	start := time.Now()
	t := ch.TCP
	labels := telemetry.Labels{Source: d.source, Protocol: telemetry.ProtocolTCP, ConnectionSecurityPolicy: telemetry.MutualTLS}
	if ch.Service.Host != "" {
		labels.Service = serviceOfHost(ch.Service.Host)
	}
	var fl flags
	refuse := func(status int, cause string, err error) {
		p.counts.refuse(cause)
		if s != nil {
			s.Close()
		} else {
			_ = rw.Reject(status, err.Error())
		}
		labels.ResponseFlags = fl.String()
		p.tel.OpenTCP(&labels).Close()
		p.logTCP(d, ch, "", labels, start, 0, 0, fl, status, err)
	}
	if !tcpAllowed(t, d) {
		refuse(http.StatusUnauthorized, causeRBAC, errTCPDenied)
		return
	}
	name, ok := t.Pick(rand.Uint64())
	var cl *config.Cluster
	if ok {
		cl = (&exchange{d: d}).resolveCluster(snap, name)
	}
	if cl == nil {
		fl |= flagNC
		refuse(http.StatusServiceUnavailable, causeNoCluster, fmt.Errorf("%w: %q", errNoTCPCluster, name))
		return
	}
	if cl.ServiceMeta.Host != "" {
		labels.Service = telemetry.Service{Host: cl.ServiceMeta.Host, Name: cl.ServiceMeta.Name, Namespace: cl.ServiceMeta.Namespace}
	}
	if cl.Err != nil {
		fl |= flagUH
		refuse(http.StatusServiceUnavailable, causeClusterRefused, cl.Err)
		return
	}
	cs := p.clusterState(name)
	ep, ok := cs.pick(cl, nil)
	if !ok {
		fl |= flagUH
		refuse(http.StatusServiceUnavailable, causeNoHealthy, errors.New(bodyNoHealthy))
		return
	}
	labels.Destination = destinationPeer(p.cfg.Store.Load(), ep)
	target := &dialTarget{ep: ep, connectTimeout: cl.ConnectTimeout}
	if o := snap.cfg.Originate; o != nil {
		target.originatePort = o.Port
	}
	cs.begin(ep.Address)
	defer cs.end(ep.Address)
	up, err := p.dialEndpoint(ctx, target)
	if err != nil {
		fl |= flagUF
		cause := causeConnectFailure
		var de *dialError
		if errors.As(err, &de) {
			cause = de.cause
		}
		refuse(http.StatusServiceUnavailable, cause, err)
		return
	}
	if s == nil {
		if s, err = rw.Accept(); err != nil {
			up.Close()
			return
		}
		br = bufio.NewReader(s)
	}

	m := p.tel.OpenTCP(&labels)
	var st relayStats
	tc := &tcpConn{d: d}
	var closeOnce sync.Once
	var revoked error
	tc.close = func(err error) {
		closeOnce.Do(func() {
			revoked = err
			s.Close()
			up.Close()
		})
	}
	p.mu.Lock()
	p.tcps[tc] = struct{}{}
	p.mu.Unlock()
	stop := context.AfterFunc(ctx, func() { tc.close(context.Cause(ctx)) })
	if d := t.MaxConnectionDuration; d > 0 {
		// max_downstream_connection_duration
		timer := time.AfterFunc(d, func() { tc.close(errMaxDuration) })
		defer timer.Stop()
	}
	err = relay(side{r: br, w: s, c: s}, side{r: up, w: up, c: up}, t.IdleTimeout, &st)
	stop()
	p.mu.Lock()
	delete(p.tcps, tc)
	p.mu.Unlock()
	if revoked != nil {
		err = revoked
	}
	m.Received(st.up.Load())
	m.Sent(st.down.Load())
	m.Close()
	if err == io.EOF {
		err = nil
	}
	p.logTCP(d, ch, ep.Address.String(), labels, start, st.up.Load(), st.down.Load(), 0, 0, err)
}

// tcpAllowed runs the chain's network RBAC filters for d.
func tcpAllowed(t *config.TCPChain, d *downstream) bool {
	r := &rbac.Request{
		Source:      d.peerAddr.Addr(),
		Destination: d.in.Destination,
		FilterState: map[string]string{peerPrincipalKey: d.peer.String()},
	}
	for _, f := range t.RBAC {
		if !f.Evaluate(r).Allowed {
			return false
		}
	}
	return true
}

// recheckTCP closes live TCP connections the new configuration no longer
// admits: their chain is gone, refused or no longer TCP, or its network
// RBAC now denies them. Envoy would drain a changed chain's connections
// and close them after the drain period whatever the policy says; amber
// closes exactly those the new policy forbids, at once, as its ztunnel
// does for L4 policy.
func (p *Proxy) recheckTCP(s *snapshot) {
	p.mu.Lock()
	conns := make([]*tcpConn, 0, len(p.tcps))
	for c := range p.tcps {
		conns = append(conns, c)
	}
	p.mu.Unlock()
	for _, c := range conns {
		var ch *config.Chain
		if s.cfg != nil && s.cfg.Dispatch != nil {
			ch = s.cfg.Dispatch.Lookup(c.d.in)
		}
		if ch == nil || ch.Err != nil || ch.TCP == nil || !tcpAllowed(ch.TCP, c.d) {
			p.counts.refuse(causeRBAC)
			c.close(errRevoked)
		}
	}
}

// relayUpgrade relays an accepted HTTP/1 upgrade (WebSocket) until both
// sides end, then reports the request.
func (p *Proxy) relayUpgrade(d *downstream, br *bufio.Reader, bw *bufio.Writer, up *upgrade) {
	defer up.x.finish()
	defer up.upstream.Close()
	if err := bw.Flush(); err != nil {
		up.upstream.Close()
		return
	}
	var st relayStats
	err := relay(side{r: br, w: d.conn, c: d.conn}, side{r: up.upstream, w: up.upstream, c: up.upstream}, 0, &st)
	up.x.w.bytes += st.down.Load()
	up.x.body.mu.Lock()
	up.x.body.n += st.up.Load()
	up.x.body.mu.Unlock()
	if err != nil && err != io.EOF {
		up.x.err = err
	}
}
