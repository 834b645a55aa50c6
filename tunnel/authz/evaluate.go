package authz

import (
	"net/netip"
	"strings"
)

// Conn is what the destination ztunnel knows about a new connection.
type Conn struct {
	// SrcIdentity is the peer's SPIFFE ID from its verified certificate,
	// "spiffe://TD/ns/NS/sa/SA". Empty: plaintext, no identity.
	SrcIdentity string
	// SrcIP is the client's address; DstIP and DstPort the original
	// destination. IPv4-mapped addresses are treated as IPv4.
	SrcIP   netip.Addr
	DstIP   netip.Addr
	DstPort uint16
	// DstWorkload is the workload that owns DstIP.
	DstWorkload Workload
}

// Workload is the part of the destination workload that selects policies.
type Workload struct {
	Namespace string
	Name      string // for the caller's logs; not used to select policies
	// Policies are the "ns/name" keys of the workload's
	// authorization_policies: the WORKLOAD_SELECTOR policies istiod found
	// for it.
	Policies []string
}

// Reason says why a Decision was taken. Count decisions by Reason to see
// how much traffic each rule refuses.
type Reason uint8

const (
	// ReasonNone is the zero Decision's reason; Evaluate never returns it.
	ReasonNone Reason = iota
	// ReasonNoAllowPolicy allows: no ALLOW policy applies to the workload.
	ReasonNoAllowPolicy
	// ReasonAllowed allows: Decision.Policy is the ALLOW policy that matched.
	ReasonAllowed
	// ReasonDenied denies: Decision.Policy is the DENY policy that matched.
	ReasonDenied
	// ReasonNotAllowed denies: ALLOW policies apply and none matched.
	ReasonNotAllowed
	// ReasonUnenforceable denies: Decision.Policy cannot be evaluated and is
	// not an ALLOW, so it is taken to match.
	ReasonUnenforceable
	// ReasonUnknownPolicy denies: the workload lists Decision.Policy, which
	// is not in the set (yet).
	ReasonUnknownPolicy
	// ReasonInvalidIdentity denies: SrcIdentity is not
	// spiffe://TD/ns/NS/sa/SA.
	ReasonInvalidIdentity
	// ReasonInvalidAddress denies: SrcIP or DstIP is not a valid address.
	ReasonInvalidAddress
	// ReasonRejected denies: Decision.Policy was rejected by the client,
	// and its stand-in (see Rejected) is not an ALLOW, so it is taken to
	// match.
	ReasonRejected
)

var reasonText = [...]string{
	ReasonNone:            "no decision",
	ReasonNoAllowPolicy:   "no allow policy applies",
	ReasonAllowed:         "allowed",
	ReasonDenied:          "denied",
	ReasonNotAllowed:      "no allow policy matched",
	ReasonUnenforceable:   "unenforceable policy",
	ReasonUnknownPolicy:   "unknown policy",
	ReasonInvalidIdentity: "invalid source identity",
	ReasonInvalidAddress:  "invalid address",
	ReasonRejected:        "rejected policy",
}

func (r Reason) String() string {
	if int(r) < len(reasonText) {
		return reasonText[r]
	}
	return "unknown reason"
}

// Decision is the outcome of Evaluate. The zero Decision denies.
type Decision struct {
	Allowed bool
	Reason  Reason
	// Policy is the "ns/name" key of the policy that decided, empty when
	// no single policy did (ReasonNoAllowPolicy, ReasonNotAllowed, invalid
	// connections).
	Policy string
}

// String renders the decision for an access log, e.g.
// "denied by ns/deny-all" or "no allow policy matched". It allocates, so
// call it only when logging.
func (d Decision) String() string {
	switch d.Reason {
	case ReasonAllowed:
		return "allowed by " + d.Policy
	case ReasonDenied:
		return "denied by " + d.Policy
	case ReasonUnenforceable:
		return "denied by unenforceable policy " + d.Policy
	case ReasonUnknownPolicy:
		return "denied by unknown policy " + d.Policy
	case ReasonRejected:
		return "denied by rejected policy " + d.Policy
	}
	return d.Reason.String()
}

