package proxy

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"strings"
	"sync"
	"time"

	"github.com/amber-mesh/amber/tunnel/certs"
	"github.com/amber-mesh/amber/tunnel/hbone"
	"github.com/amber-mesh/amber/tunnel/identity"
	"github.com/amber-mesh/amber/tunnel/relay"
	"github.com/amber-mesh/amber/waypoint/config"
	"github.com/amber-mesh/amber/waypoint/telemetry"
	"github.com/amber-mesh/amber/xds/state"
)

// Refusals of a CONNECT, before anything is served in the tunnel.
var (
	errNoConfig     = errors.New("no configuration (connect_terminate or main_internal missing or refused)")
	errNoChain      = errors.New("no filter chain matches the CONNECT's destination")
	errNotTLS       = errors.New("HBONE connection without a verified peer certificate")
	errChainChanged = errors.New("the connection's filter chain is gone or no longer HTTP")
)

// downstream is one inner connection: a CONNECT stream the waypoint
// accepted, with what is known of its client.
type downstream struct {
	p *Proxy
	// peer is the HBONE client's identity (io.istio.peer_principal) and
	// peerAddr its address (source.ip, direct_remote_ip).
	peer     identity.ID
	peerAddr netip.AddrPort
	// in is what main_internal dispatched the stream on; HTTP requests
	// re-dispatch with it against the configuration current when they
	// start.
	in config.Input
	// source is the client's workload for telemetry.
	source telemetry.Peer

	// stream is the accepted CONNECT stream of an HTTP chain, or a
	// gateway listener's accepted connection.
	stream relay.Conn
	// gateway is the name of the gateway listener (router) the
	// connection came in on; empty inside HBONE. tls is set when the
	// gateway terminated TLS on it (the scheme is https).
	gateway string
	tls     bool

	mu       sync.Mutex // guards the fields below
	idle     bool       // an HTTP/1 connection waiting for its next request
	draining bool
	goAway   func() // an HTTP/2 connection's graceful end
}

// serveConnect answers one CONNECT on :15008. Refusals before the tunnel
// is accepted are CONNECT statuses, as Istio's ztunnel answers a CONNECT
// it cannot serve: 400 when no filter chain matches the :authority (what
// ztunnel answers for a destination it does not serve; Envoy would accept
// and then close the inner connection, which a client sees the same way),
// 503 when the chain or the whole configuration was refused (fail
// closed), 401 when network RBAC denies a TCP chain. Verdicts on HTTP
// requests are HTTP responses inside the accepted tunnel.
func (p *Proxy) serveConnect(ctx context.Context, req *hbone.Request, rw hbone.Responder) {
	d := &downstream{p: p, peerAddr: addrPort(req.Conn.RemoteAddr()), in: config.Input{Destination: req.Addr, Authority: req.Authority}}
	tc, ok := req.Conn.(*tls.Conn)
	if ok {
		id, err := certs.PeerID(tc.ConnectionState())
		ok = err == nil
		d.peer = id
	}
	if !ok {
		p.rejectConnect(d, rw, http.StatusBadRequest, causeNotTLS, errNotTLS)
		return
	}
	snap := p.snapshot()
	d.source = sourcePeer(p.cfg.Store.Load(), d.peerAddr.Addr(), req.Header.Get("Forwarded"), d.peer)
	if snap == nil || snap.cfg == nil || snap.cfg.Dispatch == nil || snap.cfg.Terminate == nil {
		p.rejectConnect(d, rw, http.StatusServiceUnavailable, causeNoConfig, errNoConfig)
		return
	}
	// main_internal sniffs the protocol of some ports (http_inspector),
	// which needs the stream's first bytes, which the client sends only
	// after the 200. Dispatch first without them; only a port that needs
	// them makes the waypoint accept before it knows the chain.
	sniff := false
	in := d.in
	in.Protocol = func() string { sniff = true; return "" }
	ch := snap.cfg.Dispatch.Lookup(in)
	var s *hbone.Stream
	var br *bufio.Reader
	if sniff {
		var err error
		if s, err = rw.Accept(); err != nil {
			return
		}
		br = bufio.NewReader(s)
		proto := sniffProtocol(s, br, p.lim.HeaderTimeout)
		d.in.Protocol = func() string { return proto }
		ch = snap.cfg.Dispatch.Lookup(d.in)
	}
	refuse := func(status int, cause string, err error) {
		if s != nil {
			p.counts.refuse(cause)
			p.logConnect(d, ch, status, err)
			s.Close()
			return
		}
		p.rejectConnect(d, rw, status, cause, err)
	}
	switch {
	case ch == nil:
		refuse(http.StatusBadRequest, causeNoChain, fmt.Errorf("%w: %s", errNoChain, req.Authority))
		return
	case ch.Err != nil:
		refuse(http.StatusServiceUnavailable, causeChainRefused, fmt.Errorf("chain %s: %w", ch.Name, ch.Err))
		return
	case ch.TCP != nil:
		p.serveTCP(ctx, d, snap, ch, rw, s, br)
		return
	}
	if s == nil {
		var err error
		if s, err = rw.Accept(); err != nil {
			return
		}
		br = bufio.NewReader(s)
	}
	d.stream = s
	if !p.track(d) {
		s.Close()
		return
	}
	defer p.untrack(d)
	if p.serveHTTP(ctx, d, br) {
		return // an upgrade's relay took the stream
	}
	// END_STREAM, then the close once the client ended its side: closing
	// at once would reset the stream, and the client's ztunnel could drop
	// the last response (often a local reply saying why the connection
	// ends) with it.
	s.CloseLinger(lingerTime)
}

