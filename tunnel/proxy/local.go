package proxy

import (
	"cmp"
	"crypto/tls"
	"fmt"
	"net"
	"net/netip"
	"os"
	"time"

	"golang.org/x/sys/unix"

	"github.com/amber-mesh/amber/tunnel/relay"
)

// localHandshakeTimeout bounds the server side of an in-process HBONE
// handshake, like hbone.Server's for network connections.
const localHandshakeTimeout = 10 * time.Second

// dialLocal connects to this proxy's own HBONE server for a pod on this
// node. The capture only sees packets leaving pods and arriving on
// uplinks, so the node's own SYN to podIP:15008 would go into the pod, not
// to the listener. Instead a socket pair carries the very same TLS and
// HTTP/2 exchange into the HBONE server, whose connection reports addr as
// its local address and src (the client pod's address, the loopback
// when zero) as its remote one: certificate choice, authority check,
// authorization, metrics and logs are those of a remote client.
func (p *Proxy) dialLocal(src netip.Addr, addr netip.AddrPort) (net.Conn, error) {
	client, sc, err := socketPair(netip.AddrPortFrom(cmp.Or(src, netip.IPv6Loopback()), 0), addr)
	if err != nil {
		return nil, err
	}
	p.wg.Add(1)
	go p.serveLocal(sc)
	return client, nil
}

// dialLocalInbound connects a plain TCP connection from src to dst, a pod
// this node captures, through this proxy's inbound plaintext handler, as
// Istio's destination ztunnel takes a plaintext connection to its pod
// (in-pod redirection to 15006). Dialled directly, from the source pod's
// address with the bypass mark, it would pass the datapath and reach the
// pod past its checks: while the mesh does not describe the destination
// (a new pod, a ztunnel just started) or describes it as plain TCP
// (captured before istiod saw it), that is plaintext past the destination
// pod's policy. In process the handler sees src as peer and dst as local
// address and refuses an unknown destination or what its policy denies,
// as for any plaintext client; what it admits it dials from src's address.
func (p *Proxy) dialLocalInbound(src, dst netip.AddrPort) (relay.Conn, error) {
	client, sc, err := socketPair(src, dst)
	if err != nil {
		return nil, err
	}
	p.wg.Add(1)
	go func() {
		defer p.wg.Done()
		p.handleInbound(sc)
	}()
	return client, nil
}

// socketPair is a connected pair of stream sockets whose second end
// reports remote and local as its addresses.
func socketPair(remote, local netip.AddrPort) (*net.UnixConn, *addrConn, error) {
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, nil, fmt.Errorf("socketpair: %w", err)
	}
	client, err := fileConn(fds[0])
	if err != nil {
		unix.Close(fds[1])
		return nil, nil, err
	}
	server, err := fileConn(fds[1])
	if err != nil {
		client.Close()
		return nil, nil, err
	}
	return client, &addrConn{UnixConn: server, local: net.TCPAddrFromAddrPort(local), remote: net.TCPAddrFromAddrPort(remote)}, nil
}

// serveLocal runs the server side of an in-process HBONE connection.
func (p *Proxy) serveLocal(sc net.Conn) {
	defer p.wg.Done()
	sc.SetDeadline(time.Now().Add(localHandshakeTimeout))
	tc := tls.Server(sc, p.server.TLSConfig)
	if err := tc.HandshakeContext(p.ctx); err != nil {
		p.hstats.HandshakeErrors.Add(1)
		sc.Close()
		return
	}
	sc.SetDeadline(time.Time{})
	_ = p.server.ServeConn(p.ctx, tc)
}

func fileConn(fd int) (*net.UnixConn, error) {
	f := os.NewFile(uintptr(fd), "local")
	defer f.Close()
	c, err := net.FileConn(f)
	if err != nil {
		return nil, fmt.Errorf("socketpair conn: %w", err)
	}
	return c.(*net.UnixConn), nil
}

// addrConn reports chosen addresses in place of a socket pair's; it
// half-closes as the socket does.
type addrConn struct {
	*net.UnixConn
	local, remote net.Addr
}

func (c *addrConn) LocalAddr() net.Addr  { return c.local }
func (c *addrConn) RemoteAddr() net.Addr { return c.remote }
