package authz

import (
	"net/netip"
	"reflect"
	"slices"
	"strings"
	"testing"
)

// FuzzEvaluate builds policy sets and connections from fuzz input and
// checks that Evaluate never panics and agrees with reference, a
// deliberately naive second reading of the same rules.
func FuzzEvaluate(f *testing.F) {
	v4 := func(s string) []byte { return netip.MustParseAddr(s).AsSlice() }
	f.Add([]byte{}, sleepID, v4("10.0.0.1"), v4("10.0.1.1"), uint16(8080), "default", uint8(0))
	f.Add([]byte{0, 1, 1, 1, 1, 1, 0xff, 1, 2}, sleepID, v4("10.0.0.1"), v4("10.0.1.1"), uint16(8080), "default", uint8(1))
	f.Add([]byte{1, 2, 2, 1, 2, 2, 0x0f, 3, 3, 4, 10, 0, 0, 0, 8}, "", v4("10.0.0.1"), v4("10.0.1.1"), uint16(80), "other", uint8(3))
	f.Add([]byte{2, 1, 1, 2, 1, 1, 0x30, 4, 16, 1, 2, 3, 9, 96}, notsleepID,
		netip.MustParseAddr("::ffff:10.0.0.1").AsSlice(), netip.MustParseAddr("fd00::1").AsSlice(), uint16(9090), "istio-system", uint8(0xff))
	f.Add([]byte{7, 6, 5, 4, 3, 2, 1, 0, 0xc0, 0xff, 0xff, 0xff}, "spiffe://td/ns/a/sa/b/c", []byte{1, 2, 3}, v4("10.0.1.1"), uint16(1), "", uint8(2))

	f.Fuzz(func(t *testing.T, spec []byte, id string, src, dst []byte, port uint16, ns string, refMask uint8) {
		ps := decodePolicies(spec)
		var refs []string
		for i, k := range append(keysOf(ps), "default/missing") {
			if refMask&(1<<i) != 0 {
				refs = append(refs, k)
			}
		}
		c := Conn{SrcIdentity: id, DstPort: port, DstWorkload: Workload{Namespace: ns, Policies: refs}}
		c.SrcIP, _ = netip.AddrFromSlice(src)
		c.DstIP, _ = netip.AddrFromSlice(dst)

		p := setOf(ps...)
		got := p.Evaluate(c)
		want := reference(ps, c)
		if got != want {
			t.Fatalf("Evaluate = %+v (%s), reference %+v (%s)\npolicies %+v\nconn %+v", got, got, want, want, ps, c)
		}
		if got.Allowed != (got.Reason == ReasonAllowed || got.Reason == ReasonNoAllowPolicy) {
			t.Fatalf("Allowed=%v with reason %v", got.Allowed, got.Reason)
		}
		_ = got.String()
		_ = p.All()
		_ = p.Applicable(c.DstWorkload)
	})
}

func keysOf(ps []Authorization) []string {
	var ks []string
	for _, a := range ps {
		if !slices.Contains(ks, a.Key()) {
			ks = append(ks, a.Key())
		}
	}
	return ks
}

// decodePolicies turns bytes into up to four small policies, biased towards
// the values the matchers care about, including invalid ones.
func decodePolicies(b []byte) []Authorization {
	r := byteReader(b)
	namespaces := []string{"default", "other", "istio-system", ""}
	strs := []string{"", "default", sleepP, "cluster.local/", "sleep", "/sa/sleep", "de", "ns/other/sa/notsleep"}
	var ps []Authorization
	for range int(r.next() % 5) {
		a := Authorization{
			Namespace: namespaces[r.next()%4],
			Name:      string(rune('a' + r.next()%3)),
			Scope:     Scope(r.next() % 4),
			Action:    Action(r.next() % 3),
		}
		if r.next()%16 == 15 {
			a.Unsupported = "fuzz"
		}
		for range int(r.next() % 3) {
			var g Group
			for range int(r.next() % 3) {
				var rs Rules
				for range int(r.next() % 3) {
					rs.Matches = append(rs.Matches, decodeMatch(&r, strs))
				}
				g.Rules = append(g.Rules, rs)
			}
			a.Groups = append(a.Groups, g)
		}
		ps = append(ps, a)
	}
	return ps
}

