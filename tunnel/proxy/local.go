package proxy

import (
	"crypto/tls"
	"fmt"
	"net"
	"net/netip"
	"os"
	"time"

	"golang.org/x/sys/unix"
)

// localHandshakeTimeout bounds the server side of an in-process HBONE
// handshake, like hbone.Server's for network connections.
const localHandshakeTimeout = 10 * time.Second

// dialLocal connects to this proxy's own HBONE server for a pod on this
// node. The capture only sees packets leaving pods and arriving on
// uplinks, so the node's own SYN to podIP:15008 would go into the pod, not
// to the listener. Instead a socket pair carries the very same TLS and
// HTTP/2 exchange into the HBONE server, whose connection reports addr as
// its local address: certificate choice, authority check, authorization,
// metrics and logs are those of a remote client.
func (p *Proxy) dialLocal(addr netip.AddrPort) (net.Conn, error) {
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("socketpair: %w", err)
	}
	client, err := fileConn(fds[0])
	if err != nil {
		unix.Close(fds[1])
		return nil, err
	}
	server, err := fileConn(fds[1])
	if err != nil {
		client.Close()
		return nil, err
	}
	sc := &addrConn{Conn: server,
		local:  net.TCPAddrFromAddrPort(addr),
		remote: net.TCPAddrFromAddrPort(netip.AddrPortFrom(netip.IPv6Loopback(), 0)),
	}
	p.wg.Add(1)
	go p.serveLocal(sc)
	return client, nil
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

func fileConn(fd int) (net.Conn, error) {
	f := os.NewFile(uintptr(fd), "hbone-local")
	defer f.Close()
	c, err := net.FileConn(f)
	if err != nil {
		return nil, fmt.Errorf("socketpair conn: %w", err)
	}
	return c, nil
}

// addrConn reports chosen addresses in place of a socket pair's.
type addrConn struct {
	net.Conn
	local, remote net.Addr
}

func (c *addrConn) LocalAddr() net.Addr  { return c.local }
func (c *addrConn) RemoteAddr() net.Addr { return c.remote }
