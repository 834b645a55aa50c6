// Package sockopt opens the ztunnel's sockets the way the datapath needs
// them: transparent dual-stack listeners without MPTCP, and outbound
// connections carrying the bypass mark, optionally from a foreign source.
package sockopt

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"net/netip"
	"strconv"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/amber-mesh/amber/bpf"
)

// Options selects the socket options. The zero value is what the ztunnel
// uses in production: every socket carries bpf.BypassMark and listeners are
// transparent.
type Options struct {
	// Mark is the SO_MARK of every socket. Zero means bpf.BypassMark;
	// negative means none (no CAP_NET_ADMIN needed).
	Mark int
	// NoTransparent leaves IP_TRANSPARENT off on listeners (which then
	// accept only connections addressed to a local address) and makes a
	// Dial source that is not local fail. False means transparent, which
	// needs CAP_NET_ADMIN.
	NoTransparent bool
	// SourcePorts is the range a Dial from a preserved (pod) source takes
	// its port from. Zero means DefaultSourcePorts. The datapath returns
	// the node's own replies to such a dial (a server on one of the node's
	// addresses) only at ports from bpf.DialPortMin up.
	SourcePorts [2]uint16
}

// DefaultSourcePorts lie above Linux's default ephemeral range
// (32768–60999), which pods use for their own connections.
var DefaultSourcePorts = [2]uint16{bpf.DialPortMin, 65535}

func (o Options) sourcePorts() (lo, hi uint16) {
	if o.SourcePorts == [2]uint16{} {
		return DefaultSourcePorts[0], DefaultSourcePorts[1]
	}
	return o.SourcePorts[0], o.SourcePorts[1]
}

func (o Options) mark() int {
	if o.Mark == 0 {
		return bpf.BypassMark
	}
	return o.Mark
}

// Listen opens a TCP listener on addr ("[::]:15001" for dual stack).
// MPTCP is off because Go ≥ 1.24 listeners are MPTCP by default and an
// MPTCP socket cannot be put into a SOCKMAP (docs/facts.md §2); IP_TRANSPARENT
// is on because without it the kernel never answers a SYN assigned by
// bpf_sk_assign for a foreign address.
//
// The keep-alive settings Go gives every accepted connection (on, 15 s
// idle, 15 s between probes, 9 probes) are set once on the listener
// instead: an accepted socket inherits them from it (the kernel clones the
// listener's socket), which saves four setsockopt calls per connection.
func (o Options) Listen(ctx context.Context, addr string) (*net.TCPListener, error) {
	lc := net.ListenConfig{KeepAlive: -1, Control: func(network, _ string, c syscall.RawConn) error {
		if err := o.setMark(c); err != nil {
			return err
		}
		if err := setKeepAlive(c); err != nil {
			return err
		}
		if o.NoTransparent {
			return nil
		}
		return setTransparent(network, c)
	}}
	lc.SetMultipathTCP(false)
	ln, err := lc.Listen(ctx, "tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("listen %s: %w", addr, err)
	}
	return ln.(*net.TCPListener), nil
}

// ListenLoopback opens the transparent listeners of a captured port on
// loopback, one per family: 127.0.0.1:port and [::1]:port. The datapath's
// bpf_sk_assign hands a listener its SYNs whatever address the listener is
// bound to, while the kernel's own lookup finds a loopback listener only
// for connections made on the host itself, so nothing on the network can
// connect to it directly. A v6 SYN needs an AF_INET6 socket (assigned to
// an AF_INET one it is never answered); a socket per family keeps IPv4
// served on a host without IPv6, where v6 is nil and IPv6 connections
// find no listener: they fail closed.
func (o Options) ListenLoopback(ctx context.Context, port uint16) (v4, v6 *net.TCPListener, err error) {
	p := strconv.Itoa(int(port))
	if v4, err = o.Listen(ctx, "127.0.0.1:"+p); err != nil {
		return nil, nil, err
	}
	v6, err = o.Listen(ctx, "[::1]:"+p)
	if errors.Is(err, syscall.EADDRNOTAVAIL) || errors.Is(err, syscall.EAFNOSUPPORT) {
		return v4, nil, nil
	}
	if err != nil {
		v4.Close()
		return nil, nil, err
	}
	return v4, v6, nil
}