func decodeMatch(r *byteReader, strs []string) Match {
	var m Match
	fields := uint16(r.next()) | uint16(r.next())<<8
	sm := func() []StringMatch {
		out := make([]StringMatch, 1+r.next()%2)
		for i := range out {
			out[i] = StringMatch{Kind: MatchKind(r.next() % 6), Value: strs[r.next()%uint8(len(strs))]}
		}
		return out
	}
	addrs := func() []Address {
		out := make([]Address, 1+r.next()%2)
		for i := range out {
			n := []int{4, 16, 16, 4, 0, 5}[r.next()%6]
			a := make([]byte, n)
			for j := range a {
				a[j] = r.next()
			}
			if n == 16 && r.next()%2 == 0 {
				copy(a, netip.MustParseAddr("::ffff:0:0").AsSlice()[:12])
			}
			out[i] = Address{Address: a, Length: uint32(r.next() % 140)}
		}
		return out
	}
	ports := func() []uint32 {
		out := make([]uint32, 1+r.next()%2)
		for i := range out {
			out[i] = uint32(r.next())<<8 | uint32(r.next())
			if r.next()%32 == 0 {
				out[i] += 65536
			}
		}
		return out
	}
	accounts := func() []ServiceAccountMatch {
		return []ServiceAccountMatch{{Namespace: strs[r.next()%uint8(len(strs))], ServiceAccount: []string{"sleep", "notsleep", ""}[r.next()%3]}}
	}
	set := func(bit uint) bool { return fields&(1<<bit) != 0 }
	if set(0) {
		m.Namespaces = sm()
	}
	if set(1) {
		m.NotNamespaces = sm()
	}
	if set(2) {
		m.Principals = sm()
	}
	if set(3) {
		m.NotPrincipals = sm()
	}
	if set(4) {
		m.SourceIPs = addrs()
	}
	if set(5) {
		m.NotSourceIPs = addrs()
	}
	if set(6) {
		m.DestinationIPs = addrs()
	}
	if set(7) {
		m.NotDestinationIPs = addrs()
	}
	if set(8) {
		m.DestinationPorts = ports()
	}
	if set(9) {
		m.NotDestinationPorts = ports()
	}
	if set(10) {
		m.ServiceAccounts = accounts()
	}
	if set(11) {
		m.NotServiceAccounts = accounts()
	}
	return m
}

type byteReader []byte

func (r *byteReader) next() uint8 {
	if len(*r) == 0 {
		return 0
	}
	b := (*r)[0]
	*r = (*r)[1:]
	return b
}

// reference is the package's documented semantics written the obvious,
// slow way, sharing no code with the implementation.
func reference(ps []Authorization, c Conn) Decision {
	if !c.SrcIP.IsValid() || !c.DstIP.IsValid() {
		return Decision{Reason: ReasonInvalidAddress}
	}
	var id refIdentity
	if c.SrcIdentity != "" {
		rest, ok := strings.CutPrefix(c.SrcIdentity, "spiffe://")
		parts := strings.Split(rest, "/")
		if !ok || len(parts) != 5 || parts[1] != "ns" || parts[3] != "sa" ||
			parts[0] == "" || parts[2] == "" || parts[4] == "" {
			return Decision{Reason: ReasonInvalidIdentity}
		}
		id = refIdentity{ok: true, principal: rest, ns: parts[2], sa: parts[4]}
	}

	byKey := map[string]Authorization{}
	for _, a := range ps {
		byKey[a.Key()] = a // the last one with a key wins, as in Replace
	}
	var nsKeys, globalKeys []string
	for k, a := range byKey {
		switch {
		case a.Scope == ScopeGlobal:
			globalKeys = append(globalKeys, k)
		case a.Scope != ScopeWorkloadSelector && a.Namespace == c.DstWorkload.Namespace:
			nsKeys = append(nsKeys, k)
		}
	}
	slices.Sort(nsKeys)
	slices.Sort(globalKeys)
	scoped := append(nsKeys, globalKeys...)

	for _, k := range scoped {
		if a := byKey[k]; a.Action != ActionAllow && refPolicyMatches(a, id, c) {
			return refDenial(a)
		}
	}
	for _, k := range c.DstWorkload.Policies {
		a, ok := byKey[k]
		if !ok {
			return Decision{Reason: ReasonUnknownPolicy, Policy: k}
		}
		if a.Action != ActionAllow && refPolicyMatches(a, id, c) {
			return refDenial(a)
		}
	}
	anyAllow := false
	for _, k := range append(scoped, c.DstWorkload.Policies...) {
		if a := byKey[k]; a.Action == ActionAllow {
			anyAllow = true
			if refPolicyMatches(a, id, c) {
				return Decision{Allowed: true, Reason: ReasonAllowed, Policy: k}
			}
		}
	}
	if anyAllow {
		return Decision{Reason: ReasonNotAllowed}
	}
	return Decision{Allowed: true, Reason: ReasonNoAllowPolicy}
}

func refEmpty(m Match) bool {
	v := reflect.ValueOf(m)
	for i := range v.NumField() {
		if v.Field(i).Len() > 0 {
			return false
		}
	}
	return true
}

type refIdentity struct {
	ok                bool
	principal, ns, sa string
}

func refDenial(a Authorization) Decision {
	if refUnenforceable(a) {
		return Decision{Reason: ReasonUnenforceable, Policy: a.Key()}
	}
	return Decision{Reason: ReasonDenied, Policy: a.Key()}
}

