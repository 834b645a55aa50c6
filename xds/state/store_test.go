package state_test

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"sync"
	"testing"
	"time"

	"github.com/amber-mesh/amber/tunnel/authz"
	"github.com/amber-mesh/amber/xds/state"
	"github.com/amber-mesh/amber/xds/workloadapi/security"
)

func mustWorkload(t testing.TB, uid, ns string, protocol state.Protocol, addrs ...string) *state.Workload {
	t.Helper()
	w := &state.Workload{UID: uid, Name: uid, Namespace: ns, Protocol: protocol, TrustDomain: "cluster.local", ServiceAccount: "default"}
	for _, a := range addrs {
		w.Addresses = append(w.Addresses, netip.MustParseAddr(a))
	}
	return w
}

func mustPolicy(t testing.TB, a *security.Authorization) *authz.Policy {
	t.Helper()
	p, err := state.NewAuthorization(a)
	if err != nil {
		t.Fatal(err)
	}
	return p
}

func TestSnapshotLookups(t *testing.T) {
	var st state.Store // zero value is usable
	if st.Load().Workload("x") != nil || st.Load().Generation() != 0 {
		t.Fatal("zero store is not empty")
	}
	svcKey := state.NamespacedHostname{Namespace: "default", Hostname: "pp.default.svc.cluster.local"}
	pod := mustWorkload(t, "Kubernetes//Pod/default/pp", "default", state.ProtocolHBONE, "10.0.0.3", "fd00::3")
	pod.Services = map[state.NamespacedHostname]map[uint16]uint16{svcKey: {9080: 8080}}
	pod.AuthorizationPolicies = []string{"default/selected", "default/not-yet-here"}
	entry := mustWorkload(t, "Kubernetes/networking.istio.io/WorkloadEntry/default/vm", "default", state.ProtocolHBONE, "10.0.0.3")
	hostNet := mustWorkload(t, "hostnet", "default", state.ProtocolTCP, "10.0.0.4")
	hostNet.HostNetwork = true
	svc := &state.Service{
		Name: "pp", Namespace: "default", Hostname: svcKey.Hostname,
		VIPs:  []state.NetworkPrefix{{Prefix: netip.MustParsePrefix("10.96.0.10/32")}},
		Ports: map[uint16]state.Port{9080: {ServicePort: 9080, TargetPort: 9080}},
	}
	rangeSvc := &state.Service{
		Name: "range", Namespace: "default", Hostname: "range.example",
		VIPs:  []state.NetworkPrefix{{Prefix: netip.MustParsePrefix("192.168.0.0/16")}},
		Ports: map[uint16]state.Port{443: {ServicePort: 443}},
	}
	policies := []*security.Authorization{
		{Name: "mesh", Namespace: "istio-system", Scope: security.Scope_GLOBAL},
		{Name: "ns", Namespace: "default", Scope: security.Scope_NAMESPACE},
		{Name: "other-ns", Namespace: "other", Scope: security.Scope_NAMESPACE},
		{Name: "selected", Namespace: "default", Scope: security.Scope_WORKLOAD_SELECTOR},
		{Name: "unselected", Namespace: "default", Scope: security.Scope_WORKLOAD_SELECTOR},
	}

	changed := st.Update(func(tx *state.Txn) {
		tx.PutWorkload(pod)
		tx.PutWorkload(entry)
		tx.PutWorkload(hostNet)
		tx.PutService(svc)
		tx.PutService(rangeSvc)
		for _, p := range policies {
			tx.PutAuthorization(mustPolicy(t, p))
		}
	})
	if changed != state.ChangedWorkloads|state.ChangedServices|state.ChangedAuthorizations {
		t.Errorf("changed = %b", changed)
	}
	snap := st.Load()
	if snap.Generation() != 1 {
		t.Errorf("generation = %d", snap.Generation())
	}
	if got := snap.WorkloadByAddr(state.NetworkAddr{Addr: netip.MustParseAddr("10.0.0.3")}); got != pod {
		t.Errorf("10.0.0.3 resolves to %v, want the pod (pods outrank workload entries)", got)
	}
	if got := snap.WorkloadByAddr(state.NetworkAddr{Addr: netip.MustParseAddr("::ffff:10.0.0.3")}); got != pod {
		t.Errorf("mapped 10.0.0.3 resolves to %v", got)
	}
	if got := snap.WorkloadByAddr(state.NetworkAddr{Addr: netip.MustParseAddr("fd00::3")}); got != pod {
		t.Errorf("fd00::3 resolves to %v", got)
	}
	if got := snap.WorkloadByAddr(state.NetworkAddr{Network: "other", Addr: netip.MustParseAddr("10.0.0.3")}); got != nil {
		t.Errorf("other network resolves to %v", got)
	}
	if got := snap.WorkloadByAddr(state.NetworkAddr{Addr: netip.MustParseAddr("10.0.0.4")}); got != nil {
		t.Errorf("host-network workload found by address: %v", got)
	}
	if snap.Workload(hostNet.UID) != hostNet {
		t.Error("host-network workload not found by UID")
	}
	if got := snap.ServiceByVIP(state.NetworkAddr{Addr: netip.MustParseAddr("10.96.0.10")}, 9080); got != svc {
		t.Errorf("VIP:9080 = %v", got)
	}
	if got := snap.ServiceByVIP(state.NetworkAddr{Addr: netip.MustParseAddr("10.96.0.10")}, 80); got != nil {
		t.Errorf("VIP:80 = %v, want nil (no such port)", got)
	}
	if got := snap.ServiceByVIP(state.NetworkAddr{Addr: netip.MustParseAddr("192.168.3.4")}, 443); got != rangeSvc {
		t.Errorf("range VIP = %v", got)
	}
	eps := snap.Endpoints(svcKey)
	if len(eps) != 1 || eps[0].Workload != pod || eps[0].TargetPort(svc, 9080) != 8080 {
		t.Errorf("endpoints = %+v", eps)
	}

	applicable := snap.Policies().Applicable(authz.Workload{Namespace: pod.Namespace, Policies: pod.AuthorizationPolicies})
	if fmt.Sprint(applicable) != "[default/ns istio-system/mesh default/selected default/not-yet-here]" {
		t.Errorf("policies for pod = %v", applicable)
	}
	if snap.Policies().Get("default/selected") == nil || snap.Policies().Get("default/not-yet-here") != nil {
		t.Error("selected policy missing, or the missing one present")
	}

	// Removal by Address resource name covers workloads and services.
	st.Update(func(tx *state.Txn) {
		if !tx.RemoveAddress(pod.UID) || !tx.RemoveAddress(svcKey.String()) || tx.RemoveAddress("nothing") {
			t.Error("RemoveAddress results wrong")
		}
	})
	snap2 := st.Load()
	if snap2.Workload(pod.UID) != nil || snap2.Service(svcKey) != nil || len(snap2.Endpoints(svcKey)) != 0 {
		t.Error("removed resources still present")
	}
	if got := snap2.WorkloadByAddr(state.NetworkAddr{Addr: netip.MustParseAddr("10.0.0.3")}); got != entry {
		t.Errorf("after pod removal 10.0.0.3 = %v, want the workload entry", got)
	}
	// The old snapshot is untouched.
	if snap.Workload(pod.UID) != pod || snap.Service(svcKey) != svc {
		t.Error("old snapshot changed")
	}
	// An update that changes nothing publishes nothing.
	if c := st.Update(func(tx *state.Txn) { tx.RemoveWorkload("nothing") }); c != 0 || st.Load() != snap2 {
		t.Error("empty update published a snapshot")
	}
}

