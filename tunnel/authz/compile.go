package authz

import (
	"fmt"
	"net/netip"
	"slices"
	"strings"
)

// Policy is an Authorization compiled for evaluation: addresses parsed,
// ports narrowed, and anything that cannot be evaluated recorded instead of
// being dropped. It is immutable, so sets and snapshots share it.
type Policy struct {
	key    string
	src    Authorization // private deep copy, returned (copied) by Authorization
	action Action
	groups []group
	// unenforceable, when not empty, says why the policy cannot be
	// evaluated; it then matches every connection unless it is an ALLOW.
	unenforceable string
	// rejected: the policy stands in for one the client refused (Rejected).
	rejected bool
}

type group struct{ all []rules } // AND-ed

type rules struct{ any []match } // OR-ed

type match struct {
	empty bool

	namespaces, notNamespaces           []StringMatch
	principals, notPrincipals           []StringMatch
	serviceAccounts, notServiceAccounts []ServiceAccountMatch
	srcIPs, notSrcIPs                   []netip.Prefix
	dstIPs, notDstIPs                   []netip.Prefix
	ports, notPorts                     []uint16
}

// Compile compiles a for evaluation. It keeps a copy: the caller may reuse
// a's slices. Content that cannot be evaluated does not fail: the policy is
// kept and enforced fail-closed (see Err).
func Compile(a Authorization) *Policy {
	a = cloneAuthorization(a)
	p := &Policy{key: a.Key(), src: a, action: a.Action}
	c := compiler{}
	switch {
	case a.Unsupported != "":
		c.fail("unsupported content: %s", a.Unsupported)
	case a.Action != ActionAllow && a.Action != ActionDeny:
		c.fail("unknown action %v", a.Action)
	}
	if c.reason == "" {
		p.groups = make([]group, len(a.Groups))
		for i, g := range a.Groups {
			p.groups[i].all = make([]rules, len(g.Rules))
			for j, r := range g.Rules {
				ms := make([]match, len(r.Matches))
				for k := range r.Matches {
					ms[k] = c.match(&r.Matches[k])
				}
				p.groups[i].all[j].any = ms
			}
		}
	}
	if c.reason != "" {
		p.unenforceable, p.groups = c.reason, nil
	}
	return p
}

// Rejected returns the policy that stands in for one the control plane
// sent and the client refused as malformed (and NACKed), so that the policy
// is enforced fail-closed rather than being absent, or kept in a version
// its author replaced: an absent DENY allows what it should deny, and an
// absent ALLOW can turn "no allow policy applies" into allow-all. As an
// ALLOW the stand-in matches nothing; with any other action, ActionUnknown
// included, it matches every connection it applies to. It applies as the
// policy would: by scope (ScopeUnknown to its namespace) and to the
// workloads that list key. scope and action are what could be read of the
// policy; its namespace is key's "namespace/" prefix.
func Rejected(key string, scope Scope, action Action, reason string) *Policy {
	ns, name, ok := strings.Cut(key, "/")
	if !ok {
		ns, name = "", key
	}
	a := Authorization{Name: name, Namespace: ns, Scope: scope, Action: action, Unsupported: "rejected: " + reason}
	return &Policy{key: key, src: a, action: action, unenforceable: reason, rejected: true}
}

// Key returns the policy's "namespace/name".
func (p *Policy) Key() string { return p.key }

// Authorization returns a copy of the policy as it was compiled.
func (p *Policy) Authorization() Authorization { return cloneAuthorization(p.src) }

// Err reports why the policy is enforced fail-closed: a *PolicyError
// wrapping ErrUnenforceable, or ErrRejected for a rejected policy's
// stand-in; nil when it is evaluated as written.
func (p *Policy) Err() error {
	if p.unenforceable == "" {
		return nil
	}
	return &PolicyError{Key: p.key, Reason: p.unenforceable, Rejected: p.rejected}
}

// compiler records the first reason a policy cannot be evaluated.
type compiler struct{ reason string }