// Dial connects to dst. When src is valid the socket is bound to it first,
// with a random port from SourcePorts; a foreign src needs IP_TRANSPARENT, which
// is set unless NoTransparent. Replies to a foreign source come back to
// this socket through the datapath's established-socket lookup, which
// requires the bypass mark.
func (o Options) Dial(ctx context.Context, dst netip.AddrPort, src netip.Addr) (*net.TCPConn, error) {
	// One Control call sets every option: each call is a closure and an
	// fd lock, per connection.
	mark, transparent := o.mark(), src.IsValid() && !o.NoTransparent
	d := net.Dialer{Control: func(network, _ string, c syscall.RawConn) error {
		var serr error
		err := c.Control(func(fd uintptr) {
			if mark >= 0 {
				if serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_MARK, mark); serr != nil {
					serr = fmt.Errorf("set SO_MARK: %w", serr)
					return
				}
			}
			if !src.IsValid() {
				return
			}
			if transparent {
				if serr = setTransparentFD(network, int(fd)); serr != nil {
					return
				}
			}
			// Several sockets share a (source, port) towards different
			// destinations: the 4-tuple must be unique, not the binding.
			if serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_REUSEADDR, 1); serr != nil {
				serr = fmt.Errorf("set SO_REUSEADDR: %w", serr)
			}
		})
		if err != nil {
			return err
		}
		return serr
	}}
	d.SetMultipathTCP(false)
	network := "tcp4"
	if dst.Addr().Unmap().Is6() {
		network = "tcp6"
	}
	dst = netip.AddrPortFrom(dst.Addr().Unmap(), dst.Port())
	if !src.IsValid() {
		// DialTCP would bind a zero source to the wildcard first.
		c, err := d.DialContext(ctx, network, dst.String())
		if err != nil {
			return nil, err
		}
		return c.(*net.TCPConn), nil
	}
	src = src.Unmap()
	if src.Is4() != dst.Addr().Is4() {
		return nil, fmt.Errorf("dial %s from %s: address families differ", dst, src)
	}
	// The port comes from SourcePorts, not the host's ephemeral range: the
	// host's conntrack also tracks the pod's own connections (forwarded
	// through the node), and a port the pod uses towards the same
	// destination — a Service connection kube-proxy translated to it —
	// would clash there and the reply would never reach this socket.
	lo, hi := o.sourcePorts()
	var err error
	for range dialPortTries {
		port := lo + uint16(rand.IntN(int(hi-lo)+1))
		// DialTCP takes the addresses as they are, with no resolver.
		var c *net.TCPConn
		c, err = d.DialTCP(ctx, network, netip.AddrPortFrom(src, port), dst)
		if err == nil {
			return c, nil
		}
		if !errors.Is(err, syscall.EADDRINUSE) && !errors.Is(err, syscall.EADDRNOTAVAIL) {
			return nil, err
		}
	}
	return nil, fmt.Errorf("dial %s from %s: no free port in %d-%d after %d tries: %w", dst, src, lo, hi, dialPortTries, err)
}

// dialPortTries bounds the random ports a sourced Dial tries.
const dialPortTries = 16

func (o Options) setMark(c syscall.RawConn) error {
	m := o.mark()
	if m < 0 {
		return nil
	}
	var serr error
	if err := c.Control(func(fd uintptr) {
		serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_MARK, m)
	}); err != nil {
		return err
	}
	if serr != nil {
		return fmt.Errorf("set SO_MARK: %w", serr)
	}
	return nil
}

// Keep-alive of accepted connections: Go's defaults (net.KeepAliveConfig).
const (
	keepAliveIdle     = 15 // seconds
	keepAliveInterval = 15 // seconds
	keepAliveCount    = 9
)