// TestConcurrentReaders has one writer replace a whole generation of
// workloads per update while readers check every snapshot they see is
// all of one generation: a torn update would mix two.
func TestConcurrentReaders(t *testing.T) {
	const workloads, updates = 50, 200
	st := state.NewStore()
	whileReading(t, st, func(snap *state.Snapshot) error {
		ws := snap.Workloads()
		if len(ws) == 0 {
			return nil
		}
		if len(ws) != workloads {
			return fmt.Errorf("generation %d has %d workloads", snap.Generation(), len(ws))
		}
		for _, w := range ws {
			if w.Node != ws[0].Node {
				return fmt.Errorf("snapshot mixes %s and %s", w.Node, ws[0].Node)
			}
			if got := snap.WorkloadByAddr(state.NetworkAddr{Addr: w.Addresses[0]}); got != w {
				return fmt.Errorf("index of generation %d points elsewhere", snap.Generation())
			}
		}
		return nil
	}, func() {
		for gen := range updates {
			st.Update(func(tx *state.Txn) {
				for i := range workloads {
					w := mustWorkload(t, fmt.Sprintf("w%d", i), "default", state.ProtocolHBONE, fmt.Sprintf("10.1.%d.%d", i/250, i%250+1))
					w.Node = fmt.Sprintf("gen-%d", gen)
					tx.PutWorkload(w)
				}
			})
		}
	})
	if g := st.Load().Generation(); g != updates {
		t.Errorf("generation = %d, want %d", g, updates)
	}
}

// whileReading runs write while four readers check every snapshot they
// load, and reports what the checks found. Run with -race.
func whileReading(t *testing.T, st *state.Store, check func(*state.Snapshot) error, write func()) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var wg sync.WaitGroup
	errs := make(chan error, 4)
	for range 4 {
		wg.Go(func() {
			for ctx.Err() == nil {
				if err := check(st.Load()); err != nil {
					errs <- err
					return
				}
			}
		})
	}
	write()
	cancel()
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
}

