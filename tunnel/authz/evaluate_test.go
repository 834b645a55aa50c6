package authz

import (
	"fmt"
	"net/netip"
	"testing"
)

// The order of DENY and ALLOW (istio.io AuthorizationPolicy reference:
// "If there are any DENY policies that match the request, deny the
// request. If there are no ALLOW policies for the workload, allow the
// request. If any of the ALLOW policies match the request, allow the
// request. Deny the request.").
func TestEvaluateDecision(t *testing.T) {
	all := grp() // an empty rule matches every connection
	bySleep := one(Match{Principals: []StringMatch{Exact(sleepP)}})
	byOther := one(Match{Principals: []StringMatch{Exact("cluster.local/ns/other/sa/notsleep")}})
	runCases(t, []evalCase{
		{name: "no policies allow", conn: mtls(), want: allowedNoPolicy},
		{
			name:     "matching deny denies",
			policies: []Authorization{deny("default/deny-all", ScopeNamespace, all)},
			conn:     mtls(),
			want:     deniedBy("default/deny-all"),
		},
		{
			name:     "deny that does not match leaves no allow policy",
			policies: []Authorization{deny("default/deny-other", ScopeNamespace, byOther)},
			conn:     mtls(),
			want:     allowedNoPolicy,
		},
		{
			name:     "matching allow allows",
			policies: []Authorization{allow("default/allow-sleep", ScopeNamespace, bySleep)},
			conn:     mtls(),
			want:     allowedBy("default/allow-sleep"),
		},
		{
			name:     "allow that does not match denies",
			policies: []Authorization{allow("default/allow-other", ScopeNamespace, byOther)},
			conn:     mtls(),
			want:     notAllowed,
		},
		{
			name: "deny wins over a matching allow",
			policies: []Authorization{
				allow("default/allow-sleep", ScopeNamespace, bySleep),
				deny("default/deny-sleep", ScopeNamespace, bySleep),
			},
			conn: mtls(),
			want: deniedBy("default/deny-sleep"),
		},
		{
			name: "global deny wins over a namespace allow",
			policies: []Authorization{
				allow("default/allow-sleep", ScopeNamespace, bySleep),
				deny("istio-system/deny-sleep", ScopeGlobal, bySleep),
			},
			conn: mtls(),
			want: deniedBy("istio-system/deny-sleep"),
		},
		{
			name: "workload deny wins over a global allow",
			policies: []Authorization{
				allow("istio-system/allow-all", ScopeGlobal, all),
				deny("default/deny-sleep", ScopeWorkloadSelector, bySleep),
			},
			conn: withRefs(mtls(), "default/deny-sleep"),
			want: deniedBy("default/deny-sleep"),
		},
		{
			name: "non-matching deny then matching allow",
			policies: []Authorization{
				deny("default/deny-other", ScopeNamespace, byOther),
				allow("default/allow-sleep", ScopeNamespace, bySleep),
			},
			conn: mtls(),
			want: allowedBy("default/allow-sleep"),
		},
		{
			name: "any of several allows",
			policies: []Authorization{
				allow("default/a-allow-other", ScopeNamespace, byOther),
				allow("default/b-allow-sleep", ScopeNamespace, bySleep),
			},
			conn: mtls(),
			want: allowedBy("default/b-allow-sleep"),
		},
		{
			// AuthorizationPolicy reference: rules "If not set, the match
			// will never occur. This is equivalent to setting a default of
			// deny for the target workloads if the action is ALLOW."
			name:     "allow without rules allows nothing",
			policies: []Authorization{allow("default/allow-nothing", ScopeNamespace)},
			conn:     mtls(),
			want:     notAllowed,
		},
		{
			name:     "deny without rules denies nothing",
			policies: []Authorization{deny("default/deny-nothing", ScopeNamespace)},
			conn:     mtls(),
			want:     allowedNoPolicy,
		},
		{
			name: "namespace deny is reported before global deny",
			policies: []Authorization{
				deny("istio-system/deny-all", ScopeGlobal, all),
				deny("default/deny-all", ScopeNamespace, all),
			},
			conn: mtls(),
			want: deniedBy("default/deny-all"),
		},
	})
}

