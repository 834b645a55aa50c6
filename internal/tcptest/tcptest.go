// Package tcptest gives tests real TCP connections: both ends of one on
// loopback addresses, and a server that serves a listener until the test
// ends.
package tcptest

import (
	"net"
	"net/netip"
	"testing"
)

// Pair returns both ends of a TCP connection on 127.0.0.1, closed when tb
// ends.
func Pair(tb testing.TB) (a, b *net.TCPConn) {
	tb.Helper()
	lo := netip.MustParseAddr("127.0.0.1")
	a, b, ln := Conn(tb, lo, lo)
	ln.Close()
	return a, b
}

// Conn returns both ends of a TCP connection from src to a new listener on
// dst, and the listener; all are closed when tb ends. The accepted end has
// dst as its local address, as a captured connection has its original
// destination. src and dst must be loopback addresses (127.0.0.0/8, ::1).
func Conn(tb testing.TB, src, dst netip.Addr) (client, accepted *net.TCPConn, ln *net.TCPListener) {
	tb.Helper()
	if !src.IsLoopback() || !dst.IsLoopback() {
		tb.Fatalf("tcptest: %s → %s: tests use loopback addresses only", src, dst)
	}
	ln, err := net.ListenTCP("tcp", net.TCPAddrFromAddrPort(netip.AddrPortFrom(dst, 0)))
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { ln.Close() })
	d := net.Dialer{LocalAddr: net.TCPAddrFromAddrPort(netip.AddrPortFrom(src, 0))}
	c, err := d.Dial("tcp", ln.Addr().String())
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { c.Close() })
	a, err := ln.AcceptTCP()
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { a.Close() })
	return c.(*net.TCPConn), a, ln
}
