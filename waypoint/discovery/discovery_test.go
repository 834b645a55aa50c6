package discovery_test

import (
	"context"
	"errors"
	"net"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	endpointv3 "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	luav3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/lua/v3"
	hcmv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/test/bufconn"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"

	"github.com/amber-mesh/amber/internal/testutil"
	"github.com/amber-mesh/amber/test/waypointgolden"
	"github.com/amber-mesh/amber/waypoint/config"
	"github.com/amber-mesh/amber/waypoint/discovery"
	"github.com/amber-mesh/amber/xds/client"
	"github.com/amber-mesh/amber/xds/server"
)

const (
	productpage = "inbound-vip|9080|http|productpage.default.svc.cluster.local"
	reviews     = "inbound-vip|9080|http|reviews.default.svc.cluster.local"
)

func golden(t *testing.T, scenario string) *waypointgolden.Snapshot {
	t.Helper()
	s, err := waypointgolden.Latest(scenario)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func mustAny(t *testing.T, m proto.Message) *anypb.Any {
	t.Helper()
	a, err := anypb.New(m)
	if err != nil {
		t.Fatal(err)
	}
	return a
}

// serveGolden puts a scenario's LDS, CDS and EDS on a local xDS server.
func serveGolden(t *testing.T, srv *server.Server, s *waypointgolden.Snapshot) {
	t.Helper()
	rs, err := waypointgolden.Resources(s)
	if err != nil {
		t.Fatal(err)
	}
	for _, typeURL := range []string{config.ListenerType, config.ClusterType, config.EndpointType, config.RouteType, config.SecretType} {
		for _, r := range rs[typeURL] {
			srv.Set(typeURL, r.GetName(), r.GetResource())
		}
	}
}

// published records every configuration the set hands on.
type published struct {
	mu   sync.Mutex
	all  []*config.Config
	last *config.Config
}

func (p *published) publish(c *config.Config) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.all = append(p.all, c)
	p.last = c
}

func (p *published) latest() *config.Config {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.last
}

type fixture struct {
	srv *server.Server
	set *discovery.Set
	pub *published
	xc  *client.Client
}

func start(t *testing.T, scenario string) *fixture {
	t.Helper()
	return startSet(t, scenario, discovery.New)
}

func startSet(t *testing.T, scenario string, newSet func(func(*config.Config)) *discovery.Set) *fixture {
	t.Helper()
	srv, err := server.New(server.Config{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { srv.Close() })
	if scenario != "" {
		serveGolden(t, srv, golden(t, scenario))
	}
	lis := bufconn.Listen(1 << 20)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- srv.Serve(ctx, lis) }()
	t.Cleanup(func() {
		cancel()
		<-done
	})
	pub := &published{}
	set := newSet(pub.publish)
	xc, err := client.New(client.Config{
		Dial: func(ctx context.Context) (*grpc.ClientConn, error) {
			return grpc.NewClient("passthrough:///bufnet",
				grpc.WithContextDialer(func(ctx context.Context, _ string) (net.Conn, error) { return lis.DialContext(ctx) }),
				grpc.WithTransportCredentials(insecure.NewCredentials()))
		},
		Types:          set.Types(),
		InitialBackoff: 10 * time.Millisecond,
		MaxBackoff:     50 * time.Millisecond,
	})
	if err != nil {
		t.Fatal(err)
	}
	runDone := make(chan error, 1)
	go func() { runDone <- xc.Run(context.Background()) }()
	t.Cleanup(func() {
		xc.Close()
		if err := <-runDone; !errors.Is(err, client.ErrClosed) {
			t.Errorf("Run: %v", err)
		}
	})
	return &fixture{srv: srv, set: set, pub: pub, xc: xc}
}

func (f *fixture) status(typeURL string) server.TypeStatus {
	cs := f.srv.Clients()
	if len(cs) != 1 {
		return server.TypeStatus{}
	}
	return cs[0].Types[typeURL]
}

func (f *fixture) acked(typeURL string) bool {
	ts := f.status(typeURL)
	return ts.SentNonce != "" && ts.AckedNonce == ts.SentNonce
}

