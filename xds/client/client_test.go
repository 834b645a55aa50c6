package client_test

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/backoff"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/test/bufconn"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"

	"github.com/amber-mesh/amber/internal/testutil"
	"github.com/amber-mesh/amber/tunnel/authz"
	"github.com/amber-mesh/amber/xds/client"
	"github.com/amber-mesh/amber/xds/server"
	"github.com/amber-mesh/amber/xds/state"
	"github.com/amber-mesh/amber/xds/workloadapi"
	"github.com/amber-mesh/amber/xds/workloadapi/security"
)

const waitTimeout = 10 * time.Second

var testNode = client.Node{IP: netip.MustParseAddr("10.0.0.5"), PodName: "ztunnel-abc", PodNamespace: "istio-system"}

func mustServer(t *testing.T, mesh string) *server.Server {
	t.Helper()
	srv, err := server.New(server.Config{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { srv.Close() })
	if mesh != "" {
		r, err := server.ParseMesh([]byte(mesh))
		if err != nil {
			t.Fatal(err)
		}
		if err := srv.Replace(r); err != nil {
			t.Fatal(err)
		}
	}
	return srv
}

// serve runs srv on lis until the test ends.
func serve(t *testing.T, srv *server.Server, lis net.Listener) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- srv.Serve(ctx, lis) }()
	t.Cleanup(func() {
		cancel()
		<-done
	})
}

// bufDialer serves srv on an in-memory listener and returns a Dial func.
func bufDialer(t *testing.T, srv *server.Server) func(context.Context) (*grpc.ClientConn, error) {
	t.Helper()
	lis := bufconn.Listen(1 << 20)
	serve(t, srv, lis)
	return func(ctx context.Context) (*grpc.ClientConn, error) {
		return grpc.NewClient("passthrough:///bufnet",
			grpc.WithContextDialer(func(ctx context.Context, _ string) (net.Conn, error) { return lis.DialContext(ctx) }),
			grpc.WithTransportCredentials(insecure.NewCredentials()))
	}
}

// startClient runs a client until the test ends and checks that Close
// stops it.
func startClient(t *testing.T, cfg client.Config) *client.Client {
	t.Helper()
	cfg.Node = testNode
	cfg.InitialBackoff = 10 * time.Millisecond
	cfg.MaxBackoff = 50 * time.Millisecond
	c, err := client.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- c.Run(context.Background()) }()
	t.Cleanup(func() {
		if err := c.Close(); err != nil {
			t.Errorf("close: %v", err)
		}
		if err := <-done; !errors.Is(err, client.ErrClosed) {
			t.Errorf("Run returned %v after Close, want ErrClosed", err)
		}
	})
	return c
}

func waitSynced(t *testing.T, c *client.Client) {
	t.Helper()
	select {
	case <-c.Synced():
	case <-time.After(waitTimeout):
		t.Fatalf("client never synced; stats %+v", c.Stats())
	}
}

func clientStatus(srv *server.Server) (server.ClientStatus, bool) {
	cs := srv.Clients()
	if len(cs) != 1 {
		return server.ClientStatus{}, false
	}
	return cs[0], true
}

// acked reports whether the client has ACKed the server's latest push of
// every type.
func acked(srv *server.Server) bool {
	cs, ok := clientStatus(srv)
	if !ok || len(cs.Types) != 2 {
		return false
	}
	for _, ts := range cs.Types {
		if ts.SentNonce == "" || ts.AckedNonce != ts.SentNonce {
			return false
		}
	}
	return true
}

func addr(s string) state.NetworkAddr { return state.NetworkAddr{Addr: netip.MustParseAddr(s)} }

