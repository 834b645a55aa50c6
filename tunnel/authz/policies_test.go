package authz

import (
	"errors"
	"slices"
	"strings"
	"testing"
)

func TestPoliciesZeroValue(t *testing.T) {
	var p Policies
	if d := p.Evaluate(mtls()); d != allowedNoPolicy {
		t.Errorf("Evaluate on zero set = %+v, want %+v", d, allowedNoPolicy)
	}
	if d := p.Evaluate(withRefs(mtls(), "default/x")); d.Allowed {
		t.Errorf("reference into zero set = %s, want denied", d)
	}
	if p.Len() != 0 || p.Unenforceable() != 0 || len(p.All()) != 0 || p.Get("default/x") != nil {
		t.Errorf("zero set not empty: Len %d, Unenforceable %d, All %v", p.Len(), p.Unenforceable(), p.All())
	}
}

func TestPoliciesUnenforceableReported(t *testing.T) {
	good := allow("default/good", ScopeNamespace, grp())
	badPort := deny("default/bad-port", ScopeNamespace, one(Match{DestinationPorts: []uint32{1 << 20}}))
	badAction := pol("default/bad-action", ScopeWorkloadSelector, Action(5))
	if err := Compile(good).Err(); err != nil {
		t.Errorf("good policy: %v", err)
	}
	var keys []string
	for _, a := range []Authorization{badPort, badAction} {
		err := Compile(a).Err()
		if !errors.Is(err, ErrUnenforceable) {
			t.Fatalf("%s: Err = %v, want ErrUnenforceable", a.Key(), err)
		}
		var pe *PolicyError
		if !errors.As(err, &pe) {
			t.Fatalf("error %v is not a *PolicyError", err)
		}
		keys = append(keys, pe.Key)
		if !strings.Contains(err.Error(), pe.Key) || !strings.Contains(err.Error(), "fail-closed") {
			t.Errorf("error text %q does not name the policy and the outcome", err)
		}
	}
	if want := []string{"default/bad-port", "default/bad-action"}; !slices.Equal(keys, want) {
		t.Errorf("reported %v, want %v", keys, want)
	}
	p := setOf(good, badPort, badAction)
	if p.Len() != 3 || p.Unenforceable() != 2 {
		t.Errorf("Len %d Unenforceable %d, want 3 and 2", p.Len(), p.Unenforceable())
	}
	if d := p.Evaluate(mtls()); d != failClosed("default/bad-port") {
		t.Errorf("Evaluate = %s, want denied by unenforceable policy default/bad-port", d)
	}
	if p.Get("default/bad-action") == nil {
		t.Error("unenforceable policy not stored")
	}
	if p := setOf(good); p.Unenforceable() != 0 {
		t.Errorf("Unenforceable without the bad policies = %d", p.Unenforceable())
	}
}

func TestPoliciesCopies(t *testing.T) {
	in := allow("default/a", ScopeNamespace, one(Match{
		Principals: []StringMatch{Exact(sleepP)},
		SourceIPs:  cidrs("10.0.0.0/8"),
	}))
	p := setOf(in)
	// The caller reuses its buffers after compiling.
	in.Groups[0].Rules[0].Matches[0].Principals[0] = Exact("someone/else")
	in.Groups[0].Rules[0].Matches[0].SourceIPs[0].Address[0] = 192
	if d := p.Evaluate(mtls()); !d.Allowed {
		t.Errorf("mutating the input changed evaluation: %s", d)
	}

	got := p.Get("default/a").Authorization()
	if got.Groups[0].Rules[0].Matches[0].SourceIPs[0].Address[0] != 10 {
		t.Errorf("Get returned the caller's mutation: %+v", got)
	}
	got.Groups[0].Rules[0].Matches[0].Principals[0] = Exact("someone/else")
	if again := p.Get("default/a").Authorization(); again.Groups[0].Rules[0].Matches[0].Principals[0] != Exact(sleepP) {
		t.Error("mutating Authorization's result changed the stored policy")
	}
	if p.Get("default/none") != nil {
		t.Error("Get of a missing key succeeded")
	}
}

