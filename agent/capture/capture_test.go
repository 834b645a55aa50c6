package capture

import (
	"context"
	"log/slog"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"testing"
	"testing/synctest"
	"time"

	dto "github.com/prometheus/client_model/go"

	"github.com/amber-mesh/amber/agent/enrol"
	"github.com/amber-mesh/amber/internal/testutil"
)

type bed struct {
	t    *testing.T
	c    *Controller
	dp   *fakeDatapath
	host *fakeHost
	rep  *fakeReporter
}

func newBed(t *testing.T, capacity int) *bed {
	return newBedOn(t, capacity, newFakeDatapath(capacity), newFakeHost())
}

// newBedOn runs a controller on an existing datapath and host, as an
// agent restarted on the same node does.
func newBedOn(t *testing.T, capacity int, dp *fakeDatapath, host *fakeHost) *bed {
	t.Helper()
	rep := &fakeReporter{}
	c, err := New(Config{Datapath: dp, Host: host, Reporter: rep, Capacity: capacity, Resync: time.Hour, Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	wg.Add(1)
	go func() { defer wg.Done(); c.Run(ctx) }()
	t.Cleanup(func() { cancel(); wg.Wait() })
	testutil.Eventually(t, "controller running", func() bool {
		c.mu.Lock()
		defer c.mu.Unlock()
		return c.running
	})
	return &bed{t: t, c: c, dp: dp, host: host, rep: rep}
}

var ambient = map[string]string{enrol.DataplaneModeLabel: enrol.DataplaneModeAmbient}

func addr(s string) netip.Addr { return netip.MustParseAddr(s) }

func pod(uid, ns string, labels map[string]string, ips ...string) *enrol.Pod {
	p := &enrol.Pod{UID: uid, Namespace: ns, Name: "pod-" + uid, Labels: labels, Phase: enrol.PhaseRunning, Created: time.Now()}
	for _, ip := range ips {
		p.IPs = append(p.IPs, addr(ip))
	}
	return p
}

func (b *bed) ns(name string, labels map[string]string) {
	b.c.UpsertNamespace(&enrol.Namespace{Name: name, Labels: labels})
}

// sync waits until the controller has worked through everything queued.
func (b *bed) sync() {
	b.t.Helper()
	b.c.queue.add(resyncKey)
	testutil.Eventually(b.t, "queue drained", func() bool {
		b.c.queue.mu.Lock()
		defer b.c.queue.mu.Unlock()
		return len(b.c.queue.order) == 0
	})
	// The worker may still be inside the last item: take the lock once.
	b.c.mu.Lock()
	b.c.mu.Unlock()
}

func (b *bed) captured(a string, veth int) bool {
	i, marked := b.dp.owner(addr(a))
	return i == veth && marked
}

func TestLabelChangesBothWays(t *testing.T) {
	b := newBed(t, 16)
	b.host.addPod("/ns/a", Veth{11, "veth11"}, addr("10.0.0.1"))
	b.ns("app", nil)
	p := pod("a", "app", nil, "10.0.0.1")
	b.c.UpsertPod(p)
	b.c.MarkSynced()
	b.sync()
	if b.captured("10.0.0.1", 11) {
		t.Fatal("captured without any label")
	}
	if !b.dp.attached[11] {
		t.Fatal("pod program not attached to an unenrolled pod's veth (inbound capture needs every veth)")
	}

	b.ns("app", ambient)
	testutil.Eventually(t, "captured after namespace label", func() bool { return b.captured("10.0.0.1", 11) })
	testutil.Eventually(t, "annotated", func() bool { return b.rep.annotated("a") })

	// The annotation shows up on the pod.
	p2 := *p
	p2.Annotations = map[string]string{enrol.RedirectionAnnotation: enrol.RedirectionEnabled}
	b.c.UpsertPod(&p2)

	b.ns("app", nil)
	testutil.Eventually(t, "released after namespace label removed", func() bool { i, _ := b.dp.owner(addr("10.0.0.1")); return i == 0 })
	testutil.Eventually(t, "annotation removed", func() bool { return !b.rep.annotated("a") })

	// Pod-level opt in, in an unlabelled namespace.
	p3 := *p
	p3.Labels = ambient
	b.c.UpsertPod(&p3)
	testutil.Eventually(t, "captured by pod label", func() bool { return b.captured("10.0.0.1", 11) })

	// Namespace enrolled but pod opts out.
	b.ns("app", ambient)
	p4 := *p
	p4.Labels = map[string]string{enrol.DataplaneModeLabel: enrol.DataplaneModeNone}
	b.c.UpsertPod(&p4)
	testutil.Eventually(t, "released by opt-out", func() bool { i, _ := b.dp.owner(addr("10.0.0.1")); return i == 0 })
	if got := b.rep.eventList(); len(got) != 0 {
		t.Errorf("warning events on a healthy pod: %v", got)
	}
}

func TestHostNetworkNeverCaptured(t *testing.T) {
	b := newBed(t, 16)
	b.host.addPod("/ns/a", Veth{11, "veth11"}, addr("10.0.0.1"))
	b.ns("app", ambient)
	p := pod("a", "app", ambient, "10.0.0.1")
	p.HostNetwork = true
	b.c.UpsertPod(p)
	b.c.MarkSynced()
	b.sync()
	if i, _ := b.dp.owner(addr("10.0.0.1")); i != 0 {
		t.Fatal("hostNetwork pod captured")
	}
	if len(b.rep.eventList()) != 0 || b.host.quarantined(addr("10.0.0.1")) {
		t.Fatal("hostNetwork pod treated as a failure")
	}
}

func TestDeletedPodReleased(t *testing.T) {
	b := newBed(t, 16)
	b.host.addPod("/ns/a", Veth{11, "veth11"}, addr("10.0.0.1"), addr("fd00::1"))
	b.ns("app", ambient)
	b.c.UpsertPod(pod("a", "app", nil, "10.0.0.1", "fd00::1"))
	b.c.MarkSynced()
	testutil.Eventually(t, "captured", func() bool { return b.captured("10.0.0.1", 11) && b.captured("fd00::1", 11) })
	b.c.DeletePod("a")
	testutil.Eventually(t, "released", func() bool {
		i4, _ := b.dp.owner(addr("10.0.0.1"))
		i6, _ := b.dp.owner(addr("fd00::1"))
		return i4 == 0 && i6 == 0 && !b.dp.ifaces[11]
	})
	if len(b.c.Pods()) != 0 {
		t.Errorf("state kept for a deleted pod: %+v", b.c.Pods())
	}
}

// A new pod gets the old pod's address before the old pod's DEL arrives:
// the old pod's release must not take the new pod's capture with it.
func TestIPReuseCNIOrder(t *testing.T) {
	b := newBed(t, 16)
	ctx := context.Background()
	b.ns("app", ambient)
	b.c.MarkSynced()
	x := addr("10.0.0.7")

	b.host.addPod("/ns/old", Veth{11, "vethold"}, x)
	old := pod("old", "app", nil, "10.0.0.7")
	if _, err := b.c.AddSandbox(ctx, old, nil, Sandbox{ContainerID: "c-old", NetNS: "/ns/old", IfName: "eth0", Addrs: []netip.Addr{x}}); err != nil {
		t.Fatal(err)
	}
	if !b.captured("10.0.0.7", 11) {
		t.Fatal("old pod not captured")
	}

	// The old sandbox dies without a DEL reaching the agent yet; IPAM
	// hands its address to a new pod.
	b.host.delPod("/ns/old")
	b.host.addPod("/ns/new", Veth{12, "vethnew"}, x)
	nw := pod("new", "app", nil, "10.0.0.7")
	nw.Created = old.Created.Add(time.Second)
	res, err := b.c.AddSandbox(ctx, nw, nil, Sandbox{ContainerID: "c-new", NetNS: "/ns/new", IfName: "eth0", Addrs: []netip.Addr{x}})
	if err != nil || !res.Captured {
		t.Fatalf("new pod: %+v %v", res, err)
	}
	if !b.captured("10.0.0.7", 12) {
		t.Fatal("address not moved to the new pod's veth")
	}

	// The old pod's API object still says Running with the address.
	b.c.UpsertPod(old)
	b.sync()
	if !b.captured("10.0.0.7", 12) {
		t.Fatal("stale view of the old pod took the address back")
	}
	if err := b.c.DelSandbox(ctx, "old", "c-old"); err != nil {
		t.Fatal(err)
	}
	b.c.DeletePod("old")
	b.sync()
	if !b.captured("10.0.0.7", 12) {
		t.Fatal("releasing the old pod released the new pod")
	}
	for _, s := range b.c.Pods() {
		if s.UID == "old" {
			t.Fatalf("old pod still tracked: %+v", s)
		}
		if s.UID == "new" && (s.Veth.Index != 12 || !slices.Equal(s.Addrs, []netip.Addr{x})) {
			t.Fatalf("new pod state %+v", s)
		}
	}
}

// After a restart only routes are known: two pods claim one address; the
// veth the address is routed through goes to the newer pod only.
func TestIPReuseFromRoutes(t *testing.T) {
	b := newBed(t, 16)
	b.ns("app", ambient)
	b.host.addPod("/ns/new", Veth{12, "vethnew"}, addr("10.0.0.7"))
	old := pod("old", "app", nil, "10.0.0.7")
	nw := pod("new", "app", nil, "10.0.0.7")
	nw.Created = old.Created.Add(time.Second)
	b.c.UpsertPod(old)
	b.c.UpsertPod(nw)
	b.c.MarkSynced()
	b.sync()
	if !b.captured("10.0.0.7", 12) {
		t.Fatal("new pod not captured")
	}
	for _, s := range b.c.Pods() {
		if s.UID == "old" && len(s.Addrs) != 0 {
			t.Fatalf("old pod holds the address: %+v", s)
		}
	}
	b.c.DeletePod("old")
	b.sync()
	if !b.captured("10.0.0.7", 12) {
		t.Fatal("deleting the old pod released the new one")
	}
	if len(b.rep.eventList()) != 0 {
		t.Errorf("events: %v", b.rep.eventList())
	}
}

// A completed pod keeps its last IP in its status; that IP may already
// be another pod's.
func TestTerminalPodNotCaptured(t *testing.T) {
	b := newBed(t, 16)
	b.ns("app", ambient)
	b.ns("plain", nil)
	b.host.addPod("/ns/b", Veth{12, "vethb"}, addr("10.0.0.7"))
	done := pod("done", "app", nil, "10.0.0.7")
	done.Phase = enrol.PhaseSucceeded
	b.c.UpsertPod(done)
	b.c.UpsertPod(pod("b", "plain", nil, "10.0.0.7"))
	b.c.MarkSynced()
	b.sync()
	if i, _ := b.dp.owner(addr("10.0.0.7")); i != 0 {
		t.Fatal("a terminal pod's address was captured")
	}
}

// State left in the kernel by an earlier agent is pruned only when no
// pod can still own it.
func TestPruneOnlyFromCompleteView(t *testing.T) {
	dp := newFakeDatapath(16)
	host := newFakeHost()
	// Earlier agent: pod a (veth 11) captured; veth 99 gone; veth 13
	// alive but unknown; veth 14 belongs to a pod that left the mesh.
	host.addPod("/ns/a", Veth{11, "vetha"}, addr("10.0.0.1"))
	host.addPod("/ns/c", Veth{14, "vethc"}, addr("10.0.0.4"))
	host.alive[13] = Veth{13, "vethunknown"}
	for i, a := range map[int]string{11: "10.0.0.1", 99: "10.0.0.9", 13: "10.0.0.3", 14: "10.0.0.4"} {
		dp.Capture(i, []netip.Addr{addr(a)})
	}
	b := newBedOn(t, 16, dp, host)
	b.ns("app", ambient)
	b.ns("plain", nil)
	// Pod a is in the API but its status has no IPs yet.
	b.c.UpsertPod(pod("a", "app", nil))
	b.sync()
	// Not synced yet: nothing may be pruned, not even dead entries.
	if !b.captured("10.0.0.9", 99) || !b.captured("10.0.0.1", 11) {
		t.Fatal("pruned before the view was complete")
	}
	b.c.UpsertPod(pod("c", "plain", nil, "10.0.0.4"))
	b.c.MarkSynced()
	b.sync()
	if !b.captured("10.0.0.1", 11) {
		t.Fatal("pod without IPs in its status lost its capture")
	}
	if !b.captured("10.0.0.3", 13) {
		t.Fatal("a live veth nobody accounts for was released (must fail closed)")
	}
	if i, _ := b.dp.owner(addr("10.0.0.9")); i != 0 {
		t.Fatal("entry of a vanished veth kept")
	}
	if i, _ := b.dp.owner(addr("10.0.0.4")); i != 0 || b.dp.ifaces[14] {
		t.Fatal("capture of a pod outside the mesh kept")
	}
	if !b.c.Ready() {
		t.Fatal("not ready after a complete reconciliation")
	}
	b.c.UpsertPod(pod("a", "app", nil, "10.0.0.1"))
	b.sync()
	if !b.captured("10.0.0.1", 11) {
		t.Fatal("pod a not captured")
	}
}

// A restarted controller rewrites membership in place: no release, so no
// moment without capture.
func TestRestartNeverReleases(t *testing.T) {
	dp := newFakeDatapath(16)
	host := newFakeHost()
	var pods []*enrol.Pod
	for i := 1; i <= 5; i++ {
		a := netip.AddrFrom4([4]byte{10, 0, 0, byte(i)})
		host.addPod("/ns/"+a.String(), Veth{10 + i, "veth" + a.String()}, a)
		pods = append(pods, pod(a.String(), "app", nil, a.String()))
	}
	for round := 0; round < 2; round++ {
		b := newBedOn(t, 16, dp, host)
		b.ns("app", ambient)
		for _, p := range pods {
			b.c.UpsertPod(p)
		}
		b.c.MarkSynced()
		b.sync()
		for i, p := range pods {
			if !b.captured(p.IPs[0].String(), 11+i) {
				t.Fatalf("round %d: %s not captured", round, p.UID)
			}
		}
	}
	for _, op := range dp.ops {
		if strings.HasPrefix(op, "release") {
			t.Fatalf("restart released something: %v", dp.ops)
		}
	}
}

// In a synctest bubble: the retries' backoff runs in fake time.
func TestMapFullQuarantines(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		b := newBed(t, 2)
		b.ns("app", ambient)
		for i, ip := range []string{"10.0.0.1", "10.0.0.2", "10.0.0.3"} {
			b.host.addPod("/ns/"+ip, Veth{11 + i, "veth" + ip}, addr(ip))
			b.c.UpsertPod(pod(ip, "app", nil, ip))
		}
		b.c.MarkSynced()
		b.sync()
		var full string
		for _, ip := range []string{"10.0.0.1", "10.0.0.2", "10.0.0.3"} {
			if i, _ := b.dp.owner(addr(ip)); i == 0 {
				full = ip
			}
		}
		if full == "" {
			t.Fatal("three pods captured with capacity 2")
		}
		if !b.host.quarantined(addr(full)) {
			t.Fatal("pod over capacity not quarantined")
		}
		if ev := b.rep.eventList(); len(ev) != 1 || !strings.HasSuffix(ev[0], " "+ReasonMapFull) {
			t.Fatalf("events %v, want one %s", ev, ReasonMapFull)
		}
		if b.rep.annotated(full) {
			t.Fatal("pod over capacity annotated")
		}
		// Retries do not repeat the event. In fake time, the first three
		// backoff periods pass; how many failures came before depends on
		// how the initial syncs interleaved, so at least one retry runs.
		attempts := func() uint64 { // syncs of any pod: only full's is queued
			var m dto.Metric
			if err := b.c.metrics.syncLatency.Write(&m); err != nil {
				t.Fatal(err)
			}
			return m.GetHistogram().GetSampleCount()
		}
		before := attempts()
		time.Sleep(backoff(1) + backoff(2) + backoff(3))
		synctest.Wait()
		if n := attempts() - before; n == 0 {
			t.Fatal("no retry in three backoff periods")
		}
		if ev := b.rep.eventList(); len(ev) != 1 {
			t.Fatalf("event repeated: %v", ev)
		}
		// Room frees up: the pod is captured by a retry, then released from
		// quarantine.
		var other string
		for _, ip := range []string{"10.0.0.1", "10.0.0.2", "10.0.0.3"} {
			if ip != full {
				other = ip
				break
			}
		}
		b.c.DeletePod(other)
		testutil.Eventually(t, "captured after room freed", func() bool {
			i, _ := b.dp.owner(addr(full))
			return i != 0 && !b.host.quarantined(addr(full))
		})
		testutil.Eventually(t, "annotated after capture", func() bool { return b.rep.annotated(full) })
	})
}