const meshV1 = `
services:
  - name: productpage
    addresses: [10.96.0.10]
    ports: [{port: 9080}]
workloads:
  - {name: sleep, serviceAccount: sleep, addresses: [10.0.0.1], node: node-a, labels: {app: sleep}}
  - {name: productpage, addresses: [10.0.0.3], node: node-a, labels: {app: productpage}, services: [{service: productpage}]}
  - {name: legacy, addresses: [10.0.0.4], protocol: TCP}
policies:
  - name: viewer
    selector: {matchLabels: {app: productpage}}
    rules: [{from: [{source: {principals: [cluster.local/ns/default/sa/sleep]}}]}]
`

// meshV2 moves sleep, drops legacy and widens the policy.
const meshV2 = `
services:
  - name: productpage
    addresses: [10.96.0.10]
    ports: [{port: 9080}]
workloads:
  - {name: sleep, serviceAccount: sleep, addresses: [10.0.0.11], node: node-a, labels: {app: sleep}}
  - {name: productpage, addresses: [10.0.0.3], node: node-a, labels: {app: productpage}, services: [{service: productpage}]}
policies:
  - name: viewer
    selector: {matchLabels: {app: productpage}}
    rules: [{from: [{source: {namespaces: [default]}}]}]
`

func TestSyncUpdateRemove(t *testing.T) {
	srv := mustServer(t, meshV1)
	st := state.NewStore()
	sub := st.Subscribe()
	defer sub.Close()
	c := startClient(t, client.Config{Dial: bufDialer(t, srv), Store: st})
	waitSynced(t, c)

	snap := c.Store().Load()
	sleep := snap.WorkloadByAddr(addr("10.0.0.1"))
	if sleep == nil || sleep.UID != "Kubernetes//Pod/default/sleep" || sleep.ServiceAccount != "sleep" || sleep.Protocol != state.ProtocolHBONE {
		t.Fatalf("sleep = %+v", sleep)
	}
	pp := snap.WorkloadByAddr(addr("10.0.0.3"))
	svc := snap.ServiceByVIP(addr("10.96.0.10"), 9080)
	if pp == nil || svc == nil || len(snap.Endpoints(svc.Key())) != 1 {
		t.Fatalf("productpage %v, service %v", pp, svc)
	}
	if legacy := snap.WorkloadByAddr(addr("10.0.0.4")); legacy == nil || legacy.Protocol != state.ProtocolTCP {
		t.Fatalf("legacy = %+v", legacy)
	}
	if got := snap.Policies().Applicable(authz.Workload{Namespace: pp.Namespace, Policies: pp.AuthorizationPolicies}); len(got) != 1 || got[0] != "default/viewer" || snap.Policies().Get(got[0]) == nil {
		t.Fatalf("policies for productpage = %v", got)
	}

	testutil.Eventually(t, "ACK of the initial pushes", func() bool { return acked(srv) })
	cs, _ := clientStatus(srv)
	if cs.NodeID != "ztunnel~10.0.0.5~ztunnel-abc.istio-system~istio-system.svc.cluster.local" {
		t.Errorf("node id = %q", cs.NodeID)
	}
	firstNonce := cs.Types[workloadapi.AddressTypeURL].SentNonce

	// Drain the initial notifications, then push an update.
	for {
		if _, ch := sub.Take(); ch == 0 {
			break
		}
	}
	r, err := server.ParseMesh([]byte(meshV2))
	if err != nil {
		t.Fatal(err)
	}
	if err := srv.Replace(r); err != nil {
		t.Fatal(err)
	}
	testutil.Eventually(t, "the update", func() bool {
		s := c.Store().Load()
		return s.WorkloadByAddr(addr("10.0.0.11")) != nil && s.Workload("Kubernetes//Pod/default/legacy") == nil &&
			len(s.Policies().Get("default/viewer").Authorization().Groups[0].Rules[0].Matches[0].Namespaces) == 1
	})
	snap = c.Store().Load()
	if snap.WorkloadByAddr(addr("10.0.0.1")) != nil {
		t.Error("sleep's old address still resolves")
	}
	if snap.WorkloadByAddr(addr("10.0.0.4")) != nil {
		t.Error("removed workload still resolves")
	}

	// The tunnel learns that policy changed, to re-check live connections.
	ctx, cancel := context.WithTimeout(context.Background(), waitTimeout)
	defer cancel()
	var changed state.Changed
	for changed&state.ChangedAuthorizations == 0 {
		_, ch, err := sub.Wait(ctx)
		if err != nil {
			t.Fatal("no authorization change notified")
		}
		changed |= ch
	}

	testutil.Eventually(t, "ACK of the update", func() bool { return acked(srv) })
	cs, _ = clientStatus(srv)
	at := cs.Types[workloadapi.AddressTypeURL]
	if at.SentNonce == firstNonce || at.NACKs != 0 {
		t.Errorf("address status after update: %+v", at)
	}
	stats := c.Stats()
	if stats.NACKs != 0 || stats.Removed != 1 || !stats.Connected || stats.Connects != 1 {
		t.Errorf("stats = %+v", stats)
	}
}