func TestPoliciesListing(t *testing.T) {
	p := setOf(
		allow("default/z-allow", ScopeNamespace, grp()),
		deny("default/a-deny", ScopeNamespace, grp()),
		deny("istio-system/global", ScopeGlobal, grp()),
		allow("default/selected", ScopeWorkloadSelector, grp()),
		allow("other/ns", ScopeNamespace, grp()),
	)
	var keys []string
	for _, a := range p.All() {
		keys = append(keys, a.Key())
	}
	want := []string{"default/a-deny", "default/selected", "default/z-allow", "istio-system/global", "other/ns"}
	if !slices.Equal(keys, want) {
		t.Errorf("All keys = %v, want %v", keys, want)
	}
	got := p.Applicable(Workload{Namespace: "default", Policies: []string{"default/selected", "default/gone"}})
	want = []string{"default/a-deny", "default/z-allow", "istio-system/global", "default/selected", "default/gone"}
	if !slices.Equal(got, want) {
		t.Errorf("Applicable = %v, want %v", got, want)
	}
}

// A rejected policy is enforced through its stand-in, fail-closed, for the
// workloads it would apply to: as an ALLOW it matches nothing, otherwise it
// denies everything; an unreadable scope means its namespace.
func TestPoliciesRejected(t *testing.T) {
	bySleep := one(Match{Principals: []StringMatch{Exact(sleepP)}})
	for _, tc := range []struct {
		name  string
		set   []*Policy
		conn  Conn
		want  Decision
		other Decision // the same connection to a workload in namespace "other"
	}{
		{
			name:  "namespace deny",
			set:   []*Policy{Rejected("default/deny", ScopeNamespace, ActionDeny, "bad address")},
			conn:  mtls(),
			want:  Decision{Reason: ReasonRejected, Policy: "default/deny"},
			other: allowedNoPolicy,
		},
		{
			name:  "namespace allow matches nothing",
			set:   []*Policy{Rejected("default/allow", ScopeNamespace, ActionAllow, "bad address")},
			conn:  mtls(),
			want:  notAllowed,
			other: allowedNoPolicy,
		},
		{
			name: "rejected allow beside a good one",
			set: []*Policy{
				Rejected("default/allow", ScopeNamespace, ActionAllow, "bad address"),
				Compile(allow("default/allow-sleep", ScopeNamespace, bySleep)),
			},
			conn:  mtls(),
			want:  allowedBy("default/allow-sleep"),
			other: allowedNoPolicy,
		},
		{
			name:  "global deny",
			set:   []*Policy{Rejected("istio-system/deny", ScopeGlobal, ActionDeny, "bad address")},
			conn:  mtls(),
			want:  Decision{Reason: ReasonRejected, Policy: "istio-system/deny"},
			other: Decision{Reason: ReasonRejected, Policy: "istio-system/deny"},
		},
		{
			name:  "unreadable: its namespace, denying",
			set:   []*Policy{Rejected("default/garbage", ScopeUnknown, ActionUnknown, "decode")},
			conn:  mtls(),
			want:  Decision{Reason: ReasonRejected, Policy: "default/garbage"},
			other: allowedNoPolicy,
		},
		{
			name:  "workload selector: only where listed",
			set:   []*Policy{Rejected("default/sel", ScopeWorkloadSelector, ActionDeny, "bad address")},
			conn:  withRefs(mtls(), "default/sel"),
			want:  Decision{Reason: ReasonRejected, Policy: "default/sel"},
			other: allowedNoPolicy,
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			byKey := make(map[string]*Policy)
			for _, p := range tc.set {
				byKey[p.Key()] = p
			}
			set := NewPolicies(byKey)
			if got := set.Evaluate(tc.conn); got != tc.want {
				t.Errorf("Evaluate = %s, want %s", got, tc.want)
			}
			other := tc.conn
			other.DstWorkload = Workload{Namespace: "other", Name: "x"}
			if got := set.Evaluate(other); got != tc.other {
				t.Errorf("Evaluate in namespace other = %s, want %s", got, tc.other)
			}
			if set.Rejected() != 1 || set.Unenforceable() != 0 {
				t.Errorf("Rejected %d, Unenforceable %d; want 1 and 0", set.Rejected(), set.Unenforceable())
			}
		})
	}
	err := Rejected("default/x", ScopeUnknown, ActionUnknown, "decode: bad wire type").Err()
	var pe *PolicyError
	if !errors.Is(err, ErrRejected) || errors.Is(err, ErrUnenforceable) || !errors.As(err, &pe) ||
		pe.Key != "default/x" || pe.Reason != "decode: bad wire type" {
		t.Errorf("Err = %v (%+v), want a rejected *PolicyError for default/x", err, pe)
	}
	if d := (Decision{Reason: ReasonRejected, Policy: "default/x"}).String(); d != "denied by rejected policy default/x" {
		t.Errorf("decision text %q", d)
	}
}
