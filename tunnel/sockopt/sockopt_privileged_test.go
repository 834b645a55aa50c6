package sockopt

import (
	"context"
	"net"
	"net/netip"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/amber-mesh/amber/bpf"

	"github.com/amber-mesh/amber/test/privileged"
)

func getInt(t *testing.T, c syscall.Conn, level, opt int) int {
	t.Helper()
	rc, err := c.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var v int
	var serr error
	rc.Control(func(fd uintptr) { v, serr = unix.GetsockoptInt(int(fd), level, opt) })
	if serr != nil {
		t.Fatal(serr)
	}
	return v
}

// The options the datapath depends on are really set: a listener that is
// transparent on both families and plain TCP (an MPTCP socket cannot enter
// the SOCKMAP), and dials that carry the bypass mark.
func TestPrivilegedSocketOptions(t *testing.T) {
	privileged.Require(t)
	ctx := context.Background()
	ln, err := Options{}.Listen(ctx, "[::1]:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	if getInt(t, ln, unix.SOL_SOCKET, unix.SO_PROTOCOL) != unix.IPPROTO_TCP {
		t.Error("listener is not plain TCP (MPTCP on?)")
	}
	if getInt(t, ln, unix.SOL_IPV6, unix.IPV6_TRANSPARENT) != 1 || getInt(t, ln, unix.SOL_IP, unix.IP_TRANSPARENT) != 1 {
		t.Error("listener is not transparent")
	}
	if getInt(t, ln, unix.SOL_SOCKET, unix.SO_MARK) != bpf.BypassMark {
		t.Error("listener lacks the bypass mark")
	}

	dst := netip.MustParseAddrPort(ln.Addr().String())
	c, err := Options{}.Dial(ctx, dst, netip.Addr{})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	// An accepted connection has Go's keep-alive and no-delay settings,
	// inherited from the listener rather than set on each one.
	ac, err := ln.AcceptTCP()
	if err != nil {
		t.Fatal(err)
	}
	defer ac.Close()
	for _, o := range []struct {
		name       string
		level, opt int
		want       int
	}{
		{"SO_KEEPALIVE", unix.SOL_SOCKET, unix.SO_KEEPALIVE, 1},
		{"TCP_KEEPIDLE", unix.IPPROTO_TCP, unix.TCP_KEEPIDLE, 15},
		{"TCP_KEEPINTVL", unix.IPPROTO_TCP, unix.TCP_KEEPINTVL, 15},
		{"TCP_KEEPCNT", unix.IPPROTO_TCP, unix.TCP_KEEPCNT, 9},
		{"TCP_NODELAY", unix.IPPROTO_TCP, unix.TCP_NODELAY, 1},
	} {
		if got := getInt(t, ac, o.level, o.opt); got != o.want {
			t.Errorf("accepted connection: %s %d, want %d", o.name, got, o.want)
		}
	}
	if getInt(t, c, unix.SOL_SOCKET, unix.SO_MARK) != bpf.BypassMark {
		t.Error("dialed socket lacks the bypass mark")
	}
	if getInt(t, c, unix.SOL_SOCKET, unix.SO_PROTOCOL) != unix.IPPROTO_TCP {
		t.Error("dialed socket is not plain TCP")
	}

	// A preserved source: bound with SO_REUSEADDR to a port of
	// SourcePorts.
	c2, err := Options{}.Dial(ctx, dst, netip.MustParseAddr("::1"))
	if err != nil {
		t.Fatal(err)
	}
	defer c2.Close()
	if getInt(t, c2, unix.SOL_SOCKET, unix.SO_REUSEADDR) != 1 {
		t.Error("SO_REUSEADDR not set on a sourced dial")
	}
	if got := c2.LocalAddr().(*net.TCPAddr).IP.String(); got != "::1" {
		t.Errorf("source %s, want ::1", got)
	}
	// Its port is outside the pods' ephemeral range (host conntrack
	// clashes with a pod's own connections otherwise).
	if p := c2.LocalAddr().(*net.TCPAddr).Port; p < int(DefaultSourcePorts[0]) || p > int(DefaultSourcePorts[1]) {
		t.Errorf("source port %d outside %v", p, DefaultSourcePorts)
	}
	if _, err := (Options{}).Dial(ctx, dst, netip.MustParseAddr("127.0.0.1")); err == nil {
		t.Error("dial with a source of the other family succeeded")
	}
}