func mustAny(t *testing.T, m proto.Message) *anypb.Any {
	t.Helper()
	a, err := anypb.New(m)
	if err != nil {
		t.Fatal(err)
	}
	return a
}

func workloadAddress(uid string, ip ...byte) *workloadapi.Address {
	return &workloadapi.Address{Type: &workloadapi.Address_Workload{Workload: &workloadapi.Workload{
		Uid: uid, Name: uid, Namespace: "default", Addresses: [][]byte{ip}, TunnelProtocol: workloadapi.TunnelProtocol_HBONE,
	}}}
}

// TestPartialNACK sends good and bad resources in one response: the good
// ones apply, each bad one is NACKed by name, and nothing crashes.
func TestPartialNACK(t *testing.T) {
	srv := mustServer(t, "")
	srv.Set(workloadapi.AddressTypeURL, "good", mustAny(t, workloadAddress("good", 10, 0, 0, 1)))
	srv.Set(workloadapi.AddressTypeURL, "five-bytes", mustAny(t, workloadAddress("five-bytes", 10, 0, 0, 2, 9)))
	srv.Set(workloadapi.AddressTypeURL, "garbage", &anypb.Any{TypeUrl: workloadapi.AddressTypeURL, Value: []byte{0xff, 0xff, 0xff}})
	srv.Set(workloadapi.AddressTypeURL, "wrong-type", mustAny(t, &security.Authorization{Name: "x", Namespace: "default"}))
	srv.Set(workloadapi.AddressTypeURL, "renamed", mustAny(t, workloadAddress("other-uid", 10, 0, 0, 3)))
	srv.Set(workloadapi.AddressTypeURL, "no-body", nil)
	srv.Set(workloadapi.AddressTypeURL, "empty", mustAny(t, &workloadapi.Address{}))
	srv.Set(workloadapi.AuthorizationTypeURL, "default/ok", mustAny(t, &security.Authorization{Name: "ok", Namespace: "default"}))
	srv.Set(workloadapi.AuthorizationTypeURL, "default/bad-action", mustAny(t, &security.Authorization{Name: "bad-action", Namespace: "default", Action: 7}))

	c := startClient(t, client.Config{Dial: bufDialer(t, srv)})
	waitSynced(t, c)

	snap := c.Store().Load()
	if snap.Workload("good") == nil || snap.Policies().Get("default/ok") == nil {
		t.Fatal("good resources were not applied")
	}
	for _, uid := range []string{"five-bytes", "garbage", "wrong-type", "renamed", "other-uid", "no-body", "empty"} {
		if snap.Workload(uid) != nil {
			t.Errorf("bad resource %s applied", uid)
		}
	}
	if p := snap.Policies().Get("default/bad-action"); p == nil || !errors.Is(p.Err(), authz.ErrRejected) {
		t.Errorf("bad policy enforced as %v, want its fail-closed stand-in", p)
	}
	// The enforcer is told a policy exists that it cannot see.
	if rej := snap.RejectedAuthorizations(); len(rej) != 1 || rej[0].Key != "default/bad-action" || !strings.Contains(rej[0].Reason, "action") {
		t.Errorf("rejected policies = %+v", rej)
	}

	var addrStatus server.TypeStatus
	testutil.Eventually(t, "NACKs at the server", func() bool {
		cs, ok := clientStatus(srv)
		if !ok {
			return false
		}
		addrStatus = cs.Types[workloadapi.AddressTypeURL]
		pol := cs.Types[workloadapi.AuthorizationTypeURL]
		return addrStatus.NACKs == 1 && pol.NACKs == 1
	})
	if addrStatus.NACKedNonce != addrStatus.SentNonce || addrStatus.AckedNonce != "" {
		t.Errorf("address status = %+v", addrStatus)
	}
	for _, bad := range []string{"five-bytes", "garbage", "wrong-type", "renamed", "no-body", "empty"} {
		if !strings.Contains(addrStatus.NACK, bad+": ") {
			t.Errorf("NACK %q does not name %s", addrStatus.NACK, bad)
		}
	}
	if strings.Contains(addrStatus.NACK, "good") {
		t.Errorf("NACK %q names the good resource", addrStatus.NACK)
	}
	if !strings.Contains(addrStatus.NACK, "addresses[0]: 5 bytes") {
		t.Errorf("NACK %q does not say what is wrong with five-bytes", addrStatus.NACK)
	}

	stats := c.Stats()
	want := map[client.Reason]uint64{
		client.ReasonInvalid:      3, // five-bytes, empty, bad-action
		client.ReasonDecode:       1,
		client.ReasonTypeMismatch: 1,
		client.ReasonNameMismatch: 1,
		client.ReasonMissingBody:  1,
	}
	for r, n := range want {
		if stats.Rejected[r] != n {
			t.Errorf("rejected[%s] = %d, want %d (all: %v)", r, stats.Rejected[r], n, stats.Rejected)
		}
	}
	if stats.NACKs != 2 || len(stats.Rejections) != 7 {
		t.Errorf("stats = %+v", stats)
	}

	// A bad update of a good resource keeps the good version.
	srv.Set(workloadapi.AddressTypeURL, "good", mustAny(t, workloadAddress("good", 1, 2, 3)))
	testutil.Eventually(t, "NACK of the bad update", func() bool {
		cs, ok := clientStatus(srv)
		return ok && cs.Types[workloadapi.AddressTypeURL].NACKs == 2
	})
	if w := c.Store().Load().Workload("good"); w == nil || w.Addresses[0] != netip.MustParseAddr("10.0.0.1") {
		t.Errorf("good after a bad update = %+v", w)
	}

	// Fixing a rejected resource applies it, ACKs and clears its rejection.
	srv.Set(workloadapi.AddressTypeURL, "five-bytes", mustAny(t, workloadAddress("five-bytes", 10, 0, 0, 2)))
	testutil.Eventually(t, "the fixed resource", func() bool { return c.Store().Load().Workload("five-bytes") != nil })
	testutil.Eventually(t, "ACK of the fix", func() bool {
		cs, _ := clientStatus(srv)
		ts := cs.Types[workloadapi.AddressTypeURL]
		return ts.AckedNonce == ts.SentNonce
	})
	for _, r := range c.Stats().Rejections {
		if r.Name == "five-bytes" {
			t.Errorf("five-bytes still listed as rejected: %+v", r)
		}
	}

	// Deleting the bad policy at the server clears its rejection.
	srv.Delete(workloadapi.AuthorizationTypeURL, "default/bad-action")
	testutil.Eventually(t, "rejection cleared", func() bool { return len(c.Store().Load().RejectedAuthorizations()) == 0 })
}