func TestVethNotFoundQuarantines(t *testing.T) {
	b := newBed(t, 16)
	b.ns("app", ambient)
	b.c.UpsertPod(pod("a", "app", nil, "10.0.0.1"))
	b.c.MarkSynced()
	b.sync()
	if !b.host.quarantined(addr("10.0.0.1")) {
		t.Fatal("enrolled pod without a veth not quarantined")
	}
	if ev := b.rep.eventList(); len(ev) != 1 || !strings.HasSuffix(ev[0], " "+ReasonVethNotFound) {
		t.Fatalf("events %v", ev)
	}
	b.host.addPod("/ns/a", Veth{11, "veth11"}, addr("10.0.0.1"))
	testutil.Eventually(t, "captured once the veth shows up", func() bool {
		return b.captured("10.0.0.1", 11) && !b.host.quarantined(addr("10.0.0.1"))
	})
}

func TestAddSandbox(t *testing.T) {
	b := newBed(t, 16)
	ctx := context.Background()
	b.c.MarkSynced()
	b.host.addPod("/ns/a", Veth{11, "veth11"}, addr("10.0.0.1"))
	b.host.addPod("/ns/b", Veth{12, "veth12"}, addr("10.0.0.2"))

	plain := &enrol.Namespace{Name: "plain"}
	res, err := b.c.AddSandbox(ctx, pod("a", "plain", nil), plain, Sandbox{ContainerID: "ca", NetNS: "/ns/a", IfName: "eth0", Addrs: []netip.Addr{addr("10.0.0.1")}})
	if err != nil || res.Captured || res.Reason != enrol.NotLabelled {
		t.Fatalf("outside the mesh: %+v %v", res, err)
	}
	if !b.dp.attached[11] {
		t.Fatal("veth of a pod outside the mesh not attached")
	}

	mesh := &enrol.Namespace{Name: "mesh", Labels: ambient}
	res, err = b.c.AddSandbox(ctx, pod("b", "mesh", nil), mesh, Sandbox{ContainerID: "cb", NetNS: "/ns/b", IfName: "eth0", Addrs: []netip.Addr{addr("10.0.0.2")}})
	if err != nil || !res.Captured || res.Veth.Index != 12 {
		t.Fatalf("enrolled: %+v %v", res, err)
	}
	if !b.captured("10.0.0.2", 12) {
		t.Fatal("not captured when AddSandbox returned")
	}

	_, err = b.c.AddSandbox(ctx, pod("c", "mesh", nil), mesh, Sandbox{ContainerID: "cc", NetNS: "/ns/missing", IfName: "eth0", Addrs: []netip.Addr{addr("10.0.0.3")}})
	if err == nil {
		t.Fatal("enrolled pod without a veth: ADD succeeded")
	}

	// DEL releases and does not quarantine the going pod.
	if err := b.c.DelSandbox(ctx, "b", "cb"); err != nil {
		t.Fatal(err)
	}
	b.sync()
	if i, _ := b.dp.owner(addr("10.0.0.2")); i != 0 || b.dp.ifaces[12] || b.dp.attached[12] {
		t.Fatal("DEL left capture behind")
	}
	if b.host.quarantined(addr("10.0.0.2")) {
		t.Fatal("DEL quarantined the pod's address")
	}
	// DEL of an unknown sandbox is fine.
	if err := b.c.DelSandbox(ctx, "", "nope"); err != nil {
		t.Fatal(err)
	}
}

