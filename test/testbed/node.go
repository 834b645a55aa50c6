package testbed

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os/exec"
	"slices"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
)

// Node is a Kubernetes node: a network namespace with an uplink to the
// fabric that routes its pods.
type Node struct {
	// Name is the name given to AddNode.
	Name string
	// NS is the namespace name under /run/netns.
	NS string
	// Uplink is the node's interface to the fabric and UplinkIndex its
	// ifindex inside the node namespace.
	Uplink      string
	UplinkIndex int
	// Index is the node number N that appears in its addresses.
	Index int
	// IPv4 and IPv6 are the uplink addresses, 198.18.0.N and 2001:db8:ff::N.
	IPv4, IPv6 netip.Addr
	// PodCIDRv4 and PodCIDRv6 are the node's pod ranges, 198.19.N.0/24 and
	// 2001:db8:N::/64.
	PodCIDRv4, PodCIDRv6 netip.Prefix
	// Bed is the Testbed the node belongs to.
	Bed *Testbed

	ns *netNS

	// Guarded by Bed.mu.
	pods    map[string]*Pod
	podUsed [maxPods + 1]bool
	podNext int
}

// AddNode creates a node, connects it to the fabric and routes pod ranges
// between it and every existing node.
func (b *Testbed) AddNode(name string) (*Node, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.closed.Load() {
		return nil, fmt.Errorf("add node %s: %w", name, ErrClosed)
	}
	if name == "" {
		return nil, errors.New("add node: empty name")
	}
	for _, o := range b.nodes {
		if o.Name == name {
			return nil, fmt.Errorf("add node %s: %w", name, ErrExists)
		}
	}
	if len(b.nodes) >= maxNodes {
		return nil, fmt.Errorf("add node %s: %w", name, ErrFull)
	}
	idx := len(b.nodes) + 1
	n := &Node{
		Name:      name,
		Uplink:    uplinkName,
		Index:     idx,
		IPv4:      netip.AddrFrom4([4]byte{198, 18, 0, byte(idx)}),
		IPv6:      netip.AddrFrom16([16]byte{0x20, 0x01, 0x0d, 0xb8, 0, 0xff, 15: byte(idx)}),
		PodCIDRv4: netip.PrefixFrom(netip.AddrFrom4([4]byte{198, 19, byte(idx), 0}), 24),
		PodCIDRv6: netip.PrefixFrom(netip.AddrFrom16([16]byte{0x20, 0x01, 0x0d, 0xb8, 4: byte(idx >> 8), 5: byte(idx)}), 64),
		Bed:       b,
		pods:      map[string]*Pod{},
		podNext:   1,
	}
	ns, err := createNS(b.nsName(sanitize(name, 24)), []sysctl{
		{key: "net/ipv6/conf/all/accept_dad", value: "0"},
		{key: "net/ipv6/conf/default/accept_dad", value: "0"},
		{key: "net/ipv4/ip_forward", value: "1"},
		{key: "net/ipv6/conf/all/forwarding", value: "1"},
		{key: "net/ipv6/conf/default/forwarding", value: "1"},
		// IPv4 conf/all and conf/default are copied from the host's, which
		// may enable strict reverse-path filtering; pin them.
		{key: "net/ipv4/conf/all/rp_filter", value: "0"},
		{key: "net/ipv4/conf/default/rp_filter", value: "0"},
	})
	if err != nil {
		return nil, fmt.Errorf("add node %s: %w", name, err)
	}
	n.ns, n.NS = ns, ns.name
	if err := b.wireNode(n); err != nil {
		err = fmt.Errorf("add node %s: %w", name, err)
		for _, o := range b.nodes {
			// Best effort: the node's namespace is going away anyway.
			_ = o.ns.nl.RouteDel(&netlink.Route{LinkIndex: o.UplinkIndex, Dst: ipnet(n.PodCIDRv4)})
			_ = o.ns.nl.RouteDel(&netlink.Route{LinkIndex: o.UplinkIndex, Dst: ipnet(n.PodCIDRv6)})
		}
		return nil, errors.Join(err, ns.destroy())
	}
	b.nodes = append(b.nodes, n)
	return n, nil
}

// fabricPort names the bridge port of node N inside the fabric namespace.
func fabricPort(idx int) string { return fmt.Sprintf("node%d", idx) }

