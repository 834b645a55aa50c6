package authz

import (
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"testing"
)

// decide evaluates c and clears the generation for comparisons.
func decide(p *Policies, c Conn) Decision {
	d := p.Evaluate(c)
	d.Generation = 0
	return d
}

func closed(ch <-chan struct{}) bool {
	select {
	case <-ch:
		return true
	default:
		return false
	}
}

func TestPoliciesZeroValue(t *testing.T) {
	var p Policies
	if d := decide(&p, mtls()); d != allowedNoPolicy {
		t.Errorf("Evaluate on zero set = %+v, want %+v", d, allowedNoPolicy)
	}
	if d := p.Evaluate(withRefs(mtls(), "default/x")); d.Allowed {
		t.Errorf("reference into zero set = %s, want denied", d)
	}
	if g := p.Generation(); g != 0 {
		t.Errorf("Generation = %d, want 0", g)
	}
	if p.Len() != 0 || p.Unenforceable() != 0 || len(p.All()) != 0 {
		t.Errorf("zero set not empty: Len %d, Unenforceable %d, All %v", p.Len(), p.Unenforceable(), p.All())
	}
	ch := p.Changed()
	if ch == nil || closed(ch) {
		t.Fatalf("Changed on zero set = %v, closed=%v", ch, closed(ch))
	}
	if err := p.Update([]Authorization{deny("default/deny-all", ScopeNamespace, grp())}, nil); err != nil {
		t.Fatal(err)
	}
	if !closed(ch) {
		t.Error("first Update did not close the Changed channel taken on the zero set")
	}
}

// The re-check flow a caller runs for live connections: remember the
// generation of the decision, re-evaluate when Changed fires.
func TestPoliciesRecheck(t *testing.T) {
	var p Policies
	all := grp()
	if err := p.Update([]Authorization{allow("default/allow-sleep", ScopeNamespace,
		one(Match{Principals: []StringMatch{Exact(sleepP)}}))}, nil); err != nil {
		t.Fatal(err)
	}
	changed := p.Changed()
	first := p.Evaluate(mtls())
	if !first.Allowed || first.Generation != p.Generation() {
		t.Fatalf("first decision %+v at generation %d", first, p.Generation())
	}

	if err := p.Update([]Authorization{deny("istio-system/lockdown", ScopeGlobal, all)}, nil); err != nil {
		t.Fatal(err)
	}
	if !closed(changed) {
		t.Fatal("Changed not closed after an update")
	}
	if p.Generation() == first.Generation {
		t.Fatal("Generation did not move after an update")
	}
	again := p.Evaluate(mtls())
	if again.Allowed || again.Policy != "istio-system/lockdown" {
		t.Errorf("re-check = %s, want denied by istio-system/lockdown", again)
	}

	next := p.Changed()
	if closed(next) {
		t.Fatal("new Changed channel already closed")
	}
	if err := p.Update(nil, []string{"istio-system/lockdown"}); err != nil {
		t.Fatal(err)
	}
	if !closed(next) {
		t.Error("Changed not closed after a removal")
	}
	if d := p.Evaluate(mtls()); !d.Allowed {
		t.Errorf("after removal = %s, want allowed", d)
	}
}

func TestPoliciesNoOpUpdates(t *testing.T) {
	mk := func() []Authorization {
		return []Authorization{
			allow("default/a", ScopeNamespace, one(Match{SourceIPs: cidrs("10.0.0.0/8"), DestinationPorts: []uint32{80}})),
			deny("istio-system/b", ScopeGlobal, grp()),
		}
	}
	var p Policies
	if err := p.Replace(mk()); err != nil {
		t.Fatal(err)
	}
	gen, ch := p.Generation(), p.Changed()
	for name, op := range map[string]func() error{
		"same upsert":     func() error { return p.Update(mk(), nil) },
		"missing removal": func() error { return p.Update(nil, []string{"default/none"}) },
		"same replace":    func() error { return p.Replace(mk()) },
		"empty update":    func() error { return p.Update(nil, nil) },
	} {
		if err := op(); err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		if p.Generation() != gen || closed(ch) {
			t.Errorf("%s changed the generation (%d -> %d) or closed Changed", name, gen, p.Generation())
		}
	}

	changed := mk()
	changed[0].Groups[0].Rules[0].Matches[0].DestinationPorts[0] = 81
	if err := p.Replace(changed); err != nil {
		t.Fatal(err)
	}
	if p.Generation() == gen || !closed(ch) {
		t.Error("a changed port did not move the generation")
	}
}

func TestPoliciesReplace(t *testing.T) {
	var p Policies
	if err := p.Update([]Authorization{
		deny("default/a", ScopeNamespace, grp()),
		deny("default/b", ScopeWorkloadSelector, grp()),
	}, nil); err != nil {
		t.Fatal(err)
	}
	if err := p.Replace([]Authorization{allow("default/c", ScopeNamespace, grp())}); err != nil {
		t.Fatal(err)
	}
	if p.Len() != 1 {
		t.Errorf("Len after Replace = %d, want 1", p.Len())
	}
	if d := decide(&p, mtls()); d != allowedBy("default/c") {
		t.Errorf("after Replace: %s, want allowed by default/c", d)
	}
	if d := p.Evaluate(withRefs(mtls(), "default/b")); d.Reason != ReasonUnknownPolicy {
		t.Errorf("reference to replaced-away policy: %s, want unknown policy", d)
	}
}