// lingerTime bounds how long an inner connection the waypoint ended waits
// for its client to end its side before it is reset.
const lingerTime = 2 * time.Second

// rejectConnect answers a CONNECT with a non-200 status and reports it.
func (p *Proxy) rejectConnect(d *downstream, rw hbone.Responder, status int, cause string, err error) {
	p.counts.refuse(cause)
	_ = rw.Reject(status, err.Error())
	p.logConnect(d, nil, status, err)
}

// logConnect logs a CONNECT refused before anything was served in it.
func (p *Proxy) logConnect(d *downstream, ch *config.Chain, status int, err error) {
	attrs := []any{
		logKeyKind, "connect",
		logKeySrcAddr, d.peerAddr.String(),
		logKeySrcID, d.peer.String(),
		logKeyDst, d.in.Authority,
		logKeyStatus, status,
		logKeyError, err.Error(),
	}
	if ch != nil {
		attrs = append(attrs, logKeyChain, ch.Name)
	}
	p.log.Info(accessLogMsg, attrs...)
}

// sniffProtocol is Envoy's http_inspector on the stream's first bytes:
// "h2c" for the HTTP/2 preface, "http/1.1" or "http/1.0" for an HTTP/1
// request line, "" for anything else, for a first line longer than br's
// buffer, or for nothing within timeout (a protocol whose server speaks
// first).
func sniffProtocol(s net.Conn, br *bufio.Reader, timeout time.Duration) string {
	s.SetReadDeadline(time.Now().Add(timeout))
	defer s.SetReadDeadline(time.Time{})
	pre := []byte(h2Preface)
	for n := 1; n <= br.Size(); {
		b, err := br.Peek(n)
		switch {
		case bytes.HasPrefix(b, pre):
			return "h2c"
		case bytes.HasPrefix(pre, b):
			// Still possibly the preface, whose first line is not HTTP/1's.
		default:
			if i := bytes.IndexByte(b, '\n'); i >= 0 {
				line := string(bytes.TrimRight(b[:i], "\r"))
				switch {
				case strings.HasSuffix(line, " HTTP/1.1"):
					return "http/1.1"
				case strings.HasSuffix(line, " HTTP/1.0"):
					return "http/1.0"
				}
				return ""
			}
		}
		if err != nil {
			return ""
		}
		n = max(len(b), br.Buffered()) + 1
	}
	return ""
}

// sourcePeer is the client's workload for telemetry. Envoy takes the
// workload WDS has at the HBONE peer's address. amber requires that
// workload to carry the identity the peer proved, and otherwise takes the
// workload at the CONNECT's `forwarded: for=` address under the same
// condition, the rule of amber's ztunnel inbound: a ztunnel that dials
// from its node's address (amber's today) still gets its client's labels,
// and no client can borrow another identity's workload. Without either,
// only the principal is known.
func sourcePeer(snap *state.Snapshot, peerIP netip.Addr, forwarded string, peer identity.ID) telemetry.Peer {
	w := snap.WorkloadByAddr(state.NetworkAddr{Addr: peerIP.Unmap()})
	if w == nil || workloadID(w) != peer {
		w = nil
		if fwd, ok := hbone.ForwardedFor(forwarded); ok {
			if fw := snap.WorkloadByAddr(state.NetworkAddr{Addr: fwd.Addr()}); fw != nil && workloadID(fw) == peer {
				w = fw
			}
		}
	}
	if w == nil {
		return telemetry.Peer{Principal: peer.String()}
	}
	return peerOf(w)
}

// workloadID is a workload's SPIFFE identity.
func workloadID(w *state.Workload) identity.ID {
	return identity.ID{TrustDomain: w.TrustDomain, Namespace: w.Namespace, ServiceAccount: w.ServiceAccount}
}

// peerOf is Istio's workload metadata from WDS (envoy contrib/istio
// workload_discovery convert): app and version are the canonical name and
// revision; the workload is the controller's name.
func peerOf(w *state.Workload) telemetry.Peer {
	name := w.WorkloadName
	if name == "" {
		name = w.Name
	}
	return telemetry.Peer{
		Workload: name, Namespace: w.Namespace,
		CanonicalService: w.CanonicalName, CanonicalRevision: w.CanonicalRevision,
		Principal: workloadID(w).String(),
		App:       w.CanonicalName, Version: w.CanonicalRevision,
		Cluster: w.ClusterID,
	}
}

// addrPort converts a socket address, IPv4-mapped addresses as IPv4.
func addrPort(a net.Addr) netip.AddrPort {
	if ta, ok := a.(*net.TCPAddr); ok {
		ap := ta.AddrPort()
		return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
	}
	ap, _ := netip.ParseAddrPort(a.String())
	return ap
}

func (d *downstream) setIdle(idle bool) bool {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.idle = idle
	return d.draining
}

// drain ends an idle HTTP/1 connection now and any other after its
// current response, and an HTTP/2 one with GOAWAY once its streams are
// done: waking the idle wait with a deadline lets the loop end the stream
// cleanly (END_STREAM), where closing would reset it.
func (d *downstream) drain() {
	d.mu.Lock()
	d.draining = true
	if d.idle && d.stream != nil {
		d.stream.SetReadDeadline(time.Now())
	}
	goAway := d.goAway
	d.mu.Unlock()
	if goAway != nil {
		goAway()
	}
}

// setGoAway registers an HTTP/2 connection's graceful end, which a drain
// already under way runs at once.
func (d *downstream) setGoAway(f func()) {
	d.mu.Lock()
	d.goAway = f
	draining := d.draining
	d.mu.Unlock()
	if draining {
		f()
	}
}

func (d *downstream) isDraining() bool {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.draining
}