func refUnenforceable(a Authorization) bool {
	if a.Unsupported != "" || (a.Action != ActionAllow && a.Action != ActionDeny) {
		return true
	}
	for _, g := range a.Groups {
		for _, r := range g.Rules {
			for _, m := range r.Matches {
				for _, ss := range [][]StringMatch{m.Namespaces, m.NotNamespaces, m.Principals, m.NotPrincipals} {
					for _, s := range ss {
						if s.Kind == MatchUnset || s.Kind > MatchPresence {
							return true
						}
					}
				}
				for _, as := range [][]Address{m.SourceIPs, m.NotSourceIPs, m.DestinationIPs, m.NotDestinationIPs} {
					for _, ad := range as {
						if (len(ad.Address) != 4 && len(ad.Address) != 16) || ad.Length > uint32(8*len(ad.Address)) {
							return true
						}
					}
				}
				for _, p := range append(slices.Clone(m.DestinationPorts), m.NotDestinationPorts...) {
					if p > 65535 {
						return true
					}
				}
			}
		}
	}
	return false
}

func refPolicyMatches(a Authorization, id refIdentity, c Conn) bool {
	if refUnenforceable(a) {
		return a.Action != ActionAllow
	}
	return slices.ContainsFunc(a.Groups, func(g Group) bool {
		for _, r := range g.Rules {
			if len(r.Matches) > 0 && !slices.ContainsFunc(r.Matches, func(m Match) bool { return refMatch(m, a.Action, id, c) }) {
				return false
			}
		}
		return true
	})
}

func refMatch(m Match, action Action, id refIdentity, c Conn) bool {
	if refEmpty(m) {
		return action == ActionDeny
	}
	str := func(ms []StringMatch, v string) bool {
		return id.ok && slices.ContainsFunc(ms, func(s StringMatch) bool {
			switch s.Kind {
			case MatchExact:
				return v == s.Value
			case MatchPrefix:
				return len(v) >= len(s.Value) && v[:len(s.Value)] == s.Value
			case MatchSuffix:
				return len(v) >= len(s.Value) && v[len(v)-len(s.Value):] == s.Value
			}
			return v != ""
		})
	}
	sa := func(ms []ServiceAccountMatch) bool {
		return id.ok && slices.Contains(ms, ServiceAccountMatch{Namespace: id.ns, ServiceAccount: id.sa})
	}
	ip := func(as []Address, addr netip.Addr) bool {
		return slices.ContainsFunc(as, func(ad Address) bool { return refContains(ad, addr) })
	}
	port := func(ps []uint32) bool { return slices.Contains(ps, uint32(c.DstPort)) }
	field := func(pos, neg int, in func(bool) bool) bool {
		return (pos == 0 || in(true)) && (neg == 0 || !in(false))
	}
	pick := func(b bool, x, y []StringMatch) []StringMatch {
		if b {
			return x
		}
		return y
	}
	return field(len(m.Namespaces), len(m.NotNamespaces), func(p bool) bool { return str(pick(p, m.Namespaces, m.NotNamespaces), id.ns) }) &&
		field(len(m.Principals), len(m.NotPrincipals), func(p bool) bool { return str(pick(p, m.Principals, m.NotPrincipals), id.principal) }) &&
		field(len(m.ServiceAccounts), len(m.NotServiceAccounts), func(p bool) bool {
			if p {
				return sa(m.ServiceAccounts)
			}
			return sa(m.NotServiceAccounts)
		}) &&
		field(len(m.SourceIPs), len(m.NotSourceIPs), func(p bool) bool {
			if p {
				return ip(m.SourceIPs, c.SrcIP)
			}
			return ip(m.NotSourceIPs, c.SrcIP)
		}) &&
		field(len(m.DestinationIPs), len(m.NotDestinationIPs), func(p bool) bool {
			if p {
				return ip(m.DestinationIPs, c.DstIP)
			}
			return ip(m.NotDestinationIPs, c.DstIP)
		}) &&
		field(len(m.DestinationPorts), len(m.NotDestinationPorts), func(p bool) bool {
			if p {
				return port(m.DestinationPorts)
			}
			return port(m.NotDestinationPorts)
		})
}

// refContains compares bit by bit in the 16-byte form, where IPv4 lives
// at ::ffff:0:0/96, after checking that both sides are of one family.
func refContains(ad Address, addr netip.Addr) bool {
	var p [16]byte
	bits := int(ad.Length)
	if len(ad.Address) == 4 {
		p = netip.AddrFrom4([4]byte(ad.Address)).As16() // ::ffff:a.b.c.d
		bits += 96
	} else {
		copy(p[:], ad.Address)
	}
	pfxV4 := netip.AddrFrom16(p).Is4In6() && bits >= 96
	addrV4 := addr.Is4() || addr.Is4In6()
	if pfxV4 != addrV4 {
		return false
	}
	a := addr.As16() // IPv4 comes back as ::ffff:a.b.c.d
	for i := range bits {
		if (a[i/8]>>(7-i%8))&1 != (p[i/8]>>(7-i%8))&1 {
			return false
		}
	}
	return true
}