func TestPoliciesUnenforceableReported(t *testing.T) {
	var p Policies
	good := allow("default/good", ScopeNamespace, grp())
	badPort := deny("default/bad-port", ScopeNamespace, one(Match{DestinationPorts: []uint32{1 << 20}}))
	badAction := pol("default/bad-action", ScopeWorkloadSelector, Action(5))
	err := p.Update([]Authorization{good, badPort, badAction}, nil)
	if !errors.Is(err, ErrUnenforceable) {
		t.Fatalf("Update error = %v, want ErrUnenforceable", err)
	}
	var keys []string
	for _, e := range err.(interface{ Unwrap() []error }).Unwrap() {
		var pe *PolicyError
		if !errors.As(e, &pe) {
			t.Fatalf("error %v is not a *PolicyError", e)
		}
		keys = append(keys, pe.Key)
		if !strings.Contains(e.Error(), pe.Key) || !strings.Contains(e.Error(), "fail-closed") {
			t.Errorf("error text %q does not name the policy and the outcome", e)
		}
	}
	slices.Sort(keys)
	if want := []string{"default/bad-action", "default/bad-port"}; !slices.Equal(keys, want) {
		t.Errorf("reported %v, want %v", keys, want)
	}
	if p.Len() != 3 || p.Unenforceable() != 2 {
		t.Errorf("Len %d Unenforceable %d, want 3 and 2", p.Len(), p.Unenforceable())
	}
	if d := decide(&p, mtls()); d != failClosed("default/bad-port") {
		t.Errorf("Evaluate = %s, want denied by unenforceable policy default/bad-port", d)
	}
	if _, ok := p.Get("default/bad-action"); !ok {
		t.Error("unenforceable policy not stored")
	}
	if err := p.Update(nil, []string{"default/bad-port", "default/bad-action"}); err != nil {
		t.Fatal(err)
	}
	if p.Unenforceable() != 0 {
		t.Errorf("Unenforceable after removal = %d", p.Unenforceable())
	}
}

func TestPoliciesCopies(t *testing.T) {
	in := allow("default/a", ScopeNamespace, one(Match{
		Principals: []StringMatch{Exact(sleepP)},
		SourceIPs:  cidrs("10.0.0.0/8"),
	}))
	var p Policies
	if err := p.Update([]Authorization{in}, nil); err != nil {
		t.Fatal(err)
	}
	// The caller reuses its buffers after the update.
	in.Groups[0].Rules[0].Matches[0].Principals[0] = Exact("someone/else")
	in.Groups[0].Rules[0].Matches[0].SourceIPs[0].Address[0] = 192
	if d := p.Evaluate(mtls()); !d.Allowed {
		t.Errorf("mutating the input changed evaluation: %s", d)
	}

	got, ok := p.Get("default/a")
	if !ok {
		t.Fatal("Get: not found")
	}
	if got.Groups[0].Rules[0].Matches[0].SourceIPs[0].Address[0] != 10 {
		t.Errorf("Get returned the caller's mutation: %+v", got)
	}
	got.Groups[0].Rules[0].Matches[0].Principals[0] = Exact("someone/else")
	if again, _ := p.Get("default/a"); again.Groups[0].Rules[0].Matches[0].Principals[0] != Exact(sleepP) {
		t.Error("mutating Get's result changed the stored policy")
	}
	if _, ok := p.Get("default/none"); ok {
		t.Error("Get of a missing key succeeded")
	}
}

func TestPoliciesListing(t *testing.T) {
	p := mustPolicies(t,
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

// Readers see either the old or the new set, never a mix, while a writer
// flips a namespace between two policies. Run with -race.
func TestPoliciesConcurrentUpdate(t *testing.T) {
	var p Policies
	allowAll := allow("default/flip", ScopeNamespace, grp())
	denyAll := deny("default/flip", ScopeNamespace, grp())
	if err := p.Update([]Authorization{allowAll}, nil); err != nil {
		t.Fatal(err)
	}
	const updates = 200
	var wg sync.WaitGroup
	errs := make(chan error, 4)
	stop := make(chan struct{})
	for range 4 {
		wg.Go(func() {
			for {
				select {
				case <-stop:
					return
				default:
				}
				d := p.Evaluate(mtls())
				if d != (Decision{Allowed: true, Reason: ReasonAllowed, Policy: "default/flip", Generation: d.Generation}) &&
					d != (Decision{Reason: ReasonDenied, Policy: "default/flip", Generation: d.Generation}) {
					errs <- fmt.Errorf("torn decision %+v", d)
					return
				}
			}
		})
	}
	woken := make(chan struct{})
	ch := p.Changed()
	go func() {
		defer close(woken)
		<-ch
	}()
	for i := range updates {
		next := allowAll
		if i%2 == 0 {
			next = denyAll
		}
		if err := p.Update([]Authorization{next}, nil); err != nil {
			t.Error(err)
		}
	}
	close(stop)
	wg.Wait()
	<-woken
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if g := p.Generation(); g != updates+1 {
		t.Errorf("Generation = %d, want %d", g, updates+1)
	}
}