// TestGoldenThroughXDS: istiod's configuration for the walkthrough,
// served over delta ADS, compiles without a problem, every type ACKed,
// the endpoints asked for by the EDS clusters' names.
func TestGoldenThroughXDS(t *testing.T) {
	g := golden(t, "authz-productpage-viewer")
	f := start(t, "authz-productpage-viewer")
	testutil.Eventually(t, "ACKs of every type", func() bool {
		return f.acked(config.ListenerType) && f.acked(config.ClusterType) && f.acked(config.EndpointType)
	})
	testutil.Eventually(t, "warm endpoints", f.set.EndpointsWarm)
	var want []string
	for _, c := range g.Clusters {
		if c.GetType() == clusterv3.Cluster_EDS {
			want = append(want, c.GetName())
		}
	}
	slices.Sort(want)
	if got := f.set.EDSNames(); !slices.Equal(got, want) {
		t.Errorf("EDS names = %v, want %v", got, want)
	}
	cfg := f.pub.latest()
	if err := cfg.Err(""); err != nil {
		t.Fatalf("problems: %v", err)
	}
	if cfg.Terminate == nil || cfg.Dispatch == nil || cfg.Originate == nil {
		t.Fatal("incomplete configuration")
	}
	if c := cfg.Clusters[productpage]; c == nil || len(c.Endpoints) != 1 {
		t.Errorf("productpage cluster = %+v", c)
	}
	if ch := cfg.Dispatch.Chains[productpage]; ch == nil || ch.Err != nil || len(ch.HTTP.RBAC) == 0 {
		t.Errorf("productpage chain = %+v", ch)
	}
	snap := f.set.Snapshot()
	if len(snap.Listeners) != len(g.Listeners) || len(snap.Clusters) != len(g.Clusters) || len(snap.Endpoints) != len(g.Endpoints) {
		t.Errorf("held %d/%d/%d, golden %d/%d/%d", len(snap.Listeners), len(snap.Clusters), len(snap.Endpoints), len(g.Listeners), len(g.Clusters), len(g.Endpoints))
	}
	if snap.Config != cfg {
		t.Error("the snapshot's configuration is not the last published")
	}
}

// withLua returns main_internal with a Lua filter in productpage's HTTP
// chain: a filter amber refuses.
func withLua(t *testing.T, g *waypointgolden.Snapshot) *listenerv3.Listener {
	t.Helper()
	lua := &hcmv3.HttpFilter{Name: "envoy.filters.http.lua", ConfigType: &hcmv3.HttpFilter_TypedConfig{TypedConfig: mustAny(t, &luav3.Lua{})}}
	s, err := waypointgolden.WithHTTPFilter(g, config.MainInternal, productpage, lua)
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range s.Listeners {
		if l.GetName() == config.MainInternal {
			return l
		}
	}
	t.Fatal("no main_internal")
	return nil
}

// TestRefusedListenerFailsClosed: a filter amber does not know in one
// chain is NACKed with its field's path; the new configuration is
// installed with that chain refusing and the others serving; fixing it is
// ACKed and serves again.
func TestRefusedListenerFailsClosed(t *testing.T) {
	g := golden(t, "authz-productpage-viewer")
	f := start(t, "authz-productpage-viewer")
	testutil.Eventually(t, "the first ACK", func() bool { return f.acked(config.ListenerType) })

	f.srv.Set(config.ListenerType, config.MainInternal, mustAny(t, withLua(t, g)))
	testutil.Eventually(t, "the NACK", func() bool { return f.status(config.ListenerType).NACKs == 1 })
	nack := f.status(config.ListenerType).NACK
	for _, want := range []string{config.MainInternal + ": ", "http_filters[0]", "lua"} {
		if !strings.Contains(nack, want) {
			t.Errorf("NACK %q does not name %q", nack, want)
		}
	}
	cfg := f.pub.latest()
	if ch := cfg.Dispatch.Chains[productpage]; ch == nil || ch.Err == nil {
		t.Errorf("productpage's chain serves despite the refused filter: %+v", ch)
	}
	if ch := cfg.Dispatch.Chains[reviews]; ch == nil || ch.Err != nil {
		t.Errorf("reviews' chain does not serve: %+v", ch)
	}
	// The NACK is the compiler's verdict on the type.
	if len(cfg.Problems) == 0 {
		t.Error("no problems compiled")
	}
	for _, p := range cfg.Problems {
		if p.TypeURL != config.ListenerType || !strings.Contains(nack, p.Resource+": "+p.Err.Error()) {
			t.Errorf("problem %v is not in the LDS NACK %q", p, nack)
		}
	}

	for _, l := range g.Listeners {
		if l.GetName() == config.MainInternal {
			f.srv.Set(config.ListenerType, l.GetName(), mustAny(t, l))
		}
	}
	testutil.Eventually(t, "the ACK of the fix", func() bool { return f.acked(config.ListenerType) })
	if ch := f.pub.latest().Dispatch.Chains[productpage]; ch == nil || ch.Err != nil {
		t.Errorf("productpage's chain after the fix: %+v", ch)
	}
}

