package client_test

import (
	"context"
	"errors"
	"maps"
	"net"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"testing"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	endpointv3 "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/protobuf/proto"

	"github.com/amber-mesh/amber/internal/testutil"
	"github.com/amber-mesh/amber/xds/client"
	"github.com/amber-mesh/amber/xds/server"
	"github.com/amber-mesh/amber/xds/state"
	"github.com/amber-mesh/amber/xds/workloadapi"
)

const (
	clusterType  = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
	endpointType = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
)

// held is a Handler that keeps what it is given, for the test to read: it
// refuses a Cluster whose alt_stat_name is "bad" and keeps the previous
// version, as the workload API's handlers do.
type held[M proto.Message] struct {
	typeURL string
	new     func() M
	refuse  func(M) error

	mu      sync.Mutex // guards the fields below
	items   map[string]M
	applies int
	removed []string // every name removed, in order
}

func (h *held[M]) Apply(resources []*discoveryv3.Resource, removed []string) []*client.ResourceError {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.applies++
	if h.items == nil {
		h.items = map[string]M{}
	}
	var rejects []*client.ResourceError
	for _, r := range resources {
		m := h.new()
		if rerr := client.Decode(h.typeURL, r, m); rerr != nil {
			rejects = append(rejects, rerr)
			continue
		}
		if h.refuse != nil {
			if err := h.refuse(m); err != nil {
				rejects = append(rejects, &client.ResourceError{TypeURL: h.typeURL, Name: r.GetName(), Reason: client.ReasonRefused, Err: err})
				continue
			}
		}
		h.items[r.GetName()] = m
	}
	for _, n := range removed {
		delete(h.items, n)
		h.removed = append(h.removed, n)
	}
	return rejects
}

func (h *held[M]) names() []string {
	h.mu.Lock()
	defer h.mu.Unlock()
	return slices.Sorted(maps.Keys(h.items))
}

func (h *held[M]) get(name string) M {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.items[name]
}

// edsNames is what Envoy subscribes to for EDS: the EDS clusters CDS gave.
func (h *held[M]) edsNames() []string {
	h.mu.Lock()
	defer h.mu.Unlock()
	var out []string
	for n, m := range h.items {
		if c, ok := any(m).(*clusterv3.Cluster); ok && c.GetType() == clusterv3.Cluster_EDS {
			out = append(out, n)
		}
	}
	return out
}

type cdsEDS struct {
	cds *held[*clusterv3.Cluster]
	eds *held[*endpointv3.ClusterLoadAssignment]
}

func newCDSEDS() cdsEDS {
	return cdsEDS{
		cds: &held[*clusterv3.Cluster]{typeURL: clusterType, new: func() *clusterv3.Cluster { return &clusterv3.Cluster{} },
			refuse: func(c *clusterv3.Cluster) error {
				if c.GetAltStatName() == "bad" {
					return errors.New("alt_stat_name: bad")
				}
				return nil
			}},
		eds: &held[*endpointv3.ClusterLoadAssignment]{typeURL: endpointType, new: func() *endpointv3.ClusterLoadAssignment { return &endpointv3.ClusterLoadAssignment{} }},
	}
}

func (x cdsEDS) types() []client.Type {
	return []client.Type{
		{URL: clusterType, Handler: x.cds},
		{URL: endpointType, Handler: x.eds, Names: x.cds.edsNames},
	}
}

func edsCluster(name, stat string) *clusterv3.Cluster {
	return &clusterv3.Cluster{Name: name, ClusterDiscoveryType: &clusterv3.Cluster_Type{Type: clusterv3.Cluster_EDS}, AltStatName: stat}
}

func staticCluster(name string) *clusterv3.Cluster {
	return &clusterv3.Cluster{Name: name, ClusterDiscoveryType: &clusterv3.Cluster_Type{Type: clusterv3.Cluster_STATIC}}
}

func cla(name string) *endpointv3.ClusterLoadAssignment {
	return &endpointv3.ClusterLoadAssignment{ClusterName: name}
}