func TestSubscription(t *testing.T) {
	st := state.NewStore()
	sub := st.Subscribe()
	defer sub.Close()

	st.Update(func(tx *state.Txn) { tx.PutWorkload(mustWorkload(t, "a", "default", state.ProtocolHBONE, "10.0.0.1")) })
	st.Update(func(tx *state.Txn) {
		tx.PutAuthorization(mustPolicy(t, &security.Authorization{Name: "p", Namespace: "default"}))
	})

	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	snap, changed, err := sub.Wait(ctx)
	if err != nil {
		t.Fatal(err)
	}
	// Two updates, one wake-up, both kinds reported, latest state.
	if changed != state.ChangedWorkloads|state.ChangedAuthorizations {
		t.Errorf("changed = %b", changed)
	}
	if snap.Workload("a") == nil || snap.Policies().Get("default/p") == nil {
		t.Error("snapshot misses an update")
	}
	select {
	case <-sub.C():
		if _, c := sub.Take(); c != 0 {
			t.Errorf("stale wake-up carried changes %b", c)
		}
	default:
	}

	sub.Close()
	st.Update(func(tx *state.Txn) { tx.RemoveWorkload("a") })
	select {
	case <-sub.C():
		t.Error("closed subscription notified")
	default:
	}
	short, cancel2 := context.WithTimeout(context.Background(), 10*time.Millisecond)
	defer cancel2()
	if _, _, err := sub.Wait(short); err == nil {
		t.Error("Wait returned without a change")
	}
}

func TestRejectedAuthorizations(t *testing.T) {
	st := state.NewStore()
	good := mustPolicy(t, &security.Authorization{Name: "p", Namespace: "default", Action: security.Action_DENY})
	st.Update(func(tx *state.Txn) {
		tx.PutAuthorization(good)
		tx.RejectAuthorization(state.RejectedAuthorization("default/new", nil, "invalid"))
	})
	if got := fmt.Sprint(st.Load().RejectedAuthorizations()); got != "[{default/new invalid}]" {
		t.Errorf("rejected = %s", got)
	}
	// A rejected update is listed, and its stand-in is enforced in place
	// of the old version: that one may allow what the update denies.
	st.Update(func(tx *state.Txn) {
		tx.RejectAuthorization(state.RejectedAuthorization("default/p", &security.Authorization{Name: "p", Namespace: "default", Action: 7}, "bad action"))
	})
	snap := st.Load()
	if p := snap.Policies().Get("default/p"); p == nil || p == good || !errors.Is(p.Err(), authz.ErrRejected) || len(snap.RejectedAuthorizations()) != 2 {
		t.Errorf("after rejected update: %v %v", p, snap.RejectedAuthorizations())
	}
	if snap.Policies().Rejected() != 2 {
		t.Errorf("%d stand-ins enforced, want 2", snap.Policies().Rejected())
	}
	// A good version or a removal clears the rejection.
	changed := st.Update(func(tx *state.Txn) {
		tx.PutAuthorization(mustPolicy(t, &security.Authorization{Name: "new", Namespace: "default"}))
		tx.RemoveAuthorization("default/p")
	})
	snap = st.Load()
	if changed != state.ChangedAuthorizations || len(snap.RejectedAuthorizations()) != 0 || snap.Policies().Get("default/p") != nil {
		t.Errorf("after fix: changed %b, rejected %v", changed, snap.RejectedAuthorizations())
	}
}