// Which policies apply: ztunnel state.rs assert_rbac takes the destination
// namespace's policies, the global ones and the workload's own keys.
func TestEvaluateScope(t *testing.T) {
	all := grp()
	runCases(t, []evalCase{
		{
			name:     "global applies in the policy's namespace",
			policies: []Authorization{deny("istio-system/deny-all", ScopeGlobal, all)},
			conn:     inNS(mtls(), "istio-system"),
			want:     deniedBy("istio-system/deny-all"),
		},
		{
			name:     "global applies in every namespace",
			policies: []Authorization{deny("istio-system/deny-all", ScopeGlobal, all)},
			conn:     inNS(mtls(), "other"),
			want:     deniedBy("istio-system/deny-all"),
		},
		{
			name:     "global is global whatever its namespace",
			policies: []Authorization{deny("default/deny-all", ScopeGlobal, all)},
			conn:     inNS(mtls(), "other"),
			want:     deniedBy("default/deny-all"),
		},
		{
			name:     "namespace policy applies in its namespace",
			policies: []Authorization{deny("default/deny-all", ScopeNamespace, all)},
			conn:     mtls(),
			want:     deniedBy("default/deny-all"),
		},
		{
			name:     "namespace deny does not apply in other namespaces",
			policies: []Authorization{deny("other/deny-all", ScopeNamespace, all)},
			conn:     mtls(),
			want:     allowedNoPolicy,
		},
		{
			name:     "namespace allow elsewhere does not switch on default deny",
			policies: []Authorization{allow("other/allow-nothing", ScopeNamespace)},
			conn:     mtls(),
			want:     allowedNoPolicy,
		},
		{
			name:     "selector policy applies only when the workload lists it",
			policies: []Authorization{deny("default/deny-all", ScopeWorkloadSelector, all)},
			conn:     mtls(),
			want:     allowedNoPolicy,
		},
		{
			name:     "listed selector policy applies",
			policies: []Authorization{deny("default/deny-all", ScopeWorkloadSelector, all)},
			conn:     withRefs(mtls(), "default/deny-all"),
			want:     deniedBy("default/deny-all"),
		},
		{
			name:     "listed root-namespace selector policy applies",
			policies: []Authorization{deny("istio-system/deny-all", ScopeWorkloadSelector, all)},
			conn:     withRefs(mtls(), "istio-system/deny-all"),
			want:     deniedBy("istio-system/deny-all"),
		},
		{
			name: "selector allow of another workload does not apply",
			policies: []Authorization{
				allow("default/allow-nothing", ScopeWorkloadSelector),
				deny("default/deny-nothing", ScopeWorkloadSelector),
			},
			conn: withRefs(mtls(), "default/deny-nothing"),
			want: allowedNoPolicy,
		},
		{
			name:     "listed selector allow applies",
			policies: []Authorization{allow("default/allow-nothing", ScopeWorkloadSelector)},
			conn:     withRefs(mtls(), "default/allow-nothing"),
			want:     notAllowed,
		},
		{
			name:     "listed key not in the set denies",
			policies: []Authorization{allow("default/allow-all", ScopeNamespace, all)},
			conn:     withRefs(mtls(), "default/not-yet-pushed"),
			want:     Decision{Reason: ReasonUnknownPolicy, Policy: "default/not-yet-pushed"},
		},
		{
			name: "namespace deny is checked before a missing key",
			policies: []Authorization{
				deny("default/deny-all", ScopeNamespace, all),
			},
			conn: withRefs(mtls(), "default/missing"),
			want: deniedBy("default/deny-all"),
		},
		{
			name:     "unknown scope is widened to its namespace",
			policies: []Authorization{deny("default/future", Scope(7), all)},
			conn:     mtls(),
			want:     deniedBy("default/future"),
		},
		{
			name:     "unknown scope does not reach other namespaces",
			policies: []Authorization{deny("other/future", Scope(7), all)},
			conn:     mtls(),
			want:     allowedNoPolicy,
		},
		{
			name:     "workload without namespace gets global policies",
			policies: []Authorization{deny("istio-system/deny-all", ScopeGlobal, all)},
			conn:     inNS(mtls(), ""),
			want:     deniedBy("istio-system/deny-all"),
		},
	})
}