// TestNamedSubscriptionFollows: EDS is asked for by the names of the EDS
// clusters CDS holds, and follows CDS as it changes; a dropped name is
// forgotten locally (the server sends no removal for it), a name never
// asked for is never taken although the server has it.
func TestNamedSubscriptionFollows(t *testing.T) {
	srv := mustServer(t, "")
	srv.Set(clusterType, "a", mustAny(t, edsCluster("a", "")))
	srv.Set(clusterType, "s", mustAny(t, staticCluster("s")))
	for _, n := range []string{"a", "b", "s", "other"} {
		srv.Set(endpointType, n, mustAny(t, cla(n)))
	}
	x := newCDSEDS()
	c := startClient(t, client.Config{Dial: bufDialer(t, srv), Types: x.types()})
	waitSynced(t, c)
	testutil.Eventually(t, "endpoints of a", func() bool { return slices.Equal(x.eds.names(), []string{"a"}) })

	srv.Set(clusterType, "b", mustAny(t, edsCluster("b", "")))
	testutil.Eventually(t, "endpoints of a and b", func() bool { return slices.Equal(x.eds.names(), []string{"a", "b"}) })

	srv.Delete(clusterType, "a")
	testutil.Eventually(t, "a's endpoints forgotten", func() bool { return slices.Equal(x.eds.names(), []string{"b"}) })
	// The server still has a's endpoints, unsubscribed: an update of them
	// is not sent, and would not be taken.
	srv.Set(endpointType, "a", mustAny(t, &endpointv3.ClusterLoadAssignment{ClusterName: "a", Policy: &endpointv3.ClusterLoadAssignment_Policy{}}))
	srv.Set(endpointType, "b", mustAny(t, &endpointv3.ClusterLoadAssignment{ClusterName: "b", Policy: &endpointv3.ClusterLoadAssignment_Policy{}}))
	testutil.Eventually(t, "b's update", func() bool { return x.eds.get("b").GetPolicy() != nil })
	if got := x.eds.names(); !slices.Equal(got, []string{"b"}) {
		t.Errorf("endpoints held = %v, want [b]", got)
	}
	cs, ok := clientStatus(srv)
	if !ok {
		t.Fatal("no client at the server")
	}
	if n := cs.Types[endpointType].Resources; n != 1 {
		t.Errorf("the server thinks the client holds %d endpoints, want 1", n)
	}
	if st := c.Stats().Types[endpointType]; st.NACKs != 0 || st.ACKs == 0 {
		t.Errorf("endpoint stats = %+v", st)
	}
}

// TestNamedSubscriptionWaitsForNames: with no names, nothing of a named
// type is asked for (an empty first request would be a wildcard), and
// Synced does not wait for it.
func TestNamedSubscriptionWaitsForNames(t *testing.T) {
	srv := mustServer(t, "")
	srv.Set(clusterType, "s", mustAny(t, staticCluster("s")))
	srv.Set(endpointType, "s", mustAny(t, cla("s")))
	x := newCDSEDS()
	c := startClient(t, client.Config{Dial: bufDialer(t, srv), Types: x.types()})
	waitSynced(t, c)
	testutil.Eventually(t, "the CDS ACK", func() bool {
		cs, ok := clientStatus(srv)
		return ok && cs.Types[clusterType].ACKs == 1
	})
	cs, _ := clientStatus(srv)
	if _, asked := cs.Types[endpointType]; asked {
		t.Errorf("endpoints were asked for without names: %+v", cs.Types)
	}
	if n := len(x.eds.names()); n != 0 {
		t.Errorf("%d endpoints taken", n)
	}
}