// Evaluate decides conn against the policies that apply to
// conn.DstWorkload. It is safe for concurrent use and does not allocate.
func (p *Policies) Evaluate(conn Conn) Decision { return p.evaluate(&conn) }

// peer is the connection as the matchers see it.
type peer struct {
	authenticated bool
	principal     string // identity without "spiffe://"
	namespace     string
	account       string
	src, dst      netip.Addr
	port          uint16
}

const spiffeScheme = "spiffe://"

func (p *Policies) evaluate(c *Conn) Decision {
	if !c.SrcIP.IsValid() || !c.DstIP.IsValid() {
		return Decision{Reason: ReasonInvalidAddress}
	}
	pr := peer{
		src:  c.SrcIP.Unmap().WithZone(""),
		dst:  c.DstIP.Unmap().WithZone(""),
		port: c.DstPort,
	}
	if c.SrcIdentity != "" {
		ns, sa, ok := parseIdentity(c.SrcIdentity)
		if !ok {
			return Decision{Reason: ReasonInvalidIdentity}
		}
		pr.authenticated = true
		pr.principal = c.SrcIdentity[len(spiffeScheme):]
		pr.namespace, pr.account = ns, sa
	}

	// Order as ztunnel's assert_rbac: namespace, global, workload. Every
	// DENY is checked before any ALLOW can decide.
	w := &c.DstWorkload
	nsl := p.byNamespace[w.Namespace]
	for _, l := range [2]*policyList{nsl, &p.global} {
		if l == nil {
			continue
		}
		for _, pol := range l.deny {
			if pol.matches(&pr) {
				return pol.denial()
			}
		}
	}
	for _, key := range w.Policies {
		pol := p.byKey[key]
		if pol == nil {
			return Decision{Reason: ReasonUnknownPolicy, Policy: key}
		}
		if pol.action != ActionAllow && pol.matches(&pr) {
			return pol.denial()
		}
	}

	haveAllow := false
	for _, l := range [2]*policyList{nsl, &p.global} {
		if l == nil {
			continue
		}
		for _, pol := range l.allow {
			haveAllow = true
			if pol.matches(&pr) {
				return Decision{Allowed: true, Reason: ReasonAllowed, Policy: pol.key}
			}
		}
	}
	for _, key := range w.Policies {
		if pol := p.byKey[key]; pol != nil && pol.action == ActionAllow {
			haveAllow = true
			if pol.matches(&pr) {
				return Decision{Allowed: true, Reason: ReasonAllowed, Policy: pol.key}
			}
		}
	}
	if !haveAllow {
		return Decision{Allowed: true, Reason: ReasonNoAllowPolicy}
	}
	return Decision{Reason: ReasonNotAllowed}
}

// parseIdentity accepts the identity form ztunnel's Identity::from_str
// accepts, spiffe://TD/ns/NS/sa/SA, and additionally refuses empty parts.
// It slices id rather than splitting it: the hot path must not allocate.
func parseIdentity(id string) (ns, sa string, ok bool) {
	rest, ok := strings.CutPrefix(id, spiffeScheme)
	if !ok {
		return "", "", false
	}
	td, rest, ok1 := strings.Cut(rest, "/")
	lit1, rest, ok2 := strings.Cut(rest, "/")
	ns, rest, ok3 := strings.Cut(rest, "/")
	lit2, sa, ok4 := strings.Cut(rest, "/")
	if !ok1 || !ok2 || !ok3 || !ok4 || lit1 != "ns" || lit2 != "sa" ||
		td == "" || ns == "" || sa == "" || strings.Contains(sa, "/") {
		return "", "", false
	}
	return ns, sa, true
}