// A pod captured from routes only (its ADD predates this process) is torn
// down: its entries go with its veth, without a warning or a quarantine
// that would hit the next pod to get the address.
func TestRouteBoundTeardown(t *testing.T) {
	b := newBed(t, 16)
	b.ns("app", ambient)
	b.host.addPod("/ns/a", Veth{11, "veth11"}, addr("10.0.0.1"))
	p := pod("a", "app", nil, "10.0.0.1")
	b.c.UpsertPod(p)
	b.c.MarkSynced()
	testutil.Eventually(t, "captured", func() bool { return b.captured("10.0.0.1", 11) })

	deleting := *p
	deleting.Deleting = true
	b.c.UpsertPod(&deleting)
	if err := b.c.DelSandbox(context.Background(), "a", "unknown-container"); err != nil {
		t.Fatal(err)
	}
	b.host.delPod("/ns/a")
	b.c.UpsertPod(&deleting) // the kubelet's status update
	b.sync()
	if i, _ := b.dp.owner(addr("10.0.0.1")); i != 0 {
		t.Fatal("entries of a vanished veth kept")
	}
	if b.host.quarantined(addr("10.0.0.1")) || len(b.rep.eventList()) != 0 {
		t.Fatalf("teardown treated as a failure: quarantined=%v events=%v", b.host.quarantined(addr("10.0.0.1")), b.rep.eventList())
	}
}