// Nesting as ztunnel rbac.rs evaluates it: groups OR, rules AND, matches
// OR, fields AND, values OR.
func TestEvaluateNesting(t *testing.T) {
	sleep := []StringMatch{Exact(sleepP)}
	other := []StringMatch{Exact("cluster.local/ns/other/sa/notsleep")}
	const key = "default/p"
	runCases(t, []evalCase{
		{
			name: "groups are OR-ed",
			policies: []Authorization{allow(key, ScopeNamespace,
				one(Match{Principals: other}),
				one(Match{Principals: sleep}))},
			conn: mtls(),
			want: allowedBy(key),
		},
		{
			name: "rules of a group are AND-ed: one fails",
			policies: []Authorization{allow(key, ScopeNamespace,
				grp(anyOf(Match{Principals: sleep}), anyOf(Match{DestinationPorts: []uint32{9090}})))},
			conn: mtls(),
			want: notAllowed,
		},
		{
			name: "rules of a group are AND-ed: all hold",
			policies: []Authorization{allow(key, ScopeNamespace,
				grp(anyOf(Match{Principals: sleep}), anyOf(Match{DestinationPorts: []uint32{9090}})))},
			conn: withPort(mtls(), 9090),
			want: allowedBy(key),
		},
		{
			name: "matches of a rule are OR-ed",
			policies: []Authorization{allow(key, ScopeNamespace,
				grp(anyOf(Match{Principals: other}, Match{DestinationPorts: []uint32{8080}})))},
			conn: mtls(),
			want: allowedBy(key),
		},
		{
			name: "fields of a match are AND-ed",
			policies: []Authorization{allow(key, ScopeNamespace,
				one(Match{Principals: sleep, DestinationPorts: []uint32{9090}}))},
			conn: mtls(),
			want: notAllowed,
		},
		{
			name: "values of a field are OR-ed",
			policies: []Authorization{allow(key, ScopeNamespace,
				one(Match{Principals: append(other, sleep...)}))},
			conn: mtls(),
			want: allowedBy(key),
		},
		{
			name: "negative field that contains the value fails the match",
			policies: []Authorization{allow(key, ScopeNamespace,
				one(Match{NotDestinationPorts: []uint32{8080}}))},
			conn: mtls(),
			want: notAllowed,
		},
		{
			name: "negative field that does not contain the value holds",
			policies: []Authorization{allow(key, ScopeNamespace,
				one(Match{NotDestinationPorts: []uint32{8080}}))},
			conn: withPort(mtls(), 9090),
			want: allowedBy(key),
		},
		{
			name: "positive and negative on one field: excluded",
			policies: []Authorization{allow(key, ScopeNamespace,
				one(Match{Principals: []StringMatch{Prefix("cluster.local/ns/default/")}, NotPrincipals: sleep}))},
			conn: mtls(),
			want: notAllowed,
		},
		{
			name: "positive and negative on one field: included",
			policies: []Authorization{allow(key, ScopeNamespace,
				one(Match{Principals: []StringMatch{Prefix("cluster.local/ns/default/")}, NotPrincipals: sleep}))},
			conn: withID(mtls(), "spiffe://cluster.local/ns/default/sa/reviews"),
			want: allowedBy(key),
		},
		{
			name:     "group without rules matches",
			policies: []Authorization{allow(key, ScopeNamespace, grp())},
			conn:     mtls(),
			want:     allowedBy(key),
		},
		{
			name:     "rules without matches match",
			policies: []Authorization{allow(key, ScopeNamespace, grp(anyOf()))},
			conn:     mtls(),
			want:     allowedBy(key),
		},
		{
			name:     "empty match never matches in an allow",
			policies: []Authorization{allow(key, ScopeNamespace, one(Match{}))},
			conn:     mtls(),
			want:     notAllowed,
		},
		{
			name: "empty match next to a real one in an allow",
			policies: []Authorization{allow(key, ScopeNamespace,
				grp(anyOf(Match{}, Match{Principals: sleep})))},
			conn: mtls(),
			want: allowedBy(key),
		},
		{
			// DENY `to: methods: [POST]` reaches ztunnel as one empty match.
			name:     "empty match always matches in a deny",
			policies: []Authorization{deny(key, ScopeNamespace, one(Match{}))},
			conn:     plaintext(),
			want:     deniedBy(key),
		},
		{
			// DENY `from: principals: [notsleep]` + `to: methods: [POST]`:
			// enforced without the HTTP part.
			name: "stripped L7 clause in a deny: other source",
			policies: []Authorization{deny(key, ScopeNamespace,
				grp(anyOf(Match{}), anyOf(Match{Principals: other})))},
			conn: withID(mtls(), notsleepID),
			want: deniedBy(key),
		},
		{
			name: "stripped L7 clause in a deny: listed source",
			policies: []Authorization{deny(key, ScopeNamespace,
				grp(anyOf(Match{}), anyOf(Match{Principals: other})))},
			conn: mtls(),
			want: allowedNoPolicy,
		},
	})
}