// TestTypeNACKPerResource: a handler's refusals are NACKed by name with
// their text, the rest of the response applies, the refused update keeps
// the previous version (this handler's rule), and a fix is ACKed.
func TestTypeNACKPerResource(t *testing.T) {
	srv := mustServer(t, "")
	srv.Set(clusterType, "good", mustAny(t, staticCluster("good")))
	srv.Set(clusterType, "refused", mustAny(t, edsCluster("refused", "bad")))
	srv.Set(clusterType, "garbage", mustAny(t, cla("garbage")))
	x := newCDSEDS()
	c := startClient(t, client.Config{Dial: bufDialer(t, srv), Types: x.types()})
	waitSynced(t, c)
	var st server.TypeStatus
	testutil.Eventually(t, "the NACK", func() bool {
		cs, ok := clientStatus(srv)
		st = cs.Types[clusterType]
		return ok && st.NACKs == 1
	})
	for _, want := range []string{"refused: alt_stat_name: bad", `garbage: body is "` + endpointType + `"`} {
		if !strings.Contains(st.NACK, want) {
			t.Errorf("NACK %q does not say %q", st.NACK, want)
		}
	}
	if strings.Contains(st.NACK, "good") {
		t.Errorf("NACK %q names the good resource", st.NACK)
	}
	if got := x.cds.names(); !slices.Equal(got, []string{"good"}) {
		t.Errorf("clusters held = %v", got)
	}
	// The refused cluster named no EDS names.
	if _, asked := func() (server.TypeStatus, bool) {
		cs, _ := clientStatus(srv)
		ts, ok := cs.Types[endpointType]
		return ts, ok
	}(); asked {
		t.Error("endpoints asked for a refused cluster")
	}

	// A refused update of the good one keeps it as it was.
	srv.Set(clusterType, "good", mustAny(t, edsCluster("good", "bad")))
	testutil.Eventually(t, "the second NACK", func() bool {
		cs, _ := clientStatus(srv)
		return cs.Types[clusterType].NACKs == 2
	})
	if x.cds.get("good").GetType() != clusterv3.Cluster_STATIC {
		t.Errorf("good after a refused update: %v", x.cds.get("good"))
	}
	stats := c.Stats()
	if len(stats.Rejections) != 3 || stats.Types[clusterType].NACKs != 2 || stats.Rejected[client.ReasonRefused] != 2 {
		t.Errorf("stats = %+v", stats)
	}

	// Fixed: ACKed, applied, the rejection cleared.
	srv.Set(clusterType, "good", mustAny(t, edsCluster("good", "")))
	srv.Set(endpointType, "good", mustAny(t, cla("good")))
	testutil.Eventually(t, "the fix and its endpoints", func() bool { return slices.Equal(x.eds.names(), []string{"good"}) })
	for _, r := range c.Stats().Rejections {
		if r.Name == "good" {
			t.Errorf("good still rejected: %+v", r)
		}
	}
}