// A full reconciliation puts back membership someone removed.
func TestDriftRepaired(t *testing.T) {
	b := newBed(t, 16)
	b.ns("app", ambient)
	b.host.addPod("/ns/a", Veth{11, "veth11"}, addr("10.0.0.1"))
	b.c.UpsertPod(pod("a", "app", nil, "10.0.0.1"))
	b.c.MarkSynced()
	testutil.Eventually(t, "captured", func() bool { return b.captured("10.0.0.1", 11) })
	b.dp.Release(11, []netip.Addr{addr("10.0.0.1")})
	b.sync()
	if !b.captured("10.0.0.1", 11) {
		t.Fatal("removed membership not restored by reconciliation")
	}
}

// A refused ADD (over capacity) quarantines the sandbox's addresses in
// case it runs anyway; the runtime's DEL lifts it, so IPAM can hand the
// addresses to the next pod.
func TestRefusedAddQuarantineLiftedByDel(t *testing.T) {
	b := newBed(t, 1)
	ctx := context.Background()
	b.c.MarkSynced()
	mesh := &enrol.Namespace{Name: "mesh", Labels: ambient}
	b.host.addPod("/ns/a", Veth{11, "veth11"}, addr("10.0.0.1"))
	b.host.addPod("/ns/b", Veth{12, "veth12"}, addr("10.0.0.2"))
	if _, err := b.c.AddSandbox(ctx, pod("a", "mesh", nil), mesh, Sandbox{ContainerID: "ca", NetNS: "/ns/a", Addrs: []netip.Addr{addr("10.0.0.1")}}); err != nil {
		t.Fatal(err)
	}
	_, err := b.c.AddSandbox(ctx, pod("b", "mesh", nil), mesh, Sandbox{ContainerID: "cb", NetNS: "/ns/b", Addrs: []netip.Addr{addr("10.0.0.2")}})
	if err == nil || !strings.Contains(err.Error(), "full") {
		t.Fatalf("ADD over capacity: %v", err)
	}
	if !b.host.quarantined(addr("10.0.0.2")) {
		t.Fatal("refused sandbox not quarantined")
	}
	if err := b.c.DelSandbox(ctx, "b", "cb"); err != nil {
		t.Fatal(err)
	}
	b.sync()
	if b.host.quarantined(addr("10.0.0.2")) {
		t.Fatal("quarantine kept after DEL")
	}
	if i, _ := b.dp.owner(addr("10.0.0.2")); i != 0 || b.dp.ifaces[12] {
		t.Fatal("refused sandbox left entries")
	}
}

