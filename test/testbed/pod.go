package testbed

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os/exec"
	"strconv"
	"sync/atomic"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// Pod is a pod: a network namespace whose eth0 is one end of a veth pair;
// the other end, HostVeth, is in the node's namespace.
type Pod struct {
	// Name is the name given to AddPod.
	Name string
	// NS is the namespace name under /run/netns.
	NS string
	// Node is the node the pod runs on.
	Node *Node
	// IPv4 and IPv6 are the pod's addresses, 198.19.N.M and 2001:db8:N::M.
	IPv4, IPv6 netip.Addr
	// HostVeth is the host side of the pod's veth pair, in the node's
	// namespace, and HostIndex its ifindex there: where the datapath
	// attaches to see the pod's traffic.
	HostVeth  string
	HostIndex int

	ns      *netNS
	index   int         // M; guarded by Node.Bed.mu
	deleted atomic.Bool // set by Delete and by the bed's Close
}

// AddPod creates a pod on the node, wired like a kindnet/Calico pod: a /32
// and /128 on eth0, a link-scope gateway 169.254.1.1 answered by proxy ARP
// on the host side, and fe80::1 on the host side as the IPv6 gateway.
func (n *Node) AddPod(name string) (*Pod, error) {
	b := n.Bed
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.closed.Load() {
		return nil, fmt.Errorf("add pod %s/%s: %w", n.Name, name, ErrClosed)
	}
	if name == "" {
		return nil, fmt.Errorf("add pod on %s: empty name", n.Name)
	}
	if _, ok := n.pods[name]; ok {
		return nil, fmt.Errorf("add pod %s/%s: %w", n.Name, name, ErrExists)
	}
	m, ok := n.allocPod()
	if !ok {
		return nil, fmt.Errorf("add pod %s/%s: %w", n.Name, name, ErrFull)
	}
	v6 := n.PodCIDRv6.Addr().As16()
	v6[15] = byte(m)
	p := &Pod{
		Name:  name,
		Node:  n,
		IPv4:  netip.AddrFrom4([4]byte{198, 19, byte(n.Index), byte(m)}),
		IPv6:  netip.AddrFrom16(v6),
		index: m,
	}
	ns, err := createNS(b.nsName(sanitize(n.Name, 24)+"."+sanitize(name, 40)), []sysctl{
		{key: "net/ipv6/conf/all/accept_dad", value: "0"},
		{key: "net/ipv6/conf/default/accept_dad", value: "0"},
		{key: "net/ipv4/ip_forward", value: "0"},
		{key: "net/ipv6/conf/all/forwarding", value: "0"},
		{key: "net/ipv4/conf/all/rp_filter", value: "0"},
		{key: "net/ipv4/conf/default/rp_filter", value: "0"},
	})
	if err != nil {
		n.podUsed[m] = false
		return nil, fmt.Errorf("add pod %s/%s: %w", n.Name, name, err)
	}
	p.ns, p.NS = ns, ns.name
	if err := p.wire(); err != nil {
		n.podUsed[m] = false
		return nil, errors.Join(fmt.Errorf("add pod %s/%s: %w", n.Name, name, err), p.teardown())
	}
	n.pods[name] = p
	return p, nil
}

// allocPod picks the next free pod number after the last one handed out,
// so a deleted pod's address is not reused while other nodes may still
// hold neighbour or conntrack state for it.
func (n *Node) allocPod() (int, bool) {
	for range maxPods {
		m := n.podNext
		n.podNext = m%maxPods + 1
		if !n.podUsed[m] {
			n.podUsed[m] = true
			return m, true
		}
	}
	return 0, false
}

// hostVethName derives a name like Calico's caliXXXXXXXXXXX from the
// namespace name: unique in practice, at most IFNAMSIZ-1 = 15 bytes.
func hostVethName(ns string, attempt int) string {
	sum := sha256.Sum256([]byte(ns + "/" + strconv.Itoa(attempt)))
	return "veth" + hex.EncodeToString(sum[:4])
}