func (b *Testbed) wireNode(n *Node) error {
	h, fh := n.ns.nl, b.fabric.nl
	port := fabricPort(n.Index)
	veth := &netlink.Veth{
		LinkAttrs:     netlink.LinkAttrs{Name: uplinkName},
		PeerName:      port,
		PeerNamespace: netlink.NsFd(b.fabric.fd),
	}
	if err := h.LinkAdd(veth); err != nil {
		return fmt.Errorf("add uplink: %w", err)
	}
	pl, err := fh.LinkByName(port)
	if err != nil {
		return fmt.Errorf("find fabric port: %w", err)
	}
	br, err := fh.LinkByName(bridgeName)
	if err != nil {
		return fmt.Errorf("find bridge: %w", err)
	}
	if err := fh.LinkSetMaster(pl, br); err != nil {
		return fmt.Errorf("attach fabric port: %w", err)
	}
	if err := fh.LinkSetUp(pl); err != nil {
		return fmt.Errorf("set fabric port up: %w", err)
	}
	up, err := h.LinkByName(uplinkName)
	if err != nil {
		return fmt.Errorf("find uplink: %w", err)
	}
	n.UplinkIndex = up.Attrs().Index
	if err := h.LinkSetUp(up); err != nil {
		return fmt.Errorf("set uplink up: %w", err)
	}
	for _, a := range []netip.Prefix{
		netip.PrefixFrom(n.IPv4, uplinkPrefix4.Bits()),
		netip.PrefixFrom(n.IPv6, uplinkPrefix6.Bits()),
	} {
		if err := h.AddrAdd(up, addr(a)); err != nil {
			return fmt.Errorf("add %s to uplink: %w", a, err)
		}
	}
	routes := []*netlink.Route{
		{LinkIndex: n.UplinkIndex, Gw: router4.AsSlice()},
		{LinkIndex: n.UplinkIndex, Gw: router6.AsSlice()},
	}
	for _, o := range b.nodes {
		routes = append(routes, podRoutes(n.UplinkIndex, o)...)
	}
	for _, r := range routes {
		if err := h.RouteAdd(r); err != nil {
			return fmt.Errorf("add route %s: %w", r, err)
		}
	}
	for _, o := range b.nodes {
		for _, r := range podRoutes(o.UplinkIndex, n) {
			if err := o.ns.nl.RouteAdd(r); err != nil {
				return fmt.Errorf("add route %s on node %s: %w", r, o.Name, err)
			}
		}
	}
	// A bridge port forwards only once linkwatch has seen its carrier; a
	// packet sent before that is dropped and costs a one-second ARP retry.
	if err := waitLink(fh, port, false); err != nil {
		return err
	}
	return waitLink(h, uplinkName, false)
}

// podRoutes routes dst's pod ranges via its uplink addresses, from a node
// whose uplink has ifindex uplink.
func podRoutes(uplink int, dst *Node) []*netlink.Route {
	return []*netlink.Route{
		{LinkIndex: uplink, Dst: ipnet(dst.PodCIDRv4), Gw: dst.IPv4.AsSlice()},
		{LinkIndex: uplink, Dst: ipnet(dst.PodCIDRv6), Gw: dst.IPv6.AsSlice()},
	}
}

// Pods returns the node's live pods.
func (n *Node) Pods() []*Pod {
	n.Bed.mu.Lock()
	defer n.Bed.mu.Unlock()
	pods := make([]*Pod, 0, len(n.pods))
	for _, p := range n.pods {
		pods = append(pods, p)
	}
	slices.SortFunc(pods, func(a, b *Pod) int { return a.IPv4.Compare(b.IPv4) })
	return pods
}

// Do runs fn on an OS thread switched into the node's namespace; sockets fn
// creates stay in that namespace. fn runs on its own goroutine, so it must
// report failures by returning an error, not by calling t.FailNow.
func (n *Node) Do(fn func() error) error {
	if n.Bed.closed.Load() {
		return ErrClosed
	}
	return n.ns.do(fn)
}

// Command returns a command that runs inside the node's network namespace
// (and nothing else: it keeps this process's mount namespace, so /sys/fs/bpf
// stays visible, unlike with "ip netns exec", which remounts /sys). Close
// kills it if it is still running.
func (n *Node) Command(ctx context.Context, name string, args ...string) *exec.Cmd {
	return nsCommand(ctx, n.ns.path, name, args...)
}

// Handle opens the node's namespace; the caller closes the handle.
func (n *Node) Handle() (netns.NsHandle, error) {
	if n.Bed.closed.Load() {
		return netns.None(), ErrClosed
	}
	return openNS(n.ns)
}

// Listen announces on the local network address inside the node's
// namespace, with MPTCP off.
func (n *Node) Listen(network, address string) (net.Listener, error) {
	if n.Bed.closed.Load() {
		return nil, ErrClosed
	}
	return listen(n.ns, network, address)
}

// ListenPacket is Listen for packet networks (udp, ip, unixgram).
func (n *Node) ListenPacket(network, address string) (net.PacketConn, error) {
	if n.Bed.closed.Load() {
		return nil, ErrClosed
	}
	return listenPacket(n.ns, network, address)
}

// Dial connects from inside the node's namespace, with MPTCP off. For IP
// networks the host in address must be an IP literal (see Pod.Dial).
func (n *Node) Dial(ctx context.Context, network, address string) (net.Conn, error) {
	if n.Bed.closed.Load() {
		return nil, ErrClosed
	}
	return dial(ctx, n.ns, network, address)
}