// TestRejectedPoliciesFailClosed: a NAMESPACE- or GLOBAL-scoped policy the
// client NACKs is not simply absent, which would let through what a DENY
// denies or what an ALLOW leaves out: its stand-in is enforced for the
// workloads it would apply to. A fix replaces it.
func TestRejectedPoliciesFailClosed(t *testing.T) {
	badAddr := []*security.Group{{Rules: []*security.Rules{{Matches: []*security.Match{{
		SourceIps: []*security.Address{{Address: []byte{10, 0, 0}, Length: 24}},
	}}}}}}
	srv := mustServer(t, "")
	srv.Set(workloadapi.AuthorizationTypeURL, "deny-ns/deny", mustAny(t, &security.Authorization{
		Name: "deny", Namespace: "deny-ns", Scope: security.Scope_NAMESPACE, Action: security.Action_DENY, Groups: badAddr}))
	srv.Set(workloadapi.AuthorizationTypeURL, "allow-ns/allow", mustAny(t, &security.Authorization{
		Name: "allow", Namespace: "allow-ns", Scope: security.Scope_NAMESPACE, Action: security.Action_ALLOW, Groups: badAddr}))
	srv.Set(workloadapi.AuthorizationTypeURL, "garbage-ns/x", &anypb.Any{TypeUrl: workloadapi.AuthorizationTypeURL, Value: []byte{0xff, 0xff, 0xff}})
	c := startClient(t, client.Config{Dial: bufDialer(t, srv)})
	waitSynced(t, c)

	to := func(ns string) authz.Conn {
		return authz.Conn{
			SrcIdentity: "spiffe://cluster.local/ns/default/sa/sleep", SrcIP: netip.MustParseAddr("10.0.0.1"),
			DstIP: netip.MustParseAddr("10.0.1.1"), DstPort: 8080, DstWorkload: authz.Workload{Namespace: ns, Name: "app"},
		}
	}
	set := c.Store().Load().Policies()
	for ns, want := range map[string]authz.Decision{
		"deny-ns":    {Reason: authz.ReasonRejected, Policy: "deny-ns/deny"},
		"allow-ns":   {Reason: authz.ReasonNotAllowed}, // an ALLOW applies and matches nothing
		"garbage-ns": {Reason: authz.ReasonRejected, Policy: "garbage-ns/x"},
		"default":    {Allowed: true, Reason: authz.ReasonNoAllowPolicy},
	} {
		if got := set.Evaluate(to(ns)); got != want {
			t.Errorf("connection to namespace %s: %s, want %s", ns, got, want)
		}
	}
	if set.Rejected() != 3 {
		t.Errorf("%d rejected policies enforced, want 3", set.Rejected())
	}

	// A rejected GLOBAL DENY denies everywhere.
	srv.Set(workloadapi.AuthorizationTypeURL, "istio-system/deny-global", mustAny(t, &security.Authorization{
		Name: "deny-global", Namespace: "istio-system", Scope: security.Scope_GLOBAL, Action: security.Action_DENY, Groups: badAddr}))
	testutil.Eventually(t, "the rejected global policy", func() bool { return c.Store().Load().Policies().Rejected() == 4 })
	if got := c.Store().Load().Policies().Evaluate(to("default")); got.Allowed || got.Policy != "istio-system/deny-global" {
		t.Errorf("connection to namespace default under a rejected global DENY: %s", got)
	}

	// Fixed, the policy is enforced as sent.
	srv.Set(workloadapi.AuthorizationTypeURL, "istio-system/deny-global", mustAny(t, &security.Authorization{
		Name: "deny-global", Namespace: "istio-system", Scope: security.Scope_GLOBAL, Action: security.Action_DENY}))
	testutil.Eventually(t, "the fixed global policy", func() bool { return c.Store().Load().Policies().Rejected() == 3 })
	if got := c.Store().Load().Policies().Evaluate(to("default")); !got.Allowed {
		t.Errorf("connection to namespace default under a fixed DENY without rules: %s", got)
	}
}