func (p *Pod) wire() error {
	n := p.Node
	h, ph := n.ns.nl, p.ns.nl
	var err error
	for attempt := range 4 {
		p.HostVeth = hostVethName(p.NS, attempt)
		err = h.LinkAdd(&netlink.Veth{
			LinkAttrs:     netlink.LinkAttrs{Name: p.HostVeth},
			PeerName:      podIfName,
			PeerNamespace: netlink.NsFd(p.ns.fd),
		})
		if !errors.Is(err, unix.EEXIST) {
			break
		}
	}
	if err != nil {
		return fmt.Errorf("add veth %s: %w", p.HostVeth, err)
	}
	host, err := h.LinkByName(p.HostVeth)
	if err != nil {
		return fmt.Errorf("find %s: %w", p.HostVeth, err)
	}
	p.HostIndex = host.Attrs().Index
	err = n.ns.do(func() error {
		return writeSysctls([]sysctl{
			{key: "net/ipv4/conf/" + p.HostVeth + "/proxy_arp", value: "1"},
			// Proxy ARP replies to broadcast requests are otherwise delayed
			// by a random 0-800 ms (neigh proxy_delay); Calico zeroes it too.
			{key: "net/ipv4/neigh/" + p.HostVeth + "/proxy_delay", value: "0"},
			{key: "net/ipv6/conf/" + p.HostVeth + "/accept_dad", value: "0"},
		})
	})
	if err != nil {
		return err
	}
	if err := h.LinkSetUp(host); err != nil {
		return fmt.Errorf("set %s up: %w", p.HostVeth, err)
	}
	if err := h.AddrAdd(host, addr(netip.PrefixFrom(podGateway6, 64))); err != nil {
		return fmt.Errorf("add %s to %s: %w", podGateway6, p.HostVeth, err)
	}
	for _, a := range []netip.Addr{p.IPv4, p.IPv6} {
		r := &netlink.Route{LinkIndex: p.HostIndex, Dst: ipnet(netip.PrefixFrom(a, a.BitLen())), Scope: netlink.SCOPE_LINK}
		if err := h.RouteAdd(r); err != nil {
			return fmt.Errorf("add route %s: %w", r, err)
		}
	}

	err = p.ns.do(func() error {
		return writeSysctls([]sysctl{{key: "net/ipv6/conf/" + podIfName + "/accept_dad", value: "0"}})
	})
	if err != nil {
		return err
	}
	eth, err := ph.LinkByName(podIfName)
	if err != nil {
		return fmt.Errorf("find pod %s: %w", podIfName, err)
	}
	if err := ph.LinkSetUp(eth); err != nil {
		return fmt.Errorf("set pod %s up: %w", podIfName, err)
	}
	for _, a := range []netip.Addr{p.IPv4, p.IPv6} {
		pa := netip.PrefixFrom(a, a.BitLen())
		if err := ph.AddrAdd(eth, addr(pa)); err != nil {
			return fmt.Errorf("add %s to pod %s: %w", pa, podIfName, err)
		}
	}
	idx := eth.Attrs().Index
	for _, r := range []*netlink.Route{
		{LinkIndex: idx, Dst: ipnet(netip.PrefixFrom(podGateway4, 32)), Scope: netlink.SCOPE_LINK},
		{LinkIndex: idx, Gw: podGateway4.AsSlice()},
		{LinkIndex: idx, Gw: podGateway6.AsSlice()},
	} {
		if err := ph.RouteAdd(r); err != nil {
			return fmt.Errorf("add pod route %s: %w", r, err)
		}
	}
	if err := waitLink(h, p.HostVeth, true); err != nil {
		return err
	}
	return waitLink(ph, podIfName, true)
}

// teardown removes the host veth first: deleting it removes the pair and
// every route through it synchronously, while a namespace's interfaces
// are destroyed by a kernel work queue some time after the last reference
// is dropped.
func (p *Pod) teardown() error {
	var errs []error
	link, err := p.Node.ns.nl.LinkByName(p.HostVeth)
	switch {
	case err == nil:
		if err := p.Node.ns.nl.LinkDel(link); err != nil {
			errs = append(errs, fmt.Errorf("delete %s: %w", p.HostVeth, err))
		}
	case !errors.As(err, &netlink.LinkNotFoundError{}):
		errs = append(errs, fmt.Errorf("find %s: %w", p.HostVeth, err))
	}
	return errors.Join(append(errs, p.ns.destroy())...)
}

// Delete removes the pod: the processes inside it, its namespace, its veth
// pair and the node's routes to it. Deleting a deleted pod returns nil.
func (p *Pod) Delete() error {
	b := p.Node.Bed
	b.mu.Lock()
	defer b.mu.Unlock()
	if p.deleted.Swap(true) {
		return nil
	}
	delete(p.Node.pods, p.Name)
	p.Node.podUsed[p.index] = false
	if err := p.teardown(); err != nil {
		return fmt.Errorf("delete pod %s/%s: %w", p.Node.Name, p.Name, err)
	}
	return nil
}

// Do runs fn on an OS thread switched into the pod's namespace; sockets fn
// creates stay in that namespace. fn runs on its own goroutine, so it must
// report failures by returning an error, not by calling t.FailNow.
func (p *Pod) Do(fn func() error) error {
	if p.deleted.Load() {
		return ErrClosed
	}
	return p.ns.do(fn)
}

// Command returns a command that runs inside the pod's network namespace
// only (see Node.Command). Close and Delete kill it if it is still running.
func (p *Pod) Command(ctx context.Context, name string, args ...string) *exec.Cmd {
	return nsCommand(ctx, p.ns.path, name, args...)
}

// Handle opens the pod's namespace; the caller closes the handle.
func (p *Pod) Handle() (netns.NsHandle, error) {
	if p.deleted.Load() {
		return netns.None(), ErrClosed
	}
	return openNS(p.ns)
}

// Listen announces on the local network address inside the pod's
// namespace, with MPTCP off (an MPTCP socket cannot go into a SOCKMAP).
func (p *Pod) Listen(network, address string) (net.Listener, error) {
	if p.deleted.Load() {
		return nil, ErrClosed
	}
	return listen(p.ns, network, address)
}

// ListenPacket is Listen for packet networks (udp, ip, unixgram).
func (p *Pod) ListenPacket(network, address string) (net.PacketConn, error) {
	if p.deleted.Load() {
		return nil, ErrClosed
	}
	return listenPacket(p.ns, network, address)
}

// Dial connects from inside the pod's namespace, with MPTCP off. For IP
// networks the host in address must be an IP literal: resolving a name
// can make the resolver dial several addresses from other goroutines,
// whose sockets would be created outside the namespace.
func (p *Pod) Dial(ctx context.Context, network, address string) (net.Conn, error) {
	if p.deleted.Load() {
		return nil, ErrClosed
	}
	return dial(ctx, p.ns, network, address)
}