// desired only computes: the pods a claim takes a veth from are evicted by
// sync, which applies the answer.
func TestDesiredChangesNothing(t *testing.T) {
	host := newFakeHost()
	v := Veth{12, "vethnew"}
	host.addPod("/ns/new", v, addr("10.0.0.7"))
	c, err := New(Config{Datapath: newFakeDatapath(16), Host: host, Capacity: 16, Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	c.namespaces["app"] = &enrol.Namespace{Name: "app", Labels: ambient}
	old, nw := c.state("old"), c.state("new")
	old.pod = pod("old", "app", nil, "10.0.0.7")
	nw.pod = pod("new", "app", nil, "10.0.0.7")
	nw.pod.Created = old.pod.Created.Add(time.Second)
	c.own(old, v, []netip.Addr{addr("10.0.0.7")})
	before := c.Pods()

	w := c.desired(nw)
	if w.vethErr != nil || w.veth != v || len(w.evict) != 1 || w.evict[0] != old {
		t.Fatalf("desired: veth %v, error %v, evict %v", w.veth, w.vethErr, w.evict)
	}
	if after := c.Pods(); !slices.EqualFunc(before, after, func(a, b Snapshot) bool {
		return a.UID == b.UID && a.Veth == b.Veth && slices.Equal(a.Addrs, b.Addrs)
	}) || c.vethOwner[v.Index] != "old" || c.addrOwner[addr("10.0.0.7")] != "old" || len(c.queue.order) != 0 {
		t.Fatalf("desired changed the controller: %+v -> %+v, owners %v %v, queue %v", before, after, c.vethOwner, c.addrOwner, c.queue.order)
	}

	if err := c.sync("new"); err != nil {
		t.Fatal(err)
	}
	if c.vethOwner[v.Index] != "new" || c.addrOwner[addr("10.0.0.7")] != "new" || len(old.addrs) != 0 || !slices.Contains(c.queue.order, "old") {
		t.Errorf("sync did not move the capture: owners %v %v, old %v, queue %v", c.vethOwner, c.addrOwner, old.addrs, c.queue.order)
	}
}
