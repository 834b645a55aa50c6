package proxy

import (
	"bufio"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"strings"
	"sync/atomic"
	"time"

	"github.com/amber-mesh/amber/tunnel/accept"
	"github.com/amber-mesh/amber/tunnel/relay"
	"github.com/amber-mesh/amber/waypoint/config"
)

// An ingress gateway (router node) serves plain HTTP on the socket
// listeners istiod gives it (config.Gateway): each accepted connection is
// an inner connection as a CONNECT stream is for the waypoint, with the
// gateway listener's one chain instead of main_internal's dispatch, and
// the client's address as its peer. The data path opens and closes the
// listeners as configurations come and go.

// gatewayListener is one open listen address.
type gatewayListener struct {
	addr netip.AddrPort
	ln   net.Listener
	// name is the gateway listener (config.Gateway.Name) the address
	// belongs to in the current configuration.
	name atomic.Pointer[string]
}

// Refusal causes of gateway listeners: a listen address that could not
// be opened; a TLS handshake refused (no certificate, SNI no chain
// serves, the client's failure).
const (
	causeListen     = "gateway_listen_failed"
	causeGatewayTLS = "gateway_tls_handshake"
)

// gatewayTLS is the TLS of the named gateway listener in the current
// configuration, nil for plain text.
func (p *Proxy) gatewayTLS(name string) *config.GatewayTLS {
	if s := p.snapshot(); s != nil && s.cfg != nil {
		if g := s.cfg.Gateways[name]; g != nil {
			return g.TLS
		}
	}
	return nil
}

// handshakeGateway terminates TLS on a gateway connection with the
// certificate of the configuration current at the ClientHello: the
// listener's Secret, for the SNI names its chain serves, within the
// header timeout.
func (p *Proxy) handshakeGateway(c net.Conn, name string) (*tls.Conn, error) {
	cfg := &tls.Config{GetConfigForClient: func(hello *tls.ClientHelloInfo) (*tls.Config, error) {
		t := p.gatewayTLS(name)
		switch {
		case t == nil:
			return nil, errors.New("the listener no longer terminates TLS")
		case t.Certificate == nil:
			return nil, fmt.Errorf("no certificate: secret %s missing or refused", t.SecretName)
		case !t.MatchesSNI(hello.ServerName):
			return nil, fmt.Errorf("server name %q: no chain serves it", hello.ServerName)
		}
		return &tls.Config{Certificates: []tls.Certificate{*t.Certificate}, NextProtos: t.ALPN, MinVersion: t.MinVersion, MaxVersion: t.MaxVersion}, nil
	}}
	tc := tls.Server(c, cfg)
	ctx, cancel := context.WithTimeout(p.ctx, p.lim.HeaderTimeout)
	defer cancel()
	if err := tc.HandshakeContext(ctx); err != nil {
		return nil, err
	}
	return tc, nil
}

// syncGateways opens the listen addresses of c's gateways that are not
// open and closes those c no longer has. Called from Update, in order.
func (p *Proxy) syncGateways(c *config.Config) {
	want := map[netip.AddrPort]string{}
	if c != nil && c.Router {
		want = c.GatewayAddresses()
	}
	p.mu.Lock()
	if p.closed || p.draining {
		p.mu.Unlock()
		return
	}
	var closing []*gatewayListener
	for a, gl := range p.gateways {
		if _, ok := want[a]; !ok {
			closing = append(closing, gl)
			delete(p.gateways, a)
		}
	}
	var opening []netip.AddrPort
	for a, name := range want {
		if gl, ok := p.gateways[a]; ok {
			gl.name.Store(&name)
			continue
		}
		opening = append(opening, a)
	}
	p.mu.Unlock()
	for _, gl := range closing {
		gl.ln.Close()
	}
	for _, a := range opening {
		ln, err := p.cfg.Listen(p.ctx, a)
		if err != nil {
			p.counts.refuse(causeListen)
			p.log.Error("gateway listener not opened; its requests fail until a configuration opens it", "address", a.String(), logKeyError, err)
			continue
		}
		gl := &gatewayListener{addr: a, ln: ln}
		name := want[a]
		gl.name.Store(&name)
		p.mu.Lock()
		if p.closed || p.draining {
			p.mu.Unlock()
			ln.Close()
			return
		}
		p.gateways[a] = gl
		p.mu.Unlock()
		p.log.Info("gateway listening", "listener", name, "address", ln.Addr().String())
		go p.serveGateway(gl)
	}
}