// setKeepAlive sets a listener's keep-alive options, which the connections
// it accepts inherit.
func setKeepAlive(c syscall.RawConn) error {
	var serr error
	err := c.Control(func(fd uintptr) {
		for _, o := range []struct{ level, opt, v int }{
			{unix.SOL_SOCKET, unix.SO_KEEPALIVE, 1},
			{unix.IPPROTO_TCP, unix.TCP_KEEPIDLE, keepAliveIdle},
			{unix.IPPROTO_TCP, unix.TCP_KEEPINTVL, keepAliveInterval},
			{unix.IPPROTO_TCP, unix.TCP_KEEPCNT, keepAliveCount},
		} {
			if serr = unix.SetsockoptInt(int(fd), o.level, o.opt, o.v); serr != nil {
				return
			}
		}
	})
	if err != nil {
		return err
	}
	if serr != nil {
		return fmt.Errorf("set keep-alive: %w", serr)
	}
	return nil
}

func setTransparent(network string, c syscall.RawConn) error {
	var serr error
	if err := c.Control(func(fd uintptr) { serr = setTransparentFD(network, int(fd)) }); err != nil {
		return err
	}
	return serr
}

func setTransparentFD(network string, fd int) error {
	var err error
	if network != "tcp6" {
		err = unix.SetsockoptInt(fd, unix.SOL_IP, unix.IP_TRANSPARENT, 1)
	}
	if err == nil && network != "tcp4" {
		err = unix.SetsockoptInt(fd, unix.SOL_IPV6, unix.IPV6_TRANSPARENT, 1)
	}
	if err != nil {
		return fmt.Errorf("set IP_TRANSPARENT: %w", err)
	}
	return nil
}

// AddrPort returns a's address, unmapped, as the original destination or
// source of a connection.
func AddrPort(a net.Addr) netip.AddrPort {
	if ta, ok := a.(*net.TCPAddr); ok {
		ap := ta.AddrPort()
		return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
	}
	ap, _ := netip.ParseAddrPort(a.String())
	return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
}

// ip6tSoOriginalDst is IP6T_SO_ORIGINAL_DST (linux/netfilter_ipv6/ip6_tables.h).
const ip6tSoOriginalDst = 80

// OriginalDst returns the destination a connection had before the host's
// netfilter NAT rewrote it (SO_ORIGINAL_DST, IP6T_SO_ORIGINAL_DST): the
// Service address of a connection that kube-proxy translated after the
// datapath assigned it to a transparent listener. ok is false when the
// connection was not translated or conntrack does not know it.
func OriginalDst(c *net.TCPConn) (dst netip.AddrPort, ok bool) {
	rc, err := c.SyscallConn()
	if err != nil {
		return netip.AddrPort{}, false
	}
	local := AddrPort(c.LocalAddr())
	_ = rc.Control(func(fd uintptr) {
		if local.Addr().Is4() {
			// A struct sockaddr_in (family, port, address) read through
			// a helper with a large enough buffer.
			mreq, err := unix.GetsockoptIPv6Mreq(int(fd), unix.SOL_IP, unix.SO_ORIGINAL_DST)
			if err != nil {
				return
			}
			port := uint16(mreq.Multiaddr[2])<<8 | uint16(mreq.Multiaddr[3])
			dst = netip.AddrPortFrom(netip.AddrFrom4([4]byte(mreq.Multiaddr[4:8])), port)
			ok = true
			return
		}
		sa, err := unix.GetsockoptIPv6MTUInfo(int(fd), unix.SOL_IPV6, ip6tSoOriginalDst)
		if err != nil {
			return
		}
		pb := (*[2]byte)(unsafe.Pointer(&sa.Addr.Port)) // network byte order
		dst = netip.AddrPortFrom(netip.AddrFrom16(sa.Addr.Addr).Unmap(), uint16(pb[0])<<8|uint16(pb[1]))
		ok = true
	})
	if ok && dst == local {
		return netip.AddrPort{}, false
	}
	return dst, ok
}