// The policies a connection is authorized against are its snapshot's: a
// policy update is a new snapshot with the new decisions, announced as
// ChangedAuthorizations, while a reader of the old snapshot keeps the old
// ones.
func TestPoliciesFollowSnapshots(t *testing.T) {
	st := state.NewStore()
	sub := st.Subscribe()
	defer sub.Close()
	pp := mustWorkload(t, "pp", "default", state.ProtocolHBONE, "10.0.0.2")
	conn := func(id string, w *state.Workload) authz.Conn {
		return authz.Conn{
			SrcIdentity: id, SrcIP: netip.MustParseAddr("10.0.0.1"), DstIP: netip.MustParseAddr("10.0.0.2"), DstPort: 9080,
			DstWorkload: authz.Workload{Namespace: w.Namespace, Name: w.Name, Policies: w.AuthorizationPolicies},
		}
	}
	const sleep, notsleep = "spiffe://cluster.local/ns/default/sa/sleep", "spiffe://cluster.local/ns/default/sa/notsleep"
	if d := st.Load().Policies().Evaluate(conn(notsleep, pp)); !d.Allowed {
		t.Fatalf("empty store: %s, want allowed", d)
	}

	st.Update(func(tx *state.Txn) {
		tx.PutWorkload(pp)
		tx.PutAuthorization(mustPolicy(t, &security.Authorization{
			Name: "allow-sleep", Namespace: "default", Scope: security.Scope_NAMESPACE, Action: security.Action_ALLOW,
			Groups: []*security.Group{{Rules: []*security.Rules{{Matches: []*security.Match{{
				Principals: []*security.StringMatch{{MatchType: &security.StringMatch_Exact{Exact: "cluster.local/ns/default/sa/sleep"}}},
			}}}}}},
		}))
	})
	if _, changed := sub.Take(); changed&state.ChangedAuthorizations == 0 {
		t.Errorf("changed = %b, want authorizations", changed)
	}
	before := st.Load()
	for id, want := range map[string]bool{sleep: true, notsleep: false, "": false} {
		if d := before.Policies().Evaluate(conn(id, pp)); d.Allowed != want {
			t.Errorf("%q: %s, want allowed=%v", id, d, want)
		}
	}

	// The workload names a policy the snapshot lacks: denied, and once the
	// policy arrives, decided by it.
	listed := *pp
	listed.AuthorizationPolicies = []string{"default/lockdown"}
	st.Update(func(tx *state.Txn) { tx.PutWorkload(&listed) })
	if d := st.Load().Policies().Evaluate(conn(sleep, &listed)); d.Reason != authz.ReasonUnknownPolicy {
		t.Errorf("listed policy not yet known: %s, want unknown policy", d)
	}
	st.Update(func(tx *state.Txn) {
		tx.PutAuthorization(mustPolicy(t, &security.Authorization{
			Name: "lockdown", Namespace: "default", Scope: security.Scope_WORKLOAD_SELECTOR, Action: security.Action_DENY,
			Groups: []*security.Group{{}},
		}))
	})
	if d := st.Load().Policies().Evaluate(conn(sleep, &listed)); d.Reason != authz.ReasonDenied || d.Policy != "default/lockdown" {
		t.Errorf("after the policy arrived: %s, want denied by default/lockdown", d)
	}
	if d := before.Policies().Evaluate(conn(sleep, pp)); !d.Allowed {
		t.Errorf("an older snapshot's decision changed: %s", d)
	}

	// Removals that find nothing publish nothing.
	cur := st.Load()
	if c := st.Update(func(tx *state.Txn) { tx.RemoveAuthorization("default/none") }); c != 0 || st.Load() != cur {
		t.Error("removing a missing policy published a snapshot")
	}
	st.Update(func(tx *state.Txn) { tx.RemoveAuthorization("default/lockdown") })
	if d := st.Load().Policies().Evaluate(conn(sleep, &listed)); d.Reason != authz.ReasonUnknownPolicy {
		t.Errorf("after removal: %s, want unknown policy", d)
	}
}

// Readers see either the old or the new policy, never a mix, while the
// writer flips a namespace between two. Run with -race.
func TestConcurrentPolicyReaders(t *testing.T) {
	const updates = 200
	st := state.NewStore()
	flip := func(action security.Action) *authz.Policy {
		return mustPolicy(t, &security.Authorization{
			Name: "flip", Namespace: "default", Scope: security.Scope_NAMESPACE, Action: action, Groups: []*security.Group{{}},
		})
	}
	allowAll, denyAll := flip(security.Action_ALLOW), flip(security.Action_DENY)
	st.Update(func(tx *state.Txn) { tx.PutAuthorization(allowAll) })
	conn := authz.Conn{
		SrcIdentity: "spiffe://cluster.local/ns/default/sa/sleep", SrcIP: netip.MustParseAddr("10.0.0.1"),
		DstIP: netip.MustParseAddr("10.0.0.2"), DstPort: 9080, DstWorkload: authz.Workload{Namespace: "default"},
	}
	whileReading(t, st, func(snap *state.Snapshot) error {
		d := snap.Policies().Evaluate(conn)
		if d != (authz.Decision{Allowed: true, Reason: authz.ReasonAllowed, Policy: "default/flip"}) &&
			d != (authz.Decision{Reason: authz.ReasonDenied, Policy: "default/flip"}) {
			return fmt.Errorf("torn decision %+v", d)
		}
		return nil
	}, func() {
		for i := range updates {
			next := allowAll
			if i%2 == 0 {
				next = denyAll
			}
			st.Update(func(tx *state.Txn) { tx.PutAuthorization(next) })
		}
	})
	if g := st.Load().Generation(); g != updates+1 {
		t.Errorf("generation = %d, want %d", g, updates+1)
	}
}
