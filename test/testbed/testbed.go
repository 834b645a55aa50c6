package testbed

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/amber-mesh/amber/test/privileged"
)

var (
	// ErrClosed is returned by operations on a closed Testbed or a deleted Pod.
	ErrClosed = errors.New("testbed closed")
	// ErrExists is returned when a node or pod name is already taken.
	ErrExists = errors.New("name already in use")
	// ErrFull is returned when a bed has no node numbers, or a node no pod
	// addresses, left.
	ErrFull = errors.New("address range exhausted")
)

// Fabric addressing; see the package documentation.
var (
	uplinkPrefix4 = netip.MustParsePrefix("198.18.0.0/24")    // RFC 2544 benchmark range
	uplinkPrefix6 = netip.MustParsePrefix("2001:db8:ff::/64") // RFC 3849 documentation range
	router4       = netip.MustParseAddr("198.18.0.254")
	router6       = netip.MustParseAddr("2001:db8:ff::fe")
	podGateway4   = netip.MustParseAddr("169.254.1.1")
	podGateway6   = netip.MustParseAddr("fe80::1")
)

const (
	bridgeName = "br0"
	uplinkName = "eth0" // in the node
	podIfName  = "eth0" // in the pod
	maxNodes   = 253    // .254 is the fabric router
	maxPods    = 254    // per node: 198.19.N.1 - 198.19.N.254
)

// seq numbers namespaces uniquely within this process, so tests running in
// parallel never collide.
var seq atomic.Uint64

// Testbed is a set of nodes and pods sharing one fabric. Its methods are
// safe for concurrent use.
type Testbed struct {
	// Name is the sanitised bed name used in namespace names.
	Name string
	// FabricNS is the /run/netns name of the fabric namespace holding the
	// bridge (for "ip netns exec ... tcpdump -i br0").
	FabricNS string

	closed atomic.Bool
	fabric *netNS

	mu    sync.Mutex // guards the fields below and every topology change
	nodes []*Node
}

// New returns a Testbed for a test and closes it in tb.Cleanup. It skips
// the test when not running as root, or fails it when CI=true (CI runs as
// root, so a skip there means the privileged tier silently did not run).
func New(tb testing.TB) *Testbed {
	tb.Helper()
	privileged.Require(tb) // network namespaces
	b, err := NewBed(tb.Name())
	if err != nil {
		tb.Fatalf("testbed: %v", err)
	}
	tb.Cleanup(func() {
		if err := b.Close(); err != nil {
			tb.Errorf("testbed: %v", err)
		}
	})
	return b
}

// MustTwoNodes returns nodes "n1" and "n2" of a new Testbed (New), the
// shape most tests need: a same-node and a cross-node path. It fails tb if
// either cannot be built.
func MustTwoNodes(tb testing.TB) (n1, n2 *Node) {
	tb.Helper()
	b := New(tb)
	var err error
	if n1, err = b.AddNode("n1"); err != nil {
		tb.Fatalf("testbed: %v", err)
	}
	if n2, err = b.AddNode("n2"); err != nil {
		tb.Fatalf("testbed: %v", err)
	}
	return n1, n2
}

// NewBed creates an empty Testbed (the fabric only); the caller must Close
// it. It first removes namespaces left behind by earlier runs whose process
// has died.
func NewBed(name string) (*Testbed, error) {
	if err := sweepStale(); err != nil {
		return nil, err
	}
	b := &Testbed{Name: sanitize(name, 40)}
	fabric, err := createNS(b.nsName("fabric"), []sysctl{
		{key: "net/ipv6/conf/all/accept_dad", value: "0"},
		{key: "net/ipv6/conf/default/accept_dad", value: "0"},
		// The fabric is a switch with a router address that routes nowhere.
		{key: "net/ipv4/ip_forward", value: "0"},
		{key: "net/ipv6/conf/all/forwarding", value: "0"},
		// Bridged frames must not go through iptables (per netns since 5.3).
		{key: "net/bridge/bridge-nf-call-iptables", value: "0", optional: true},
		{key: "net/bridge/bridge-nf-call-ip6tables", value: "0", optional: true},
		{key: "net/bridge/bridge-nf-call-arptables", value: "0", optional: true},
	})
	if err != nil {
		return nil, fmt.Errorf("new bed %s: %w", name, err)
	}
	b.fabric = fabric
	b.FabricNS = fabric.name
	if err := b.setupFabric(); err != nil {
		return nil, errors.Join(fmt.Errorf("new bed %s: %w", name, err), fabric.destroy())
	}
	return b, nil
}