// TestEndpointsFollowClusters: a cluster removed from CDS takes its
// endpoints with it, unsubscribed, with no NACK for endpoints of a cluster
// that is gone; a cluster added is warmed by its endpoints.
func TestEndpointsFollowClusters(t *testing.T) {
	g := golden(t, "base")
	f := start(t, "base")
	testutil.Eventually(t, "warm endpoints", func() bool {
		return f.acked(config.EndpointType) && f.set.EndpointsWarm() && slices.Contains(f.set.EDSNames(), reviews)
	})
	f.srv.Delete(config.ClusterType, reviews)
	testutil.Eventually(t, "reviews unsubscribed", func() bool {
		snap := f.set.Snapshot()
		return !slices.Contains(f.set.EDSNames(), reviews) &&
			!slices.ContainsFunc(snap.Endpoints, func(r discovery.Resource[*endpointv3.ClusterLoadAssignment]) bool {
				return r.Message.GetClusterName() == reviews
			}) && f.status(config.EndpointType).Resources == len(snap.Endpoints)
	})
	if n := f.status(config.EndpointType).NACKs; n != 0 {
		t.Errorf("%d endpoint NACKs: %s", n, f.status(config.EndpointType).NACK)
	}
	if c := f.pub.latest().Clusters[reviews]; c != nil {
		t.Errorf("reviews still compiled: %+v", c)
	}

	for _, c := range g.Clusters {
		if c.GetName() == reviews {
			f.srv.Set(config.ClusterType, reviews, mustAny(t, c))
		}
	}
	testutil.Eventually(t, "reviews back with its endpoints", func() bool {
		c := f.pub.latest().Clusters[reviews]
		return c != nil && len(c.Endpoints) == 2 && f.set.EndpointsWarm()
	})
	if err := f.pub.latest().Err(""); err != nil {
		t.Errorf("problems: %v", err)
	}
}

// TestUndecodableDropped: a listener that cannot be read is NACKed and no
// longer served in its earlier version: without main_internal everything
// is refused.
func TestUndecodableDropped(t *testing.T) {
	f := start(t, "base")
	testutil.Eventually(t, "the first ACK", func() bool { return f.acked(config.ListenerType) })
	if f.pub.latest().Dispatch == nil {
		t.Fatal("no dispatch to begin with")
	}
	f.srv.Set(config.ListenerType, config.MainInternal, &anypb.Any{TypeUrl: config.ListenerType, Value: []byte{0xff, 0xff}})
	testutil.Eventually(t, "the NACK", func() bool { return f.status(config.ListenerType).NACKs == 1 })
	cfg := f.pub.latest()
	if cfg.Dispatch != nil {
		t.Error("main_internal still dispatches after an unreadable update")
	}
	if !strings.Contains(f.status(config.ListenerType).NACK, config.MainInternal+": ") {
		t.Errorf("NACK %q", f.status(config.ListenerType).NACK)
	}
	if st := f.xc.Stats(); st.Types[config.ListenerType].NACKs != 1 || len(st.Rejections) == 0 {
		t.Errorf("stats %+v", st)
	}
}