func (p *Policy) denial() Decision {
	if p.rejected {
		return Decision{Reason: ReasonRejected, Policy: p.key}
	}
	if p.unenforceable != "" {
		return Decision{Reason: ReasonUnenforceable, Policy: p.key}
	}
	return Decision{Reason: ReasonDenied, Policy: p.key}
}

func (p *Policy) matches(pr *peer) bool {
	if p.unenforceable != "" {
		// The most restrictive reading: an ALLOW grants nothing, anything
		// else (DENY, unknown action) takes everything.
		return p.action != ActionAllow
	}
	for i := range p.groups {
		if p.groups[i].matches(pr, p.action) {
			return true
		}
	}
	return false
}

func (g *group) matches(pr *peer, action Action) bool {
	for i := range g.all {
		if !g.all[i].matches(pr, action) {
			return false
		}
	}
	return true
}

func (r *rules) matches(pr *peer, action Action) bool {
	if len(r.any) == 0 {
		return true
	}
	for i := range r.any {
		if r.any[i].matches(pr, action) {
			return true
		}
	}
	return false
}

func (m *match) matches(pr *peer, action Action) bool {
	if m.empty {
		// Only stripped L7 conditions produce this: fail closed.
		return action == ActionDeny
	}
	return stringsMatch(m.namespaces, m.notNamespaces, pr.authenticated, pr.namespace) &&
		stringsMatch(m.principals, m.notPrincipals, pr.authenticated, pr.principal) &&
		accountsMatch(m.serviceAccounts, m.notServiceAccounts, pr) &&
		prefixesMatch(m.srcIPs, m.notSrcIPs, pr.src) &&
		prefixesMatch(m.dstIPs, m.notDstIPs, pr.dst) &&
		portsMatch(m.ports, m.notPorts, pr.port)
}

// stringsMatch applies a positive and a negative field. Without an
// identity no value matches, so a positive field fails and a negative one
// holds.
func stringsMatch(pos, neg []StringMatch, authenticated bool, v string) bool {
	if len(pos) > 0 && !(authenticated && anyString(pos, v)) {
		return false
	}
	return len(neg) == 0 || !(authenticated && anyString(neg, v))
}

func anyString(ms []StringMatch, v string) bool {
	for _, m := range ms {
		if m.matches(v) {
			return true
		}
	}
	return false
}

func (m StringMatch) matches(v string) bool {
	switch m.Kind {
	case MatchExact:
		return v == m.Value
	case MatchPrefix:
		return strings.HasPrefix(v, m.Value)
	case MatchSuffix:
		return strings.HasSuffix(v, m.Value)
	case MatchPresence:
		return v != ""
	}
	return false
}

func accountsMatch(pos, neg []ServiceAccountMatch, pr *peer) bool {
	if len(pos) > 0 && !(pr.authenticated && anyAccount(pos, pr)) {
		return false
	}
	return len(neg) == 0 || !(pr.authenticated && anyAccount(neg, pr))
}

func anyAccount(ms []ServiceAccountMatch, pr *peer) bool {
	for _, m := range ms {
		if m.Namespace == pr.namespace && m.ServiceAccount == pr.account {
			return true
		}
	}
	return false
}

func prefixesMatch(pos, neg []netip.Prefix, ip netip.Addr) bool {
	if len(pos) > 0 && !anyPrefix(pos, ip) {
		return false
	}
	return len(neg) == 0 || !anyPrefix(neg, ip)
}

func anyPrefix(ps []netip.Prefix, ip netip.Addr) bool {
	for _, p := range ps {
		if p.Contains(ip) {
			return true
		}
	}
	return false
}

func portsMatch(pos, neg []uint16, port uint16) bool {
	if len(pos) > 0 && !anyPort(pos, port) {
		return false
	}
	return len(neg) == 0 || !anyPort(neg, port)
}

func anyPort(ps []uint16, port uint16) bool {
	for _, p := range ps {
		if p == port {
			return true
		}
	}
	return false
}