func (c *compiler) fail(format string, args ...any) {
	if c.reason == "" {
		c.reason = fmt.Sprintf(format, args...)
	}
}

func (c *compiler) match(m *Match) match {
	return match{
		empty:              m.isEmpty(),
		namespaces:         c.strings("namespaces", m.Namespaces),
		notNamespaces:      c.strings("not_namespaces", m.NotNamespaces),
		principals:         c.strings("principals", m.Principals),
		notPrincipals:      c.strings("not_principals", m.NotPrincipals),
		serviceAccounts:    m.ServiceAccounts,
		notServiceAccounts: m.NotServiceAccounts,
		srcIPs:             c.prefixes("source_ips", m.SourceIPs),
		notSrcIPs:          c.prefixes("not_source_ips", m.NotSourceIPs),
		dstIPs:             c.prefixes("destination_ips", m.DestinationIPs),
		notDstIPs:          c.prefixes("not_destination_ips", m.NotDestinationIPs),
		ports:              c.ports("destination_ports", m.DestinationPorts),
		notPorts:           c.ports("not_destination_ports", m.NotDestinationPorts),
	}
}

func (c *compiler) strings(field string, in []StringMatch) []StringMatch {
	for _, s := range in {
		if s.Kind < MatchExact || s.Kind > MatchPresence {
			c.fail("%s: string match without a known match type (%d)", field, s.Kind)
		}
	}
	return in
}

func (c *compiler) prefixes(field string, in []Address) []netip.Prefix {
	if len(in) == 0 {
		return nil
	}
	out := make([]netip.Prefix, 0, len(in))
	for _, a := range in {
		p, ok := a.prefix()
		if !ok {
			c.fail("%s: invalid address of %d bytes with length %d", field, len(a.Address), a.Length)
			continue
		}
		out = append(out, p)
	}
	return out
}

func (c *compiler) ports(field string, in []uint32) []uint16 {
	if len(in) == 0 {
		return nil
	}
	out := make([]uint16, 0, len(in))
	for _, p := range in {
		if p > 65535 {
			// ztunnel truncates to u16 (65616 becomes 80); refuse instead.
			c.fail("%s: port %d out of range", field, p)
			continue
		}
		out = append(out, uint16(p))
	}
	return out
}

// cloneAuthorization deep-copies a so that callers may reuse their slices
// after an update and readers of Get cannot change the stored policy.
func cloneAuthorization(a Authorization) Authorization {
	a.Groups = slices.Clone(a.Groups)
	for i := range a.Groups {
		g := &a.Groups[i]
		g.Rules = slices.Clone(g.Rules)
		for j := range g.Rules {
			r := &g.Rules[j]
			r.Matches = slices.Clone(r.Matches)
			for k := range r.Matches {
				cloneMatch(&r.Matches[k])
			}
		}
	}
	return a
}

func cloneMatch(m *Match) {
	m.Namespaces = slices.Clone(m.Namespaces)
	m.NotNamespaces = slices.Clone(m.NotNamespaces)
	m.Principals = slices.Clone(m.Principals)
	m.NotPrincipals = slices.Clone(m.NotPrincipals)
	m.SourceIPs = cloneAddresses(m.SourceIPs)
	m.NotSourceIPs = cloneAddresses(m.NotSourceIPs)
	m.DestinationIPs = cloneAddresses(m.DestinationIPs)
	m.NotDestinationIPs = cloneAddresses(m.NotDestinationIPs)
	m.DestinationPorts = slices.Clone(m.DestinationPorts)
	m.NotDestinationPorts = slices.Clone(m.NotDestinationPorts)
	m.ServiceAccounts = slices.Clone(m.ServiceAccounts)
	m.NotServiceAccounts = slices.Clone(m.NotServiceAccounts)
}

func cloneAddresses(in []Address) []Address {
	out := slices.Clone(in)
	for i := range out {
		out[i].Address = slices.Clone(out[i].Address)
	}
	return out
}