// String matching (ztunnel rbac.rs StringMatch::matches and
// matches_principal; istiod stringToMatch): principals are compared without
// "spiffe://", exact/prefix/suffix/presence, nothing else is special.
func TestEvaluateStringMatch(t *testing.T) {
	type tc struct {
		name  string
		match Match
		id    string
		want  bool
	}
	p := func(ms ...StringMatch) Match { return Match{Principals: ms} }
	n := func(ms ...StringMatch) Match { return Match{Namespaces: ms} }
	sa := func(ns, name string) Match {
		return Match{ServiceAccounts: []ServiceAccountMatch{{Namespace: ns, ServiceAccount: name}}}
	}
	cases := []tc{
		{"principal exact", p(Exact(sleepP)), sleepID, true},
		{"principal exact other", p(Exact(sleepP)), notsleepID, false},
		{"principal exact is case sensitive", p(Exact("cluster.local/ns/default/sa/Sleep")), sleepID, false},
		{"principal with spiffe scheme never matches", p(Exact(sleepID)), sleepID, false},
		{"dot is not a wildcard", p(Exact(sleepP)), "spiffe://clusterXlocal/ns/default/sa/sleep", false},
		{"star is not a wildcard in exact", p(Exact("cluster.local/ns/default/sa/*")), sleepID, false},
		{"principal prefix", p(Prefix("cluster.local/ns/default/")), sleepID, true},
		{"principal prefix other namespace", p(Prefix("cluster.local/ns/default/")), notsleepID, false},
		{"principal prefix is not a pattern", p(Prefix("cluster.local/ns/def/")), sleepID, false},
		{"principal suffix", p(Suffix("/sa/sleep")), sleepID, true},
		{"principal suffix not a substring", p(Suffix("/sa/sleep")), notsleepID, false},
		{"principal suffix trust domain free", p(Suffix("/ns/default/sa/sleep")), "spiffe://td-alt/ns/default/sa/sleep", true},
		{"principal presence", p(Presence()), notsleepID, true},
		{"principal empty prefix", p(Prefix("")), sleepID, true},
		{"principal empty exact", p(Exact("")), sleepID, false},
		{"namespace exact", n(Exact("default")), sleepID, true},
		{"namespace exact other", n(Exact("default")), notsleepID, false},
		{"namespace exact no dot wildcard", n(Exact("defaul.")), sleepID, false},
		{"namespace prefix", n(Prefix("def")), sleepID, true},
		{"namespace suffix", n(Suffix("ult")), sleepID, true},
		{"namespace suffix mismatch", n(Suffix("ult")), notsleepID, false},
		{"namespace presence", n(Presence()), notsleepID, true},
		{"namespace is not the trust domain", n(Exact("cluster.local")), sleepID, false},
		{"service account", sa("default", "sleep"), sleepID, true},
		{"service account other name", sa("default", "notsleep"), sleepID, false},
		{"service account other namespace", sa("other", "sleep"), sleepID, false},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			p := setOf(allow("default/p", ScopeNamespace, one(c.match)))
			got := p.Evaluate(withID(mtls(), c.id))
			if got.Allowed != c.want {
				t.Errorf("Evaluate(%s) = %s, want allowed=%v", c.id, got, c.want)
			}
		})
	}
}

// A source without identity matches no principal, namespace or service
// account value (ztunnel rbac.rs: plaintext_conn cases), so negations of
// them hold for it.
func TestEvaluatePlaintext(t *testing.T) {
	const key = "default/p"
	a := func(m Match) []Authorization { return []Authorization{allow(key, ScopeNamespace, one(m))} }
	d := func(m Match) []Authorization { return []Authorization{deny(key, ScopeNamespace, one(m))} }
	sleep := []StringMatch{Exact(sleepP)}
	runCases(t, []evalCase{
		{name: "allow principal refuses plaintext", policies: a(Match{Principals: sleep}), conn: plaintext(), want: notAllowed},
		{name: "allow principal presence refuses plaintext", policies: a(Match{Principals: []StringMatch{Presence()}}), conn: plaintext(), want: notAllowed},
		{name: "allow empty principal prefix refuses plaintext", policies: a(Match{Principals: []StringMatch{Prefix("")}}), conn: plaintext(), want: notAllowed},
		{name: "allow empty principal exact refuses plaintext", policies: a(Match{Principals: []StringMatch{Exact("")}}), conn: plaintext(), want: notAllowed},
		{name: "allow empty namespace exact refuses plaintext", policies: a(Match{Namespaces: []StringMatch{Exact("")}}), conn: plaintext(), want: notAllowed},
		{name: "allow namespace suffix refuses plaintext", policies: a(Match{Namespaces: []StringMatch{Suffix("")}}), conn: plaintext(), want: notAllowed},
		{name: "allow service account refuses plaintext", policies: a(Match{ServiceAccounts: []ServiceAccountMatch{{}}}), conn: plaintext(), want: notAllowed},
		{name: "allow not_principals admits plaintext", policies: a(Match{NotPrincipals: sleep}), conn: plaintext(), want: allowedBy(key)},
		{name: "allow not_namespaces admits plaintext", policies: a(Match{NotNamespaces: []StringMatch{Presence()}}), conn: plaintext(), want: allowedBy(key)},
		{name: "allow not_service_accounts admits plaintext", policies: a(Match{NotServiceAccounts: []ServiceAccountMatch{{Namespace: "default", ServiceAccount: "sleep"}}}), conn: plaintext(), want: allowedBy(key)},
		{name: "allow by source ip admits plaintext", policies: a(Match{SourceIPs: cidrs("10.0.0.0/8")}), conn: plaintext(), want: allowedBy(key)},
		{name: "allow not_principals empty prefix admits plaintext", policies: a(Match{NotPrincipals: []StringMatch{Prefix("")}}), conn: plaintext(), want: allowedBy(key)},
		{name: "allow not_principals empty prefix refuses mtls", policies: a(Match{NotPrincipals: []StringMatch{Prefix("")}}), conn: mtls(), want: notAllowed},
		{name: "deny not_namespaces empty exact refuses plaintext", policies: d(Match{NotNamespaces: []StringMatch{Exact("")}}), conn: plaintext(), want: deniedBy(key)},
		{name: "deny not_service_accounts empty refuses plaintext", policies: d(Match{NotServiceAccounts: []ServiceAccountMatch{{}}}), conn: plaintext(), want: deniedBy(key)},
		{name: "strict mtls deny refuses plaintext", policies: d(Match{NotPrincipals: []StringMatch{Presence()}}), conn: plaintext(), want: deniedBy(key)},
		{name: "strict mtls deny admits mtls", policies: d(Match{NotPrincipals: []StringMatch{Presence()}}), conn: mtls(), want: allowedNoPolicy},
		{name: "deny not_namespaces refuses plaintext", policies: d(Match{NotNamespaces: []StringMatch{Exact("default")}}), conn: plaintext(), want: deniedBy(key)},
		{name: "deny principal presence ignores plaintext", policies: d(Match{Principals: []StringMatch{Presence()}}), conn: plaintext(), want: allowedNoPolicy},
		{name: "deny principal presence refuses mtls", policies: d(Match{Principals: []StringMatch{Presence()}}), conn: mtls(), want: deniedBy(key)},
	})

	// istiod's conversion of PeerAuthentication STRICT with port 8080
	// PERMISSIVE: deny without identity unless the port is 8080.
	strict8080 := deny("default/converted_peer_authentication_pa", ScopeWorkloadSelector,
		grp(anyOf(Match{NotPrincipals: []StringMatch{Presence()}}), anyOf(Match{NotDestinationPorts: []uint32{8080}})))
	ref := func(c Conn) Conn { return withRefs(c, strict8080.Key()) }
	runCases(t, []evalCase{
		{name: "port-level permissive port admits plaintext", policies: []Authorization{strict8080}, conn: ref(plaintext()), want: allowedNoPolicy},
		{name: "port-level strict port refuses plaintext", policies: []Authorization{strict8080}, conn: ref(withPort(plaintext(), 9090)), want: deniedBy(strict8080.Key())},
		{name: "port-level strict port admits mtls", policies: []Authorization{strict8080}, conn: ref(withPort(mtls(), 9090)), want: allowedNoPolicy},
	})
}

