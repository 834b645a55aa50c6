// Package hostnet installs, checks and removes the policy routing that makes
// a packet assigned to a ztunnel socket by the capture programs reach the
// local stack: `ip rule fwmark M/M lookup T` and `local default dev lo
// table T`, for IPv4 and IPv6, and, on lo, net.ipv4.conf.lo.accept_local=1
// and rp_filter=2 (loose), in the calling thread's network namespace.
//
// Without the rule and route the kernel routes an assigned SYN by its
// (foreign) destination address and forwards it, and the listener never
// sees it. The pod program's egress half redirects two kinds of packets to
// lo's ingress, where IPv4's source validation (fib_validate_source())
// meets them: the node's own replies to the ztunnel's dials from a pod's
// address, whose source is a local address, a martian unless the receiving
// device accepts local sources; and new connections that escaped capture
// (translated to a captured pod by the node), whose source is a pod's or
// another node's, reached through another interface, which a strict
// reverse-path filter (rp_filter=1 in conf/all, the maximum of all and the
// device applies) rejects on lo. Loose mode (2) only asks that the source
// be routable. Only lo is set: ordinary loopback packets keep the route
// they were sent with and never meet either check.
package hostnet

import (
	"errors"
	"fmt"
	"net"
	"os"
	"strings"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netlink/nl"
	"golang.org/x/sys/unix"

	"github.com/amber-mesh/amber/bpf"
)

// Defaults. The mark is the one the datapath sets (bpf.DefaultRouteMark);
// table 133 and priority 100 sit before the main table (32766) and clear
// of Istio's in-pod tables (100-102 are tables there, not priorities
// here).
const (
	DefaultMark     = bpf.DefaultRouteMark
	DefaultTable    = 133
	DefaultPriority = 100
)

// ErrIncomplete is returned by Check when a rule or route is missing.
var ErrIncomplete = errors.New("host routing for capture incomplete")

// Config names the mark, table and rule priority. The zero value means the
// defaults above.
type Config struct {
	// Mark is set by the programs on assigned packets and matched by the
	// rule under mask Mark. Zero means DefaultMark.
	Mark uint32
	// Table holds the local default route. Zero means DefaultTable.
	Table int
	// Priority of the fwmark rule. Zero means DefaultPriority.
	Priority int
}

// WithDefaults returns c with zero fields replaced by the defaults.
func (c Config) WithDefaults() Config {
	if c.Mark == 0 {
		c.Mark = DefaultMark
	}
	if c.Table == 0 {
		c.Table = DefaultTable
	}
	if c.Priority == 0 {
		c.Priority = DefaultPriority
	}
	return c
}

var families = []struct {
	family int
	name   string
	dst    *net.IPNet
}{
	{netlink.FAMILY_V4, "ipv4", &net.IPNet{IP: net.IPv4zero.To4(), Mask: net.CIDRMask(0, 32)}},
	{netlink.FAMILY_V6, "ipv6", &net.IPNet{IP: net.IPv6zero, Mask: net.CIDRMask(0, 128)}},
}

func (c Config) rule(family int) *netlink.Rule {
	r := netlink.NewRule()
	r.Family = family
	r.Mark = c.Mark
	mask := c.Mark
	r.Mask = &mask
	r.Table = c.Table
	r.Priority = c.Priority
	return r
}

func (c Config) route(family int, dst *net.IPNet) (*netlink.Route, error) {
	lo, err := netlink.LinkByName("lo")
	if err != nil {
		return nil, fmt.Errorf("find lo: %w", err)
	}
	return &netlink.Route{
		Family:    family,
		Type:      unix.RTN_LOCAL,
		Table:     c.Table,
		Dst:       dst,
		LinkIndex: lo.Attrs().Index,
		Scope:     unix.RT_SCOPE_HOST,
	}, nil
}

// IPv4 devconf indexes (linux/ip.h, enum IPV4_DEVCONF_*).
const (
	ipv4DevconfRPFilter    = 8
	ipv4DevconfAcceptLocal = 23
)

// rpLoose is rp_filter's loose mode (RFC 3704 loose reverse path).
const rpLoose = 2

// setLoConf sets lo's IPv4 devconf values through rtnetlink (RTM_SETLINK
// with IFLA_AF_SPEC/AF_INET/IFLA_INET_CONF, as inet_set_link_af() takes
// them), not /proc/sys: container runtimes mount /proc/sys read-only in
// unprivileged containers such as the agent's, and netlink needs only
// CAP_NET_ADMIN.
func setLoConf(acceptLocal, rpFilter uint32) error {
	lo, err := netlink.LinkByName("lo")
	if err != nil {
		return fmt.Errorf("find lo: %w", err)
	}
	req := nl.NewNetlinkRequest(unix.RTM_SETLINK, unix.NLM_F_ACK)
	msg := nl.NewIfInfomsg(unix.AF_UNSPEC)
	msg.Index = int32(lo.Attrs().Index)
	req.AddData(msg)
	spec := nl.NewRtAttr(unix.IFLA_AF_SPEC, nil)
	conf := spec.AddRtAttr(unix.AF_INET, nil).AddRtAttr(unix.IFLA_INET_CONF, nil)
	conf.AddRtAttr(ipv4DevconfAcceptLocal, nl.Uint32Attr(acceptLocal))
	conf.AddRtAttr(ipv4DevconfRPFilter, nl.Uint32Attr(rpFilter))
	req.AddData(spec)
	if _, err := req.Execute(unix.NETLINK_ROUTE, 0); err != nil {
		return fmt.Errorf("set lo accept_local=%d rp_filter=%d: %w", acceptLocal, rpFilter, err)
	}
	return nil
}