// GatewayAddrs returns the addresses the gateway listeners are open on,
// by configured address (tests listening on port 0 read the real one).
func (p *Proxy) GatewayAddrs() map[netip.AddrPort]net.Addr {
	p.mu.Lock()
	defer p.mu.Unlock()
	out := map[netip.AddrPort]net.Addr{}
	for a, gl := range p.gateways {
		out[a] = gl.ln.Addr()
	}
	return out
}

// closeGateways closes every gateway listener (Drain, Close).
func (p *Proxy) closeGateways() {
	p.mu.Lock()
	gls := p.gateways
	p.gateways = map[netip.AddrPort]*gatewayListener{}
	p.mu.Unlock()
	for _, gl := range gls {
		gl.ln.Close()
	}
}

func (p *Proxy) serveGateway(gl *gatewayListener) {
	err := accept.Serve(p.ctx, gl.ln, accept.Options{Name: "gateway " + gl.addr.String(), Logger: p.log}, func(c net.Conn) {
		go p.serveGatewayConn(gl, c)
	})
	if err != nil && !errors.Is(err, net.ErrClosed) && p.ctx.Err() == nil {
		p.log.Error("gateway listener ended", "address", gl.addr.String(), logKeyError, err)
	}
}

// serveGatewayConn serves one client connection's HTTP/1.1 requests, or
// HTTP/2 with prior knowledge, through the listener's chain.
func (p *Proxy) serveGatewayConn(gl *gatewayListener, c net.Conn) {
	rc, ok := c.(relay.Conn)
	if !ok {
		c.Close()
		return
	}
	name := *gl.name.Load()
	if t := p.gatewayTLS(name); t != nil {
		tc, err := p.handshakeGateway(c, name)
		if err != nil {
			p.counts.refuse(causeGatewayTLS)
			p.log.Info(accessLogMsg, logKeyKind, "tls", logKeyGateway, name, logKeySrcAddr, c.RemoteAddr().String(), logKeyError, err.Error())
			c.Close()
			return
		}
		rc = tc
	}
	local := addrPort(c.LocalAddr())
	d := &downstream{
		p: p, peerAddr: addrPort(c.RemoteAddr()), gateway: name, tls: rc != c,
		in:     config.Input{Destination: local, Authority: local.String()},
		source: p.cfg.Self, stream: rc,
	}
	if !p.track(d) {
		c.Close()
		return
	}
	defer p.untrack(d)
	if p.serveHTTP(p.ctx, d, bufio.NewReader(rc)) {
		return // an upgrade's relay took the connection
	}
	lingerClose(rc)
}

// lingerClose ends a client connection the gateway is done with: its
// write side first, then what the client still sends is read and dropped
// for a moment, so that the last response is not lost to a reset.
func lingerClose(c relay.Conn) {
	if c.CloseWrite() == nil {
		c.SetReadDeadline(time.Now().Add(lingerTime))
		io.Copy(io.Discard, io.LimitReader(c, maxDrainBody))
	}
	c.Close()
}

// defaultListen listens on TCP.
func defaultListen(ctx context.Context, a netip.AddrPort) (net.Listener, error) {
	return (&net.ListenConfig{}).Listen(ctx, "tcp", a.String())
}

// gatewayTrustDomain is the trust domain a gateway's onward HBONE peers
// must be in: istiod's SAN prefix spiffe://<td>/ on connect_originate,
// else the gateway's own.
func (p *Proxy) gatewayTrustDomain(o *config.Originate) string {
	if o != nil {
		for _, pre := range o.SANPrefixes {
			if td, ok := strings.CutPrefix(pre, "spiffe://"); ok {
				if td, ok = strings.CutSuffix(td, "/"); ok && td != "" && !strings.Contains(td, "/") {
					return td
				}
			}
		}
	}
	return p.cfg.Identity.TrustDomain
}
