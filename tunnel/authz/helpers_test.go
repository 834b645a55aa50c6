package authz

import (
	"net/netip"
	"strings"
	"testing"
)

const (
	sleepID    = "spiffe://cluster.local/ns/default/sa/sleep"
	sleepP     = "cluster.local/ns/default/sa/sleep"
	notsleepID = "spiffe://cluster.local/ns/other/sa/notsleep"
)

func pol(key string, scope Scope, action Action, groups ...Group) Authorization {
	ns, name, _ := strings.Cut(key, "/")
	return Authorization{Name: name, Namespace: ns, Scope: scope, Action: action, Groups: groups}
}

func allow(key string, scope Scope, groups ...Group) Authorization {
	return pol(key, scope, ActionAllow, groups...)
}

func deny(key string, scope Scope, groups ...Group) Authorization {
	return pol(key, scope, ActionDeny, groups...)
}

// grp is one AuthorizationPolicy rule: its clauses AND-ed.
func grp(rs ...Rules) Group { return Group{Rules: rs} }

// anyOf is one clause: its matches OR-ed.
func anyOf(ms ...Match) Rules { return Rules{Matches: ms} }

// one is a policy rule with a single clause holding a single match.
func one(m Match) Group { return grp(anyOf(m)) }

func cidrs(ss ...string) []Address {
	out := make([]Address, 0, len(ss))
	for _, s := range ss {
		out = append(out, AddressFromPrefix(netip.MustParsePrefix(s)))
	}
	return out
}

// conn is a connection to productpage (default namespace) on 10.0.1.1:8080.
func conn(id, src string) Conn {
	return Conn{
		SrcIdentity: id,
		SrcIP:       netip.MustParseAddr(src),
		DstIP:       netip.MustParseAddr("10.0.1.1"),
		DstPort:     8080,
		DstWorkload: Workload{Namespace: "default", Name: "productpage"},
	}
}

func mtls() Conn      { return conn(sleepID, "10.0.0.1") }
func plaintext() Conn { return conn("", "10.0.0.1") }

func withPort(c Conn, port uint16) Conn { c.DstPort = port; return c }
func withDst(c Conn, ip string) Conn    { c.DstIP = netip.MustParseAddr(ip); return c }
func withSrc(c Conn, ip string) Conn    { c.SrcIP = netip.MustParseAddr(ip); return c }
func withID(c Conn, id string) Conn     { c.SrcIdentity = id; return c }
func inNS(c Conn, ns string) Conn       { c.DstWorkload.Namespace = ns; return c }
func withRefs(c Conn, keys ...string) Conn {
	c.DstWorkload.Policies = keys
	return c
}

var (
	allowedNoPolicy = Decision{Allowed: true, Reason: ReasonNoAllowPolicy}
	notAllowed      = Decision{Reason: ReasonNotAllowed}
)

func allowedBy(key string) Decision {
	return Decision{Allowed: true, Reason: ReasonAllowed, Policy: key}
}
func deniedBy(key string) Decision { return Decision{Reason: ReasonDenied, Policy: key} }
func failClosed(key string) Decision {
	return Decision{Reason: ReasonUnenforceable, Policy: key}
}

type evalCase struct {
	name     string
	policies []Authorization
	conn     Conn
	want     Decision
}

// setOf compiles ps into a set; a later policy replaces an earlier one of
// the same key.
func setOf(ps ...Authorization) *Policies {
	byKey := make(map[string]*Policy, len(ps))
	for _, a := range ps {
		byKey[a.Key()] = Compile(a)
	}
	return NewPolicies(byKey)
}

func runCases(t *testing.T, cases []evalCase) {
	t.Helper()
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			if got := setOf(tc.policies...).Evaluate(tc.conn); got != tc.want {
				t.Errorf("Evaluate = %+v (%s), want %+v (%s)", got, got, tc.want, tc.want)
			}
		})
	}
}