// Addresses: CIDRs within one family; mapped IPv4 is IPv4; zones ignored.
func TestEvaluateAddresses(t *testing.T) {
	const key = "default/p"
	type tc struct {
		name  string
		match Match
		conn  Conn
		want  bool
	}
	src := func(s ...string) Match { return Match{SourceIPs: cidrs(s...)} }
	raw := func(b []byte, l uint32) Match { return Match{SourceIPs: []Address{{Address: b, Length: l}}} }
	mapped10 := netip.MustParseAddr("::ffff:10.0.0.0").AsSlice()
	v6zero := netip.IPv6Unspecified().AsSlice()
	cases := []tc{
		{"v4 /0 matches v4", src("0.0.0.0/0"), mtls(), true},
		{"v4 /0 does not match v6", src("0.0.0.0/0"), withSrc(mtls(), "fd00::1"), false},
		{"v6 /0 matches v6", src("::/0"), withSrc(mtls(), "fd00::1"), true},
		{"v6 /0 does not match v4", src("::/0"), mtls(), false},
		{"v4 /32 exact", src("10.0.0.1/32"), mtls(), true},
		{"v4 /32 neighbour", src("10.0.0.1/32"), withSrc(mtls(), "10.0.0.2"), false},
		{"v4 /31 upper", src("10.0.0.0/31"), mtls(), true},
		{"v4 /31 outside", src("10.0.0.0/31"), withSrc(mtls(), "10.0.0.2"), false},
		{"v4 /8 far inside", src("10.0.0.0/8"), withSrc(mtls(), "10.255.255.255"), true},
		{"v4 /8 just outside", src("10.0.0.0/8"), withSrc(mtls(), "11.0.0.0"), false},
		{"v4 host bits ignored", raw([]byte{10, 0, 0, 1}, 8), withSrc(mtls(), "10.9.9.9"), true},
		{"v6 /128 exact", src("fd00::1/128"), withSrc(mtls(), "fd00::1"), true},
		{"v6 /128 neighbour", src("fd00::1/128"), withSrc(mtls(), "fd00::2"), false},
		{"v6 /64", src("fd00:1:2:3::/64"), withSrc(mtls(), "fd00:1:2:3:ffff::1"), true},
		{"v6 /64 outside", src("fd00:1:2:3::/64"), withSrc(mtls(), "fd00:1:2:4::1"), false},
		{"mapped source matches v4 prefix", src("10.0.0.0/8"), withSrc(mtls(), "::ffff:10.0.0.1"), true},
		{"mapped source does not match v6 prefix", src("fd00::/8"), withSrc(mtls(), "::ffff:10.0.0.1"), false},
		{"mapped /104 prefix matches v4", raw(mapped10, 104), mtls(), true},
		{"mapped /104 prefix excludes other v4", raw(mapped10, 104), withSrc(mtls(), "11.0.0.1"), false},
		{"mapped /96 prefix matches any v4", raw(mapped10, 96), withSrc(mtls(), "192.0.2.1"), true},
		{"v6 prefix shorter than /96 stays v6", raw(v6zero, 80), mtls(), false},
		{"zoned source matches link-local", src("fe80::/10"), withSrc(mtls(), "fe80::1%eth0"), true},
		{"several prefixes are OR-ed", src("192.168.0.0/16", "10.0.0.0/24"), mtls(), true},
		{"not_source_ips excludes", Match{NotSourceIPs: cidrs("10.0.0.0/8")}, mtls(), false},
		{"not_source_ips admits others", Match{NotSourceIPs: cidrs("10.0.0.0/8")}, withSrc(mtls(), "192.168.1.1"), true},
		{"destination ip", Match{DestinationIPs: cidrs("10.0.1.1/32")}, mtls(), true},
		{"destination ip other", Match{DestinationIPs: cidrs("10.0.1.1/32")}, withDst(mtls(), "10.0.1.2"), false},
		{"destination ip mapped", Match{DestinationIPs: cidrs("10.0.1.0/24")}, withDst(mtls(), "::ffff:10.0.1.7"), true},
		{"destination v6", Match{DestinationIPs: cidrs("fd00::/16")}, withDst(mtls(), "fd00::7"), true},
		{"not_destination_ips", Match{NotDestinationIPs: cidrs("10.0.1.1/32")}, mtls(), false},
		{"destination port", Match{DestinationPorts: []uint32{8080}}, mtls(), true},
		{"destination port other", Match{DestinationPorts: []uint32{8080}}, withPort(mtls(), 9090), false},
		{"destination ports are OR-ed", Match{DestinationPorts: []uint32{80, 8080}}, mtls(), true},
		{"port 0 matches nothing real", Match{DestinationPorts: []uint32{0}}, mtls(), false},
		{"highest port", Match{DestinationPorts: []uint32{65535}}, withPort(mtls(), 65535), true},
		{"not_destination_ports", Match{NotDestinationPorts: []uint32{8080}}, mtls(), false},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			p := setOf(allow(key, ScopeNamespace, one(c.match)))
			got := p.Evaluate(c.conn)
			if got.Allowed != c.want {
				t.Errorf("Evaluate(%v -> %v:%d) = %s, want allowed=%v", c.conn.SrcIP, c.conn.DstIP, c.conn.DstPort, got, c.want)
			}
		})
	}

	t.Run("deny everything but 10/8", func(t *testing.T) {
		p := setOf(deny(key, ScopeNamespace, one(Match{NotSourceIPs: cidrs("10.0.0.0/8")})))
		if d := p.Evaluate(withSrc(mtls(), "192.0.2.1")); d.Allowed {
			t.Errorf("192.0.2.1: %s, want denied", d)
		}
		if d := p.Evaluate(mtls()); !d.Allowed {
			t.Errorf("10.0.0.1: %s, want allowed", d)
		}
	})
}