// TestTypesReconnect: over real TCP, a new server with other content on
// the same address; the client announces what it holds, named types only
// by their names and refused resources with a version that matches none,
// so that it converges: deleted resources are removed, a refused one is
// resent, unchanged ones are not.
func TestTypesReconnect(t *testing.T) {
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	address := lis.Addr().String()
	srv1 := mustServer(t, "")
	srv1.Set(clusterType, "a", mustAny(t, edsCluster("a", "")))
	srv1.Set(clusterType, "b", mustAny(t, edsCluster("b", "")))
	srv1.Set(clusterType, "refused", mustAny(t, staticCluster("refused")))
	for _, n := range []string{"a", "b"} {
		srv1.Set(endpointType, n, mustAny(t, cla(n)))
	}
	ctx1, stop1 := context.WithCancel(context.Background())
	done1 := make(chan error, 1)
	go func() { done1 <- srv1.Serve(ctx1, lis) }()

	conn, err := grpc.NewClient(address, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	x := newCDSEDS()
	c := startClient(t, client.Config{Conn: conn, Types: x.types()})
	testutil.Eventually(t, "both endpoints", func() bool { return slices.Equal(x.eds.names(), []string{"a", "b"}) })
	srv1.Set(clusterType, "refused", mustAny(t, edsCluster("refused", "bad")))
	testutil.Eventually(t, "the NACK", func() bool { cs, _ := clientStatus(srv1); return cs.Types[clusterType].NACKs == 1 })
	stop1()
	<-done1
	testutil.Eventually(t, "disconnect", func() bool { return !c.Stats().Connected })
	applies := func() int { x.cds.mu.Lock(); defer x.cds.mu.Unlock(); return x.cds.applies }
	before := applies()

	// The new server: b is gone, a unchanged, refused still refused.
	lis2, err := net.Listen("tcp", address)
	if err != nil {
		t.Fatal(err)
	}
	srv2 := mustServer(t, "")
	srv2.Set(clusterType, "a", mustAny(t, edsCluster("a", "")))
	srv2.Set(clusterType, "refused", mustAny(t, edsCluster("refused", "bad")))
	srv2.Set(endpointType, "a", mustAny(t, cla("a")))
	srv2.Set(endpointType, "b", mustAny(t, cla("b")))
	serve(t, srv2, lis2)
	testutil.Eventually(t, "b removed", func() bool {
		return slices.Equal(x.cds.names(), []string{"a", "refused"}) && slices.Equal(x.eds.names(), []string{"a"})
	})
	testutil.Eventually(t, "the NACK from the new server", func() bool { cs, _ := clientStatus(srv2); return cs.Types[clusterType].NACKs == 1 })

	cs, _ := clientStatus(srv2)
	if n := cs.Types[clusterType].InitialResources; n != 3 {
		t.Errorf("announced %d clusters, want 3 (a, b, refused)", n)
	}
	if n := cs.Types[endpointType].InitialResources; n != 2 {
		t.Errorf("announced %d endpoints, want 2", n)
	}
	if got := applies() - before; got != 1 {
		t.Errorf("%d cluster responses after reconnect, want 1 (removal of b, refused resent)", got)
	}
	if x.cds.get("refused").GetType() != clusterv3.Cluster_STATIC {
		t.Error("the refused update replaced the good version")
	}
	if !slices.Contains(x.eds.removed, "b") {
		t.Errorf("b's endpoints not removed: %v", x.eds.removed)
	}
}

// TestWorkloads: the Workload type a waypoint subscribes to fills the
// store with workloads by uid; removals of names it never held (istiod
// lists services there) are harmless; a bad workload is NACKed and its
// previous version kept.
func TestWorkloads(t *testing.T) {
	srv := mustServer(t, "")
	wl := func(uid string, ip ...byte) *workloadapi.Workload {
		return workloadAddress(uid, ip...).GetWorkload()
	}
	srv.Set(workloadapi.WorkloadTypeURL, "w1", mustAny(t, wl("w1", 10, 0, 0, 1)))
	srv.Set(workloadapi.WorkloadTypeURL, "default/svc.default.svc.cluster.local", mustAny(t, wl("w9", 10, 0, 0, 9)))
	st := state.NewStore()
	c := startClient(t, client.Config{Dial: bufDialer(t, srv), Types: []client.Type{client.Workloads(st)}})
	waitSynced(t, c)
	if w := st.Load().WorkloadByAddr(addr("10.0.0.1")); w == nil || w.UID != "w1" {
		t.Fatalf("w1 = %+v", w)
	}
	if st.Load().Workload("w9") != nil {
		t.Error("a workload under another name was taken")
	}
	srv.Set(workloadapi.WorkloadTypeURL, "w1", mustAny(t, wl("w1", 10, 0, 1)))
	srv.Delete(workloadapi.WorkloadTypeURL, "default/svc.default.svc.cluster.local")
	testutil.Eventually(t, "the NACK", func() bool { return c.Stats().Types[workloadapi.WorkloadTypeURL].NACKs == 2 })
	if w := st.Load().Workload("w1"); w == nil || w.Addresses[0] != netip.MustParseAddr("10.0.0.1") {
		t.Errorf("w1 after a bad update = %+v", w)
	}
	srv.Delete(workloadapi.WorkloadTypeURL, "w1")
	testutil.Eventually(t, "w1 removed", func() bool { return st.Load().Workload("w1") == nil })
}
