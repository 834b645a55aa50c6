// Package hostnet installs, checks and removes the policy routing that makes
// a packet assigned to a ztunnel socket by the capture programs reach the
// local stack: `ip rule fwmark M/M lookup T` and `local default dev lo
// table T`, for IPv4 and IPv6, and net.ipv4.conf.lo.accept_local=1, in the
// calling thread's network namespace.
//
// Without the rule and route the kernel routes an assigned SYN by its
// (foreign) destination address and forwards it, and the listener never
// sees it. Without accept_local on lo, the node's own replies to the
// ztunnel's dials from a pod's address, which the pod program's egress half
// redirects to lo's ingress, are IPv4 martians: fib_validate_source()
// rejects a received packet whose source is a local address unless the
// receiving device accepts local sources. Only lo is set: ordinary
// loopback packets keep the route they were sent with and never meet that
// check, and loopback is exempt from the reverse-path filter.
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

// ipv4DevconfAcceptLocal is IPV4_DEVCONF_ACCEPT_LOCAL (linux/ip.h).
const ipv4DevconfAcceptLocal = 23

// setAcceptLocal sets net.ipv4.conf.lo.accept_local through rtnetlink
// (RTM_SETLINK with IFLA_AF_SPEC/AF_INET/IFLA_INET_CONF, as
// inet_set_link_af() takes it), not /proc/sys: container runtimes mount
// /proc/sys read-only in unprivileged containers such as the agent's, and
// netlink needs only CAP_NET_ADMIN.
func setAcceptLocal(on bool) error {
	lo, err := netlink.LinkByName("lo")
	if err != nil {
		return fmt.Errorf("find lo: %w", err)
	}
	var v uint32
	if on {
		v = 1
	}
	req := nl.NewNetlinkRequest(unix.RTM_SETLINK, unix.NLM_F_ACK)
	msg := nl.NewIfInfomsg(unix.AF_UNSPEC)
	msg.Index = int32(lo.Attrs().Index)
	req.AddData(msg)
	spec := nl.NewRtAttr(unix.IFLA_AF_SPEC, nil)
	spec.AddRtAttr(unix.AF_INET, nil).AddRtAttr(unix.IFLA_INET_CONF, nil).AddRtAttr(ipv4DevconfAcceptLocal, nl.Uint32Attr(v))
	req.AddData(spec)
	if _, err := req.Execute(unix.NETLINK_ROUTE, 0); err != nil {
		return fmt.Errorf("set lo accept_local=%d: %w", v, err)
	}
	return nil
}

// acceptsLocal reads lo's accept_local from /proc/sys/net (read-only in
// containers, but readable), which the kernel resolves against the calling
// thread's network namespace.
func acceptsLocal() (bool, error) {
	b, err := os.ReadFile("/proc/sys/net/ipv4/conf/lo/accept_local")
	if err != nil {
		return false, fmt.Errorf("read lo accept_local: %w", err)
	}
	return strings.TrimSpace(string(b)) == "1", nil
}

// Ensure installs the rule and route for both families and accept_local on
// lo; it is idempotent.
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
	if err := setAcceptLocal(true); err != nil {
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
	if len(missing) > 0 {
		return fmt.Errorf("%w: %s", ErrIncomplete, strings.Join(missing, "; "))
	}
	return nil
}

// Remove deletes the rules and routes Ensure installed and turns lo's
// accept_local off again; missing ones are not an error.
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
	errs = append(errs, setAcceptLocal(false))
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