// Policies that cannot be evaluated are enforced as their most restrictive
// reading: an ALLOW grants nothing, a DENY or unknown action takes all.
func TestEvaluateUnenforceable(t *testing.T) {
	const key = "default/p"
	sleep := []StringMatch{Exact(sleepP)}
	unset := []StringMatch{{Value: sleepP}}
	bad := func(m Match) Group { return one(m) }
	runCases(t, []evalCase{
		{
			name:     "allow with an unset string match grants nothing",
			policies: []Authorization{allow(key, ScopeNamespace, bad(Match{Principals: unset}))},
			conn:     mtls(),
			want:     notAllowed,
		},
		{
			name: "allow with an unset string match does not hide other allows",
			policies: []Authorization{
				allow(key, ScopeNamespace, bad(Match{Principals: unset})),
				allow("default/q", ScopeNamespace, one(Match{Principals: sleep})),
			},
			conn: mtls(),
			want: allowedBy("default/q"),
		},
		{
			name:     "deny with an unknown string match type takes all",
			policies: []Authorization{deny(key, ScopeNamespace, bad(Match{NotPrincipals: []StringMatch{{Kind: 9}}}))},
			conn:     withID(mtls(), notsleepID),
			want:     failClosed(key),
		},
		{
			name:     "deny with a five byte address takes all",
			policies: []Authorization{deny(key, ScopeNamespace, bad(Match{SourceIPs: []Address{{Address: make([]byte, 5), Length: 8}}}))},
			conn:     mtls(),
			want:     failClosed(key),
		},
		{
			name:     "deny with an empty address takes all",
			policies: []Authorization{deny(key, ScopeNamespace, bad(Match{DestinationIPs: []Address{{}}}))},
			conn:     mtls(),
			want:     failClosed(key),
		},
		{
			name:     "deny with a v4 /33 takes all",
			policies: []Authorization{deny(key, ScopeNamespace, bad(Match{NotSourceIPs: []Address{{Address: []byte{10, 0, 0, 0}, Length: 33}}}))},
			conn:     mtls(),
			want:     failClosed(key),
		},
		{
			name:     "deny with a v6 /129 takes all",
			policies: []Authorization{deny(key, ScopeNamespace, bad(Match{NotDestinationIPs: []Address{{Address: make([]byte, 16), Length: 129}}}))},
			conn:     mtls(),
			want:     failClosed(key),
		},
		{
			// ztunnel would truncate 70000 to 4464.
			name:     "deny with port above 65535 takes all",
			policies: []Authorization{deny(key, ScopeNamespace, bad(Match{DestinationPorts: []uint32{70000}}))},
			conn:     mtls(),
			want:     failClosed(key),
		},
		{
			// ztunnel would truncate 65616 to 80 and allow port 80.
			name:     "allow with port above 65535 is not truncated",
			policies: []Authorization{allow(key, ScopeNamespace, bad(Match{DestinationPorts: []uint32{65616}}))},
			conn:     withPort(mtls(), 80),
			want:     notAllowed,
		},
		{
			name:     "unknown action takes all",
			policies: []Authorization{pol(key, ScopeNamespace, Action(2))},
			conn:     mtls(),
			want:     failClosed(key),
		},
		{
			name:     "listed policy with unknown action takes all",
			policies: []Authorization{pol(key, ScopeWorkloadSelector, Action(-1), grp())},
			conn:     withRefs(mtls(), key),
			want:     failClosed(key),
		},
		{
			name: "unsupported allow grants nothing",
			policies: []Authorization{func() Authorization {
				a := allow(key, ScopeNamespace, grp())
				a.Unsupported = "unknown field 13 in istio.security.Match"
				return a
			}()},
			conn: mtls(),
			want: notAllowed,
		},
		{
			name: "unsupported deny takes all",
			policies: []Authorization{func() Authorization {
				a := deny(key, ScopeNamespace)
				a.Unsupported = "unknown field 13 in istio.security.Match"
				return a
			}()},
			conn: mtls(),
			want: failClosed(key),
		},
		{
			name:     "unenforceable deny stays in its scope",
			policies: []Authorization{deny("other/p", ScopeNamespace, bad(Match{DestinationPorts: []uint32{70000}}))},
			conn:     mtls(),
			want:     allowedNoPolicy,
		},
	})
}