// readConf reads net.ipv4.conf.<dev>.<key> from /proc/sys/net (read-only
// in containers, but readable), which the kernel resolves against the
// calling thread's network namespace.
func readConf(dev, key string) (int, error) {
	b, err := os.ReadFile("/proc/sys/net/ipv4/conf/" + dev + "/" + key)
	if err != nil {
		return 0, fmt.Errorf("read %s %s: %w", dev, key, err)
	}
	var v int
	if _, err := fmt.Sscan(strings.TrimSpace(string(b)), &v); err != nil {
		return 0, fmt.Errorf("read %s %s: %w", dev, key, err)
	}
	return v, nil
}

// acceptsLocal reports lo's accept_local.
func acceptsLocal() (bool, error) {
	v, err := readConf("lo", "accept_local")
	return v == 1, err
}

// loStrictRP reports whether the reverse-path filter on lo is strict: the
// kernel applies the maximum of conf/all and conf/lo.
func loStrictRP() (bool, error) {
	all, err := readConf("all", "rp_filter")
	if err != nil {
		return false, err
	}
	lo, err := readConf("lo", "rp_filter")
	return max(all, lo) == 1, err
}

// Ensure installs the rule and route for both families, accept_local and
// the loose reverse-path filter on lo; it is idempotent.
func Ensure(c Config) error {
	c = c.WithDefaults()
	lo, err := netlink.LinkByName("lo")
	if err != nil {
		return fmt.Errorf("find lo: %w", err)
	}
	// The local route is refused on a loopback that is down.
	if lo.Attrs().Flags&net.FlagUp == 0 {
		if err := netlink.LinkSetUp(lo); err != nil {
			return fmt.Errorf("set lo up: %w", err)
		}
	}
	for _, f := range families {
		rt, err := c.route(f.family, f.dst)
		if err != nil {
			return err
		}
		if err := netlink.RouteReplace(rt); err != nil {
			return fmt.Errorf("add %s local route to table %d: %w", f.name, c.Table, err)
		}
		ok, err := hasRule(c, f.family)
		if err != nil {
			return err
		}
		if !ok {
			if err := netlink.RuleAdd(c.rule(f.family)); err != nil && !errors.Is(err, unix.EEXIST) {
				return fmt.Errorf("add %s fwmark rule: %w", f.name, err)
			}
		}
	}
	if err := setLoConf(1, rpLoose); err != nil {
		return err
	}
	return Check(c)
}

// Check reports what is missing, or nil when both families are routed.
func Check(c Config) error {
	c = c.WithDefaults()
	var missing []string
	for _, f := range families {
		ok, err := hasRule(c, f.family)
		if err != nil {
			return err
		}
		if !ok {
			missing = append(missing, fmt.Sprintf("%s: no rule fwmark %#x/%#x lookup %d", f.name, c.Mark, c.Mark, c.Table))
		}
		routes, err := netlink.RouteListFiltered(f.family, &netlink.Route{Table: c.Table}, netlink.RT_FILTER_TABLE)
		if err != nil {
			return fmt.Errorf("list %s table %d: %w", f.name, c.Table, err)
		}
		found := false
		for _, r := range routes {
			if r.Type == unix.RTN_LOCAL && (r.Dst == nil || isDefault(r.Dst)) {
				found = true
			}
		}
		if !found {
			missing = append(missing, fmt.Sprintf("%s: no local default route in table %d", f.name, c.Table))
		}
	}
	ok, err := acceptsLocal()
	if err != nil {
		return err
	}
	if !ok {
		missing = append(missing, "ipv4: lo does not accept local sources (net.ipv4.conf.lo.accept_local=0)")
	}
	strict, err := loStrictRP()
	if err != nil {
		return err
	}
	if strict {
		missing = append(missing, "ipv4: strict reverse-path filter on lo (net.ipv4.conf.lo.rp_filter, with conf/all, is 1)")
	}
	if len(missing) > 0 {
		return fmt.Errorf("%w: %s", ErrIncomplete, strings.Join(missing, "; "))
	}
	return nil
}

// Remove deletes the rules and routes Ensure installed and sets lo's
// accept_local and rp_filter back to 0 (their defaults); missing ones are
// not an error.
func Remove(c Config) error {
	c = c.WithDefaults()
	var errs []error
	for _, f := range families {
		for {
			ok, err := hasRule(c, f.family)
			if err != nil || !ok {
				errs = append(errs, err)
				break
			}
			if err := netlink.RuleDel(c.rule(f.family)); err != nil {
				errs = append(errs, fmt.Errorf("delete %s fwmark rule: %w", f.name, err))
				break
			}
		}
		rt, err := c.route(f.family, f.dst)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		if err := netlink.RouteDel(rt); err != nil && !errors.Is(err, unix.ESRCH) && !errors.Is(err, unix.ENOENT) {
			errs = append(errs, fmt.Errorf("delete %s local route: %w", f.name, err))
		}
	}
	errs = append(errs, setLoConf(0, 0))
	return errors.Join(errs...)
}

func hasRule(c Config, family int) (bool, error) {
	rules, err := netlink.RuleList(family)
	if err != nil {
		return false, fmt.Errorf("list rules: %w", err)
	}
	for _, r := range rules {
		if r.Table == c.Table && r.Mark == c.Mark && r.Mask != nil && *r.Mask == c.Mark && r.Priority == c.Priority {
			return true, nil
		}
	}
	return false, nil
}

func isDefault(n *net.IPNet) bool {
	ones, _ := n.Mask.Size()
	return ones == 0
}