func (b *Testbed) setupFabric() error {
	h := b.fabric.nl
	// Multicast snooping off: with no MLD querier on the segment the bridge
	// would otherwise decide per group whether to flood NDP solicitations.
	br := &netlink.Bridge{LinkAttrs: netlink.LinkAttrs{Name: bridgeName}, MulticastSnooping: ptr(false)}
	if err := h.LinkAdd(br); err != nil {
		return fmt.Errorf("add bridge: %w", err)
	}
	if err := h.LinkSetUp(br); err != nil {
		return fmt.Errorf("set bridge up: %w", err)
	}
	for _, a := range []netip.Prefix{
		netip.PrefixFrom(router4, uplinkPrefix4.Bits()),
		netip.PrefixFrom(router6, uplinkPrefix6.Bits()),
	} {
		if err := h.AddrAdd(br, addr(a)); err != nil {
			return fmt.Errorf("add %s to bridge: %w", a, err)
		}
	}
	return nil
}

// Nodes returns the nodes in the order they were added.
func (b *Testbed) Nodes() []*Node {
	b.mu.Lock()
	defer b.mu.Unlock()
	return slices.Clone(b.nodes)
}

// Close kills the processes left in the bed's namespaces and removes the
// namespaces, and with them every interface and route. Calling it again
// returns nil.
func (b *Testbed) Close() error {
	if b.closed.Swap(true) {
		return nil
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	var errs []error
	for _, n := range b.nodes {
		for _, p := range n.pods {
			p.deleted.Store(true)
			errs = append(errs, p.ns.destroy())
		}
		n.pods = nil
		errs = append(errs, n.ns.destroy())
	}
	b.nodes = nil
	errs = append(errs, b.fabric.destroy())
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("close bed %s: %w", b.Name, err)
	}
	return nil
}

// nsName builds amb-<pid>-<seq>-<bed>.<role>.
func (b *Testbed) nsName(role string) string {
	return fmt.Sprintf("%s%d-%d-%s.%s", namePrefix, os.Getpid(), seq.Add(1), b.Name, role)
}

// sanitize keeps names readable in "ip netns list" and safe as file names.
func sanitize(s string, max int) string {
	var sb strings.Builder
	for _, r := range s {
		switch {
		case r >= 'a' && r <= 'z', r >= 'A' && r <= 'Z', r >= '0' && r <= '9', r == '_', r == '-':
			sb.WriteRune(r)
		default:
			sb.WriteByte('_')
		}
		if sb.Len() >= max {
			break
		}
	}
	if sb.Len() == 0 {
		return "_"
	}
	return sb.String()
}

// addr converts a prefix to a netlink address. DAD is off in every
// namespace already; NODAD also covers an address added to an interface
// whose accept_dad was copied before the default changed.
func addr(p netip.Prefix) *netlink.Addr {
	a := &netlink.Addr{IPNet: ipnet(p)}
	if p.Addr().Is6() {
		a.Flags = unix.IFA_F_NODAD
	}
	return a
}

func ipnet(p netip.Prefix) *net.IPNet {
	return &net.IPNet{IP: p.Addr().AsSlice(), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())}
}

func ptr[T any](v T) *T { return &v }
