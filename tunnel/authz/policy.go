package authz

import (
	"net/netip"
	"strconv"
)

// Authorization is one policy as istiod sends it in the workload API
// (istio.security.Authorization). Field for field it mirrors the proto so a
// converter is a plain copy; values the proto allows but this package cannot
// evaluate are kept and enforced fail-closed, never dropped.
type Authorization struct {
	// Name and Namespace identify the policy; its key is "Namespace/Name".
	Name      string
	Namespace string
	// Scope selects the workloads the policy applies to. Zero is
	// ScopeGlobal, as in the proto.
	Scope Scope
	// Action is what a match does. Zero is ActionAllow, as in the proto.
	Action Action
	// Groups are OR-ed. None: the policy never matches (an ALLOW with no
	// groups therefore denies everything it applies to).
	Groups []Group
	// Unsupported, when not empty, says why the converter could not
	// represent the policy faithfully (e.g. an unknown proto field). The
	// policy is then enforced fail-closed. Empty: fully represented.
	Unsupported string
}

// Key returns "namespace/name", the form workloads use to reference the
// policy in their authorization_policies.
func (a Authorization) Key() string { return a.Namespace + "/" + a.Name }

// Group is istio.security.Group: one AuthorizationPolicy rule. Its Rules are
// AND-ed; a Group without Rules always matches (an empty rule `{}`).
type Group struct {
	Rules []Rules
}

// Rules is istio.security.Rules: one of a rule's from, to or when clauses.
// Its Matches are OR-ed; without Matches it always matches.
type Rules struct {
	Matches []Match
}

// Match is istio.security.Match. Each non-empty field must contain the
// connection's value (values within a field are OR-ed) and no non-empty
// Not field may contain it. A Match with no field set is what remains of a
// clause whose conditions were all L7: it never matches in an ALLOW policy
// and always matches in a DENY policy.
type Match struct {
	Namespaces    []StringMatch
	NotNamespaces []StringMatch

	Principals    []StringMatch
	NotPrincipals []StringMatch

	SourceIPs    []Address
	NotSourceIPs []Address

	DestinationIPs    []Address
	NotDestinationIPs []Address

	// Ports are uint32 as in the proto; a value above 65535 makes the
	// policy unenforceable rather than being truncated.
	DestinationPorts    []uint32
	NotDestinationPorts []uint32

	// ServiceAccounts are in newer workload API versions (and ztunnel's
	// rbac.rs); a converter for an older proto leaves them empty.
	ServiceAccounts    []ServiceAccountMatch
	NotServiceAccounts []ServiceAccountMatch
}

func (m *Match) isEmpty() bool {
	return len(m.Namespaces) == 0 && len(m.NotNamespaces) == 0 &&
		len(m.Principals) == 0 && len(m.NotPrincipals) == 0 &&
		len(m.SourceIPs) == 0 && len(m.NotSourceIPs) == 0 &&
		len(m.DestinationIPs) == 0 && len(m.NotDestinationIPs) == 0 &&
		len(m.DestinationPorts) == 0 && len(m.NotDestinationPorts) == 0 &&
		len(m.ServiceAccounts) == 0 && len(m.NotServiceAccounts) == 0
}

// MatchKind is the case of istio.security.StringMatch's match_type oneof;
// the values are the oneof's field numbers.
type MatchKind uint8

const (
	// MatchUnset is an empty oneof (or a case this package does not know):
	// the policy holding it is unenforceable.
	MatchUnset    MatchKind = 0
	MatchExact    MatchKind = 1
	MatchPrefix   MatchKind = 2
	MatchSuffix   MatchKind = 3
	MatchPresence MatchKind = 4 // any non-empty value; Value is ignored
)

// StringMatch is istio.security.StringMatch. istiod turns "*" into
// presence, "*x" into suffix "x", "x*" into prefix "x", anything else into
// exact: no other character is special.
type StringMatch struct {
	Kind  MatchKind
	Value string
}

// Exact, Prefix, Suffix and Presence build StringMatches.
func Exact(v string) StringMatch  { return StringMatch{Kind: MatchExact, Value: v} }
func Prefix(v string) StringMatch { return StringMatch{Kind: MatchPrefix, Value: v} }
func Suffix(v string) StringMatch { return StringMatch{Kind: MatchSuffix, Value: v} }
func Presence() StringMatch       { return StringMatch{Kind: MatchPresence} }

// Address is istio.security.Address: a CIDR as raw address bytes (4 or 16)
// and a prefix length. Anything else makes the policy unenforceable.
type Address struct {
	Address []byte
	Length  uint32
}

// AddressFromPrefix returns the Address istiod would send for p.
func AddressFromPrefix(p netip.Prefix) Address {
	return Address{Address: p.Addr().AsSlice(), Length: uint32(p.Bits())}
}

// prefix converts a to a netip.Prefix. IPv4-mapped IPv6 prefixes of /96 and
// longer become IPv4 prefixes because connection addresses are unmapped
// before matching (ztunnel canonicalises them the same way).
func (a Address) prefix() (netip.Prefix, bool) {
	ip, ok := netip.AddrFromSlice(a.Address)
	if !ok || a.Length > uint32(ip.BitLen()) {
		return netip.Prefix{}, false
	}
	bits := int(a.Length)
	if ip.Is4In6() && bits >= 96 {
		ip, bits = ip.Unmap(), bits-96
	}
	return netip.PrefixFrom(ip, bits).Masked(), true
}

// ServiceAccountMatch matches the namespace and service account of the
// source identity exactly.
type ServiceAccountMatch struct {
	Namespace      string
	ServiceAccount string
}

// Scope is istio.security.Scope; the values are the proto's. A converter
// must pass an unknown proto value through: such a policy applies to its
// own namespace, the widest target of a policy outside the root namespace.
type Scope int32

const (
	ScopeGlobal           Scope = 0
	ScopeNamespace        Scope = 1
	ScopeWorkloadSelector Scope = 2
	// ScopeUnknown is the scope of a rejected policy that could not be
	// read (see Rejected): like any scope this package does not know, it
	// applies to the policy's namespace.
	ScopeUnknown Scope = -1
)

func (s Scope) String() string {
	switch s {
	case ScopeGlobal:
		return "GLOBAL"
	case ScopeNamespace:
		return "NAMESPACE"
	case ScopeWorkloadSelector:
		return "WORKLOAD_SELECTOR"
	}
	return "Scope(" + strconv.Itoa(int(s)) + ")"
}

// Action is istio.security.Action; the values are the proto's. A converter
// must pass an unknown proto value through (e.g. Action(2)): such a policy
// denies every connection it applies to.
type Action int32

const (
	ActionAllow Action = 0
	ActionDeny  Action = 1
	// ActionUnknown is the action of a rejected policy that could not be
	// read (see Rejected): like any action this package does not know, it
	// denies every connection the policy applies to.
	ActionUnknown Action = -1
)

func (a Action) String() string {
	switch a {
	case ActionAllow:
		return "ALLOW"
	case ActionDeny:
		return "DENY"
	}
	return "Action(" + strconv.Itoa(int(a)) + ")"
}
