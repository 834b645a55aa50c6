package state_test

import (
	"context"
	"fmt"
	"net/netip"
	"sync"
	"testing"
	"time"

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
			tx.PutAuthorization(p)
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

	got, missing := snap.PoliciesFor(pod)
	var names []string
	for _, p := range got {
		names = append(names, p.GetNamespace()+"/"+p.GetName())
	}
	if fmt.Sprint(names) != "[istio-system/mesh default/ns default/selected]" {
		t.Errorf("policies for pod = %v", names)
	}
	if fmt.Sprint(missing) != "[default/not-yet-here]" {
		t.Errorf("missing = %v", missing)
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
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var wg sync.WaitGroup
	errs := make(chan error, 4)
	for range 4 {
		wg.Go(func() {
			for ctx.Err() == nil {
				snap := st.Load()
				ws := snap.Workloads()
				if len(ws) == 0 {
					continue
				}
				if len(ws) != workloads {
					errs <- fmt.Errorf("generation %d has %d workloads", snap.Generation(), len(ws))
					return
				}
				for _, w := range ws {
					if w.Node != ws[0].Node {
						errs <- fmt.Errorf("snapshot mixes %s and %s", w.Node, ws[0].Node)
						return
					}
					if got := snap.WorkloadByAddr(state.NetworkAddr{Addr: w.Addresses[0]}); got != w {
						errs <- fmt.Errorf("index of generation %d points elsewhere", snap.Generation())
						return
					}
				}
			}
		})
	}
	for gen := range updates {
		st.Update(func(tx *state.Txn) {
			for i := range workloads {
				w := mustWorkload(t, fmt.Sprintf("w%d", i), "default", state.ProtocolHBONE, fmt.Sprintf("10.1.%d.%d", i/250, i%250+1))
				w.Node = fmt.Sprintf("gen-%d", gen)
				tx.PutWorkload(w)
			}
		})
	}
	cancel()
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if g := st.Load().Generation(); g != updates {
		t.Errorf("generation = %d, want %d", g, updates)
	}
}

func TestSubscription(t *testing.T) {
	st := state.NewStore()
	sub := st.Subscribe()
	defer sub.Close()

	st.Update(func(tx *state.Txn) { tx.PutWorkload(mustWorkload(t, "a", "default", state.ProtocolHBONE, "10.0.0.1")) })
	st.Update(func(tx *state.Txn) { tx.PutAuthorization(&security.Authorization{Name: "p", Namespace: "default"}) })

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
	if snap.Workload("a") == nil || snap.Authorization("default", "p") == nil {
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
	good := &security.Authorization{Name: "p", Namespace: "default", Action: security.Action_DENY}
	st.Update(func(tx *state.Txn) {
		tx.PutAuthorization(good)
		tx.RejectAuthorization("default/new", "invalid")
	})
	if got := fmt.Sprint(st.Load().RejectedAuthorizations()); got != "[{default/new invalid}]" {
		t.Errorf("rejected = %s", got)
	}
	// A rejected update keeps the old version and is listed.
	st.Update(func(tx *state.Txn) { tx.RejectAuthorization("default/p", "bad action") })
	snap := st.Load()
	if snap.Authorization("default", "p") != good || len(snap.RejectedAuthorizations()) != 2 {
		t.Errorf("after rejected update: %v %v", snap.Authorization("default", "p"), snap.RejectedAuthorizations())
	}
	// A good version or a removal clears the rejection.
	changed := st.Update(func(tx *state.Txn) {
		tx.PutAuthorization(&security.Authorization{Name: "new", Namespace: "default"})
		tx.RemoveAuthorization("default/p")
	})
	snap = st.Load()
	if changed != state.ChangedAuthorizations || len(snap.RejectedAuthorizations()) != 0 || snap.Authorization("default", "p") != nil {
		t.Errorf("after fix: changed %b, rejected %v", changed, snap.RejectedAuthorizations())
	}
}