func TestEvaluateInvalidConn(t *testing.T) {
	invalidID := Decision{Reason: ReasonInvalidIdentity}
	var cases []evalCase
	for _, id := range []string{
		sleepP,
		"SPIFFE://cluster.local/ns/default/sa/sleep",
		"spiffe://cluster.local/ns/default/sa/sleep/extra",
		"spiffe://cluster.local/ns/default/sa",
		"spiffe://cluster.local/ns/default",
		"spiffe://cluster.local/namespace/default/sa/sleep",
		"spiffe://cluster.local/ns/default/serviceaccount/sleep",
		"spiffe:///ns/default/sa/sleep",
		"spiffe://cluster.local/ns//sa/sleep",
		"spiffe://cluster.local/ns/default/sa/",
		"spiffe://",
	} {
		cases = append(cases, evalCase{name: "identity " + id, conn: withID(mtls(), id), want: invalidID})
	}
	cases = append(cases,
		evalCase{name: "other trust domain is valid", conn: withID(mtls(), "spiffe://td-alt/ns/x/sa/y"), want: allowedNoPolicy},
		evalCase{name: "no source address", conn: Conn{DstIP: netip.MustParseAddr("10.0.1.1")}, want: Decision{Reason: ReasonInvalidAddress}},
		evalCase{name: "no destination address", conn: Conn{SrcIP: netip.MustParseAddr("10.0.0.1")}, want: Decision{Reason: ReasonInvalidAddress}},
	)
	runCases(t, cases)
}

