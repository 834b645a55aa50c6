package capture

import (
	"errors"
	"fmt"
	"net"
	"net/netip"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// Veth is the host side of a pod's veth pair.
type Veth struct {
	Index int
	Name  string
}

// Host is the node's network namespace as the controller uses it: finding
// pods' veths and quarantining addresses.
type Host interface {
	// VethByRoute returns the veth the node routes every one of addrs
	// through, or ErrVethNotFound.
	VethByRoute(addrs []netip.Addr) (Veth, error)
	// VethOfSandbox returns the node-side peer of the interface ifname
	// inside the network namespace at path netns, or ErrVethNotFound.
	VethOfSandbox(netns, ifname string) (Veth, error)
	// Alive reports whether the veth still exists under the same name.
	Alive(v Veth) bool
	// Quarantine makes the node discard every packet sourced from addrs;
	// Unquarantine lifts it; Quarantined lists the addresses under it.
	Quarantine(addrs []netip.Addr) error
	Unquarantine(addrs []netip.Addr) error
	Quarantined() ([]netip.Addr, error)
	// Close releases the host's handles.
	Close() error
}

// DefaultQuarantinePriority is the priority of the quarantine rules:
// before the capture's own fwmark rule (hostnet.DefaultPriority, 100) and
// the main table, so a quarantined source is discarded whatever else
// would route it.
const DefaultQuarantinePriority = 90

// quarantineProto marks quarantine rules as amber's (rtm_protocol; values
// above RTPROT_STATIC are free for routing daemons, see rtnetlink(7)).
const quarantineProto = 0xa3

// HostConfig configures a NetlinkHost. The zero value is the default.
type HostConfig struct {
	// QuarantinePriority is the rule priority of quarantines. Zero means
	// DefaultQuarantinePriority.
	QuarantinePriority int
}

// NetlinkHost is Host on the caller's network namespace: the agent runs
// in the node's (hostNetwork).
type NetlinkHost struct {
	cfg HostConfig
	nl  *netlink.Handle
}

// OpenHost opens the node namespace the process runs in.
func OpenHost(cfg HostConfig) (*NetlinkHost, error) {
	if cfg.QuarantinePriority == 0 {
		cfg.QuarantinePriority = DefaultQuarantinePriority
	}
	nl, err := netlink.NewHandle()
	if err != nil {
		return nil, fmt.Errorf("open netlink: %w", err)
	}
	return &NetlinkHost{cfg: cfg, nl: nl}, nil
}

// Close implements Host.
func (h *NetlinkHost) Close() error {
	h.nl.Close()
	return nil
}

// VethByRoute implements Host. A pod's addresses are routed by a host
// route through its veth (ptp, Calico, kindnet and the testbed all do
// this); an address routed through anything else (a bridge, the uplink)
// does not identify a veth.
func (h *NetlinkHost) VethByRoute(addrs []netip.Addr) (Veth, error) {
	var v Veth
	for _, a := range addrs {
		rs, err := h.nl.RouteGet(a.AsSlice())
		if err != nil || len(rs) == 0 {
			return Veth{}, fmt.Errorf("%w: no route to %s: %v", ErrVethNotFound, a, err)
		}
		l, err := h.nl.LinkByIndex(rs[0].LinkIndex)
		if err != nil {
			return Veth{}, fmt.Errorf("%w: route to %s: %v", ErrVethNotFound, a, err)
		}
		if l.Type() != "veth" {
			return Veth{}, fmt.Errorf("%w: %s is routed through %s (%s), not a veth", ErrVethNotFound, a, l.Attrs().Name, l.Type())
		}
		got := Veth{Index: l.Attrs().Index, Name: l.Attrs().Name}
		if v.Index != 0 && got != v {
			return Veth{}, fmt.Errorf("%w: pod addresses are routed through %s and %s", ErrVethNotFound, v.Name, got.Name)
		}
		v = got
	}
	if v.Index == 0 {
		return Veth{}, fmt.Errorf("%w: no addresses", ErrVethNotFound)
	}
	return v, nil
}

// VethOfSandbox implements Host. The node-side veth whose peer lives in
// the sandbox's namespace is found without entering that namespace: the
// node knows the namespace by an id (RTM_GETNSID) and reports it as each
// veth's IFLA_LINK_NETNSID, which needs no CAP_SYS_ADMIN. Only a sandbox
// with several veths is entered to tell them apart by name (IFLA_LINK of
// a veth is its peer's index in the peer's namespace; both ends are
// checked so that a stale or foreign index is never taken).
func (h *NetlinkHost) VethOfSandbox(path, ifname string) (Veth, error) {
	pns, err := netns.GetFromPath(path)
	if err != nil {
		return Veth{}, fmt.Errorf("%w: open pod netns %s: %v", ErrVethNotFound, path, err)
	}
	defer pns.Close()
	if nsid, err := h.nl.GetNetNsIdByFd(int(pns)); err == nil && nsid >= 0 {
		var found []Veth
		links, err := h.linkList()
		if err != nil {
			return Veth{}, fmt.Errorf("%w: %v", ErrVethNotFound, err)
		}
		for _, l := range links {
			if l.Type() == "veth" && l.Attrs().NetNsID == nsid {
				found = append(found, Veth{Index: l.Attrs().Index, Name: l.Attrs().Name})
			}
		}
		if len(found) == 1 {
			return found[0], nil
		}
	}
	pnl, err := netlink.NewHandleAt(pns)
	if err != nil {
		return Veth{}, fmt.Errorf("%w: netlink in %s: %v", ErrVethNotFound, path, err)
	}
	defer pnl.Close()
	in, err := pnl.LinkByName(ifname)
	if err != nil {
		return Veth{}, fmt.Errorf("%w: %s in %s: %v", ErrVethNotFound, ifname, path, err)
	}
	if in.Type() != "veth" {
		return Veth{}, fmt.Errorf("%w: pod interface %s is a %s", ErrVethNotFound, ifname, in.Type())
	}
	out, err := h.nl.LinkByIndex(in.Attrs().ParentIndex)
	if err != nil {
		return Veth{}, fmt.Errorf("%w: peer of %s (index %d) not in the node namespace: %v", ErrVethNotFound, ifname, in.Attrs().ParentIndex, err)
	}
	if out.Type() != "veth" || out.Attrs().ParentIndex != in.Attrs().Index {
		return Veth{}, fmt.Errorf("%w: index %d in the node namespace is not the peer of %s", ErrVethNotFound, out.Attrs().Index, ifname)
	}
	return Veth{Index: out.Attrs().Index, Name: out.Attrs().Name}, nil
}

// linkList retries a dump the kernel interrupted because links changed
// meanwhile (NLM_F_DUMP_INTR), as it does on a busy node.
func (h *NetlinkHost) linkList() ([]netlink.Link, error) {
	var err error
	for attempt := 0; attempt < 5; attempt++ {
		var links []netlink.Link
		if links, err = h.nl.LinkList(); !errors.Is(err, netlink.ErrDumpInterrupted) {
			return links, err
		}
	}
	return nil, fmt.Errorf("list links: %w", err)
}

// Alive implements Host.
func (h *NetlinkHost) Alive(v Veth) bool {
	l, err := h.nl.LinkByIndex(v.Index)
	return err == nil && (v.Name == "" || l.Attrs().Name == v.Name)
}

func (h *NetlinkHost) rule(a netip.Addr) *netlink.Rule {
	r := netlink.NewRule()
	r.Priority = h.cfg.QuarantinePriority
	r.Src = &net.IPNet{IP: a.AsSlice(), Mask: net.CIDRMask(a.BitLen(), a.BitLen())}
	r.Type = unix.RTN_BLACKHOLE
	r.Protocol = quarantineProto
	r.Family = netlink.FAMILY_V4
	if a.Is6() {
		r.Family = netlink.FAMILY_V6
	}
	return r
}

// Quarantine implements Host with `ip rule add from ADDR blackhole`: it
// needs no veth (so it also covers a pod whose veth cannot be found),
// drops forwarded and locally delivered packets alike, and survives the
// agent.
func (h *NetlinkHost) Quarantine(addrs []netip.Addr) error {
	for _, a := range addrs {
		err := h.nl.RuleAdd(h.rule(a.Unmap()))
		if err != nil && !errors.Is(err, unix.EEXIST) {
			return fmt.Errorf("quarantine %s: %w", a, err)
		}
	}
	return nil
}

// Unquarantine implements Host.
func (h *NetlinkHost) Unquarantine(addrs []netip.Addr) error {
	var errs []error
	for _, a := range addrs {
		err := h.nl.RuleDel(h.rule(a.Unmap()))
		if err != nil && !errors.Is(err, unix.ENOENT) {
			errs = append(errs, fmt.Errorf("lift quarantine of %s: %w", a, err))
		}
	}
	return errors.Join(errs...)
}

// Quarantined implements Host.
func (h *NetlinkHost) Quarantined() ([]netip.Addr, error) {
	var out []netip.Addr
	for _, fam := range []int{netlink.FAMILY_V4, netlink.FAMILY_V6} {
		rs, err := h.nl.RuleListFiltered(fam, &netlink.Rule{Priority: h.cfg.QuarantinePriority}, netlink.RT_FILTER_PRIORITY)
		if err != nil {
			return nil, fmt.Errorf("list quarantine rules: %w", err)
		}
		for _, r := range rs {
			if r.Protocol != quarantineProto || r.Src == nil {
				continue
			}
			if a, ok := netip.AddrFromSlice(r.Src.IP); ok {
				out = append(out, a.Unmap())
			}
		}
	}
	return out, nil
}
