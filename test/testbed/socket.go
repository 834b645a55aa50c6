package testbed

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"os/exec"
	"strings"

	"github.com/vishvananda/netns"
)

// A socket belongs to the namespace of the thread that created it, for its
// whole life, so only socket creation has to happen inside ns.do; the
// blocking parts (accept, connect, I/O) then run anywhere.

func listen(ns *netNS, network, address string) (net.Listener, error) {
	var lc net.ListenConfig
	// Go >= 1.24 makes TCP listeners MPTCP by default; MPTCP sockets cannot
	// be put into a SOCKMAP or sk_assigned, and tcpdump would show MP options.
	lc.SetMultipathTCP(false)
	var ln net.Listener
	err := ns.do(func() error {
		var err error
		ln, err = lc.Listen(context.Background(), network, address)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("listen %s %s in %s: %w", network, address, ns.name, err)
	}
	return ln, nil
}

func listenPacket(ns *netNS, network, address string) (net.PacketConn, error) {
	var lc net.ListenConfig
	var pc net.PacketConn
	err := ns.do(func() error {
		var err error
		pc, err = lc.ListenPacket(context.Background(), network, address)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("listen %s %s in %s: %w", network, address, ns.name, err)
	}
	return pc, nil
}

func dial(ctx context.Context, ns *netNS, network, address string) (net.Conn, error) {
	if err := checkLiteral(network, address); err != nil {
		return nil, fmt.Errorf("dial %s %s in %s: %w", network, address, ns.name, err)
	}
	var d net.Dialer
	d.SetMultipathTCP(false)
	var c net.Conn
	err := ns.do(func() error {
		var err error
		c, err = d.DialContext(ctx, network, address)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("dial %s %s in %s: %w", network, address, ns.name, err)
	}
	return c, nil
}

// checkLiteral rejects host names for IP networks: the dialer may race
// connections to several resolved addresses on other goroutines (RFC 8305
// happy eyeballs), creating those sockets outside the namespace.
func checkLiteral(network, address string) error {
	host := address
	switch {
	case strings.HasPrefix(network, "tcp"), strings.HasPrefix(network, "udp"):
		h, _, err := net.SplitHostPort(address)
		if err != nil {
			return err
		}
		host = h
	case strings.HasPrefix(network, "ip"):
	default:
		return nil // unix sockets
	}
	if host == "" {
		return nil
	}
	if _, err := netip.ParseAddr(host); err != nil {
		return fmt.Errorf("host %q is not an IP literal", host)
	}
	return nil
}

// nsCommand uses nsenter rather than "ip netns exec": the latter also
// unshares the mount namespace and remounts /sys for the target netns,
// which hides /sys/fs/bpf and every pinned map and program.
func nsCommand(ctx context.Context, path, name string, args ...string) *exec.Cmd {
	return exec.CommandContext(ctx, "nsenter", append([]string{"--net=" + path, "--", name}, args...)...)
}

func openNS(ns *netNS) (netns.NsHandle, error) {
	h, err := netns.GetFromPath(ns.path)
	if err != nil {
		return netns.None(), fmt.Errorf("open netns %s: %w", ns.name, err)
	}
	return h, nil
}
