package proxy

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net/http"
	"time"

	"github.com/amber-mesh/amber/tunnel/hbone"
	"github.com/amber-mesh/amber/tunnel/relay"
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
	up, err := p.dialEndpoint(ctx, target)
	if err != nil {
		cs.end(ep.Address)
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
			cs.end(ep.Address)
			up.Close()
			return
		}
	}

	// From here the connection belongs to the relay: the handler
	// returns, and an idle connection holds no goroutine.
	hbone.Detach(s)
	pair := relay.NewPair(relay.Replay(s, readAhead(br)), relayConn(up))
	pair.SetIdleTimeout(t.IdleTimeout)
	r := &relayed{pair: pair, d: d, tcp: true}
	m := p.tel.OpenTCP(&labels)
	var maxDuration *time.Timer
	if t.MaxConnectionDuration > 0 {
		maxDuration = time.AfterFunc(t.MaxConnectionDuration, func() { pair.Close(errMaxDuration) })
	}
	addr := ep.Address
	p.startRelay(r, snap, up, func(res relay.Result) {
		if maxDuration != nil {
			maxDuration.Stop()
		}
		cs.end(addr)
		m.Received(res.AToB)
		m.Sent(res.BToA)
		m.Close()
		err := res.Err
		if errors.Is(err, relay.ErrIdleTimeout) {
			err = errIdleTimeout
		}
		p.logTCP(d, ch, addr.String(), labels, start, res.AToB, res.BToA, 0, 0, err)
	})
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
	conns := make([]*relayed, 0, len(p.relays))
	for r := range p.relays {
		if r.tcp {
			conns = append(conns, r)
		}
	}
	p.mu.Unlock()
	for _, r := range conns {
		p.recheck(r, s)
	}
}

// recheck closes r when s no longer admits it.
func (p *Proxy) recheck(r *relayed, s *snapshot) {
	var ch *config.Chain
	if s.cfg != nil && s.cfg.Dispatch != nil {
		ch = s.cfg.Dispatch.Lookup(r.d.in)
	}
	if ch == nil || ch.Err != nil || ch.TCP == nil || !tcpAllowed(ch.TCP, r.d) {
		p.counts.refuse(causeRBAC)
		r.pair.Close(errRevoked)
	}
}