// TestReconnect runs over real TCP: the server goes away, the client keeps
// serving its state, then a new server with different content comes up on
// the same address and the client converges through
// initial_resource_versions: the workload deleted meanwhile is removed
// (the new server never had it), and unchanged resources are not resent.
func TestReconnect(t *testing.T) {
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	address := lis.Addr().String()
	srv1 := mustServer(t, meshV1)
	ctx1, stop1 := context.WithCancel(context.Background())
	done1 := make(chan error, 1)
	go func() { done1 <- srv1.Serve(ctx1, lis) }()
	defer func() {
		stop1()
		<-done1
	}()

	conn, err := grpc.NewClient(address,
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithConnectParams(grpc.ConnectParams{
			Backoff:           backoff.Config{BaseDelay: 10 * time.Millisecond, Multiplier: 1.6, Jitter: 0.2, MaxDelay: 100 * time.Millisecond},
			MinConnectTimeout: time.Second,
		}))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	c := startClient(t, client.Config{Conn: conn})
	waitSynced(t, c)
	testutil.Eventually(t, "ACK", func() bool { return acked(srv1) })
	before := c.Stats()

	// The control plane goes away; the ztunnel keeps its view.
	stop1()
	if err := <-done1; !errors.Is(err, context.Canceled) {
		t.Errorf("Serve returned %v", err)
	}
	done1 <- nil // for the deferred cleanup
	testutil.Eventually(t, "disconnect", func() bool { return !c.Stats().Connected && c.Stats().Disconnects > 0 })
	down := c.Stats().Disconnects
	testutil.Eventually(t, "three failed reconnect attempts", func() bool { return c.Stats().Disconnects >= down+3 })
	snap := c.Store().Load()
	if snap.WorkloadByAddr(addr("10.0.0.1")) == nil || snap.WorkloadByAddr(addr("10.0.0.4")) == nil || snap.Policies().Get("default/viewer") == nil {
		t.Fatal("state lost while the server is down")
	}

	// A new server, with meshV2, on the same address.
	lis2, err := net.Listen("tcp", address)
	if err != nil {
		t.Fatal(err)
	}
	srv2 := mustServer(t, meshV2)
	serve(t, srv2, lis2)
	testutil.Eventually(t, "convergence on the new server", func() bool {
		s := c.Store().Load()
		return s.Workload("Kubernetes//Pod/default/legacy") == nil && s.WorkloadByAddr(addr("10.0.0.11")) != nil
	})
	testutil.Eventually(t, "ACK from the new server", func() bool { return acked(srv2) })

	cs, _ := clientStatus(srv2)
	if n := cs.Types[workloadapi.AddressTypeURL].InitialResources; n != 4 {
		t.Errorf("client announced %d addresses on reconnect, want 4", n)
	}
	if n := cs.Types[workloadapi.AuthorizationTypeURL].InitialResources; n != 1 {
		t.Errorf("client announced %d policies on reconnect, want 1", n)
	}
	after := c.Stats()
	// Changed: sleep (moved) and the viewer policy; removed: legacy. The
	// service and productpage are unchanged and must not be resent.
	if got := after.Applied - before.Applied; got != 2 {
		t.Errorf("applied %d resources after reconnect, want 2", got)
	}
	if got := after.Removed - before.Removed; got != 1 {
		t.Errorf("removed %d resources after reconnect, want 1", got)
	}
	if after.Reconnects == 0 || after.Connects < 2 || !after.Connected {
		t.Errorf("stats = %+v", after)
	}
}

func TestRunLifecycle(t *testing.T) {
	if _, err := client.New(client.Config{}); !errors.Is(err, client.ErrNoConn) {
		t.Errorf("New without a connection: %v", err)
	}
	srv := mustServer(t, "")
	c, err := client.New(client.Config{Dial: bufDialer(t, srv)})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- c.Run(ctx) }()
	<-c.Synced()
	if err := c.Run(ctx); !errors.Is(err, client.ErrRunning) {
		t.Errorf("second Run: %v", err)
	}
	cancel()
	if err := <-done; !errors.Is(err, context.Canceled) {
		t.Errorf("Run after cancel: %v", err)
	}
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	if err := c.Run(context.Background()); !errors.Is(err, client.ErrClosed) {
		t.Errorf("Run after Close: %v", err)
	}
}