func TestDecisionString(t *testing.T) {
	for _, tc := range []struct {
		d    Decision
		want string
	}{
		{Decision{}, "no decision"},
		{deniedBy("ns/deny-all"), "denied by ns/deny-all"},
		{allowedBy("ns/allow-sleep"), "allowed by ns/allow-sleep"},
		{notAllowed, "no allow policy matched"},
		{allowedNoPolicy, "no allow policy applies"},
		{failClosed("ns/p"), "denied by unenforceable policy ns/p"},
		{Decision{Reason: ReasonUnknownPolicy, Policy: "ns/q"}, "denied by unknown policy ns/q"},
		{Decision{Reason: ReasonInvalidIdentity}, "invalid source identity"},
		{Decision{Reason: ReasonInvalidAddress}, "invalid address"},
		{Decision{Reason: Reason(200)}, "unknown reason"},
	} {
		if got := tc.d.String(); got != tc.want {
			t.Errorf("%+v.String() = %q, want %q", tc.d, got, tc.want)
		}
	}
}

// benchPolicies is a mesh-sized set: 100 policies, 73 of which apply to
// productpage in default (2 global, 51 namespace, 20 listed by it).
func benchPolicies() []Authorization {
	var ps []Authorization
	ps = append(ps,
		deny("istio-system/blocklist", ScopeGlobal, one(Match{SourceIPs: cidrs("192.0.2.0/24", "2001:db8::/32")})),
		deny("istio-system/strict", ScopeGlobal, grp(
			anyOf(Match{NotPrincipals: []StringMatch{Presence()}}),
			anyOf(Match{DestinationPorts: []uint32{15021}}))),
	)
	for i := range 25 {
		sa := fmt.Sprintf("cluster.local/ns/other/sa/client-%d", i)
		ps = append(ps,
			deny(fmt.Sprintf("default/deny-%d", i), ScopeNamespace, one(Match{
				Principals: []StringMatch{Exact(sa)}, NotDestinationPorts: []uint32{9000 + uint32(i)},
			})),
			allow(fmt.Sprintf("default/allow-%d", i), ScopeNamespace,
				one(Match{Namespaces: []StringMatch{Exact(fmt.Sprintf("team-%d", i))}}),
				grp(anyOf(Match{Principals: []StringMatch{Exact(sa), Suffix(fmt.Sprintf("/sa/extra-%d", i))}}),
					anyOf(Match{DestinationPorts: []uint32{8080, 9080}, SourceIPs: cidrs("10.0.0.0/8", "fd00::/8")}))),
		)
	}
	for i := range 10 {
		ps = append(ps,
			allow(fmt.Sprintf("default/selected-allow-%d", i), ScopeWorkloadSelector,
				one(Match{Principals: []StringMatch{Prefix(fmt.Sprintf("cluster.local/ns/team-%d/", i))}})),
			deny(fmt.Sprintf("default/selected-deny-%d", i), ScopeWorkloadSelector,
				one(Match{NotSourceIPs: cidrs("0.0.0.0/0", "::/0")})),
		)
	}
	for i := range 27 {
		ps = append(ps, deny(fmt.Sprintf("ns-%d/deny-all", i), ScopeNamespace, grp()))
	}
	// The one that lets sleep in, last in key order.
	ps = append(ps, allow("default/zz-allow-sleep", ScopeNamespace, one(Match{Principals: []StringMatch{Exact(sleepP)}})))
	return ps
}

func benchConns() map[string]Conn {
	var refs []string
	for i := range 10 {
		refs = append(refs, fmt.Sprintf("default/selected-allow-%d", i), fmt.Sprintf("default/selected-deny-%d", i))
	}
	return map[string]Conn{
		"allowed-by-last":  withRefs(mtls(), refs...),
		"no-allow-matched": withRefs(withID(mtls(), notsleepID), refs...),
		"denied-early":     withRefs(withSrc(mtls(), "192.0.2.7"), refs...),
		"plaintext-v6":     withRefs(withSrc(plaintext(), "fd00::9"), refs...),
	}
}

func TestEvaluateDoesNotAllocate(t *testing.T) {
	p := setOf(benchPolicies()...)
	if p.Len() != 100 {
		t.Fatalf("bench set has %d policies", p.Len())
	}
	conns := benchConns()
	conns["unknown-policy"] = withRefs(mtls(), "default/missing")
	conns["invalid-identity"] = withID(mtls(), "spiffe://x")
	for name, c := range conns {
		if n := testing.AllocsPerRun(100, func() { p.Evaluate(c) }); n != 0 {
			t.Errorf("%s: %v allocations per Evaluate", name, n)
		}
	}
	// Sanity: the set decides as intended, so the benchmark measures the
	// paths it names.
	for name, want := range map[string]Reason{
		"allowed-by-last": ReasonAllowed, "no-allow-matched": ReasonNotAllowed,
		"denied-early": ReasonDenied, "plaintext-v6": ReasonNotAllowed,
	} {
		if d := p.Evaluate(conns[name]); d.Reason != want {
			t.Errorf("%s: %s, want reason %v", name, d, want)
		}
	}
}

func BenchmarkEvaluate(b *testing.B) {
	p := setOf(benchPolicies()...)
	for name, c := range benchConns() {
		b.Run(name, func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				p.Evaluate(c)
			}
		})
	}
}
