package config

import (
	"errors"
	"net/netip"
	"os"
	"slices"
	"strconv"
	"strings"
	"testing"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	endpointv3 "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	rbacv3 "github.com/envoyproxy/go-control-plane/envoy/config/rbac/v3"
	luav3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/lua/v3"
	rbachttpv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/rbac/v3"
	hcmv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	internalv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/internal_upstream/v3"
	rawbufferv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/raw_buffer/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	matcherv3 "github.com/envoyproxy/go-control-plane/envoy/type/matcher/v3"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"
	"google.golang.org/protobuf/types/known/structpb"

	"github.com/amber-mesh/amber/test/waypointgolden"
)

const productpageChain = "inbound-vip|9080|http|productpage.default.svc.cluster.local"

// golden returns a fresh copy of a scenario's resources to modify.
func golden(t *testing.T, scenario string) *waypointgolden.Snapshot {
	t.Helper()
	s, err := waypointgolden.Load(latest(t), scenario)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func listener(t *testing.T, s *waypointgolden.Snapshot, name string) *listenerv3.Listener {
	t.Helper()
	for _, l := range s.Listeners {
		if l.GetName() == name {
			return l
		}
	}
	t.Fatalf("no listener %s", name)
	return nil
}

// chainHCM returns the index of the named chain of main_internal and its
// HTTP connection manager, and a function storing a modified one back.
func chainHCM(t *testing.T, s *waypointgolden.Snapshot, chain string) (int, *hcmv3.HttpConnectionManager, func()) {
	t.Helper()
	l := listener(t, s, MainInternal)
	i := slices.IndexFunc(l.GetFilterChains(), func(fc *listenerv3.FilterChain) bool { return fc.GetName() == chain })
	if i < 0 {
		t.Fatalf("no chain %s", chain)
	}
	f := l.GetFilterChains()[i].GetFilters()[0]
	h, err := unpackHCM(f)
	if err != nil {
		t.Fatal(err)
	}
	return i, h, func() {
		a, err := anypb.New(h)
		if err != nil {
			t.Fatal(err)
		}
		f.ConfigType = &listenerv3.Filter_TypedConfig{TypedConfig: a}
	}
}

func mustAny(t *testing.T, m protoMessage) *anypb.Any {
	t.Helper()
	a, err := anypb.New(m)
	if err != nil {
		t.Fatal(err)
	}
	return a
}

// TestUnknownFilterIsNACKedByPath: an HTTP filter amber does not know is a
// problem naming the field, on the listener's NACK; the chain holding it
// refuses traffic and the other chains are unaffected.
func TestUnknownFilterIsNACKedByPath(t *testing.T) {
	s := golden(t, "authz-productpage-viewer")
	i, h, store := chainHCM(t, s, productpageChain)
	lua := &hcmv3.HttpFilter{Name: "envoy.filters.http.lua", ConfigType: &hcmv3.HttpFilter_TypedConfig{TypedConfig: mustAny(t, &luav3.Lua{})}}
	h.HttpFilters = slices.Insert(h.HttpFilters, 2, lua)
	store()

	c := Compile(resources(s))
	want := "listener main_internal: filter_chains[" + strconv.Itoa(i) + "].filters[0].typed_config(envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager).http_filters[2]: unsupported filter type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua"
	if len(c.Problems) != 1 || c.Problems[0].Error() != want {
		t.Fatalf("problems %v,\nwant exactly %q", c.Problems, want)
	}
	if err := c.Err(ListenerType); err == nil || err.Error() != want {
		t.Errorf("listener NACK %v", err)
	}
	if c.Err(ClusterType) != nil || c.Err(EndpointType) != nil {
		t.Errorf("clusters or endpoints NACKed: %v %v", c.Err(ClusterType), c.Err(EndpointType))
	}
	in := Input{Destination: netip.MustParseAddrPort(productpageVIP), Protocol: func() string { return "http/1.1" }}
	if ch := c.Dispatch.Lookup(in); ch == nil || ch.Err == nil {
		t.Errorf("productpage's chain %+v still serves", ch)
	}
	in.Destination = netip.MustParseAddrPort(reviewsVIP)
	if ch := c.Dispatch.Lookup(in); ch == nil || ch.Err != nil {
		t.Errorf("reviews' chain %+v refused too", ch)
	}
}

// TestUnknownFieldIsNACKedByPath: a field outside the allow-list, even of
// a known message, is refused by path.
func TestUnknownFieldIsNACKedByPath(t *testing.T) {
	s := golden(t, "base")
	i, h, store := chainHCM(t, s, productpageChain)
	h.Via = "amber"
	store()
	c := Compile(resources(s))
	want := "listener main_internal: filter_chains[" + strconv.Itoa(i) + "].filters[0].typed_config(envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager).via: unsupported field of envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
	if len(c.Problems) != 1 || c.Problems[0].Error() != want {
		t.Fatalf("problems %v,\nwant exactly %q", c.Problems, want)
	}
}

// TestRequestPrincipalFailsClosed: a policy on JWT claims needs jwt_authn,
// which amber lacks: the chain is refused, not served without the rule.
func TestRequestPrincipalFailsClosed(t *testing.T) {
	s := golden(t, "base")
	_, h, store := chainHCM(t, s, productpageChain)
	jwt := &rbachttpv3.RBAC{Rules: &rbacv3.RBAC{Action: rbacv3.RBAC_DENY, Policies: map[string]*rbacv3.Policy{
		"ns[default]-policy[jwt]-rule[0]": {
			Permissions: []*rbacv3.Permission{{Rule: &rbacv3.Permission_Any{Any: true}}},
			Principals: []*rbacv3.Principal{{Identifier: &rbacv3.Principal_Metadata{Metadata: &matcherv3.MetadataMatcher{
				Filter: "istio_authn", Path: []*matcherv3.MetadataMatcher_PathSegment{{Segment: &matcherv3.MetadataMatcher_PathSegment_Key{Key: "request.auth.claims"}}},
				Value: &matcherv3.ValueMatcher{MatchPattern: &matcherv3.ValueMatcher_PresentMatch{PresentMatch: true}},
			}}}},
		},
	}}}
	h.HttpFilters = slices.Insert(h.HttpFilters, 0, &hcmv3.HttpFilter{Name: "envoy.filters.http.rbac", ConfigType: &hcmv3.HttpFilter_TypedConfig{TypedConfig: mustAny(t, jwt)}})
	store()
	c := Compile(resources(s))
	if len(c.Problems) != 1 || !strings.Contains(c.Problems[0].Error(), "principals[0]") {
		t.Fatalf("problems %v", c.Problems)
	}
	ch := c.Dispatch.Chains[productpageChain]
	if ch.Err == nil || !strings.Contains(ch.Err.Error(), "unsupported field of envoy.config.rbac.v3.Principal") {
		t.Errorf("chain error %v", ch.Err)
	}
}

// TestUnsupportedClusterFailsClosed: consistent hashing and TLS to the
// application (DestinationRule tls SIMPLE) refuse that cluster only.
func TestUnsupportedClusterFailsClosed(t *testing.T) {
	s := golden(t, "base")
	var ratings, details *clusterv3.Cluster
	for _, c := range s.Clusters {
		switch c.GetName() {
		case "inbound-vip|9080|http|ratings.default.svc.cluster.local":
			ratings = c
		case "inbound-vip|9080|http|details.default.svc.cluster.local":
			details = c
		}
	}
	ratings.LbPolicy = clusterv3.Cluster_RING_HASH
	tls := &corev3.TransportSocket{Name: "tls", ConfigType: &corev3.TransportSocket_TypedConfig{TypedConfig: mustAny(t, &tlsv3.UpstreamTlsContext{Sni: "details"})}}
	details.TransportSocket = &corev3.TransportSocket{Name: "internal_upstream", ConfigType: &corev3.TransportSocket_TypedConfig{
		TypedConfig: mustAny(t, &internalv3.InternalUpstreamTransport{TransportSocket: tls})}}
	c := Compile(resources(s))
	if c.Clusters[ratings.GetName()].Err == nil || c.Clusters[details.GetName()].Err == nil {
		t.Errorf("ratings %v, details %v: want both refused", c.Clusters[ratings.GetName()].Err, c.Clusters[details.GetName()].Err)
	}
	if c.Clusters["inbound-vip|9080|http|productpage.default.svc.cluster.local"].Err != nil {
		t.Error("productpage refused too")
	}
	if err := c.Err(ClusterType); err == nil || c.Err(ListenerType) != nil {
		t.Errorf("NACKs: clusters %v, listeners %v", err, c.Err(ListenerType))
	}
}

func TestMissingAndUnknownResources(t *testing.T) {
	s := golden(t, "base")
	s.Listeners = slices.DeleteFunc(s.Listeners, func(l *listenerv3.Listener) bool { return l.GetName() == ConnectTerminate })
	s.Listeners = append(s.Listeners, &listenerv3.Listener{Name: "virtualOutbound"})
	c := Compile(resources(s))
	if c.Terminate != nil {
		t.Error("connect_terminate compiled from nothing")
	}
	var got []string
	for _, p := range c.Problems {
		got = append(got, p.Error())
	}
	want := []string{"listener connect_terminate: missing", "listener virtualOutbound: unsupported listener"}
	if !slices.Equal(got, want) {
		t.Errorf("problems %q, want %q", got, want)
	}
}

func TestEndpoints(t *testing.T) {
	s := golden(t, "base")
	var la *endpointv3.ClusterLoadAssignment
	for _, e := range s.Endpoints {
		if e.GetClusterName() == productpageChain {
			la = e
		}
	}
	// A plain endpoint (a Service backed by something outside the mesh).
	la.Endpoints[0].LbEndpoints = append(la.Endpoints[0].LbEndpoints, &endpointv3.LbEndpoint{
		HostIdentifier: &endpointv3.LbEndpoint_Endpoint{Endpoint: &endpointv3.Endpoint{Address: &corev3.Address{
			Address: &corev3.Address_SocketAddress{SocketAddress: &corev3.SocketAddress{Address: "192.0.2.9", PortSpecifier: &corev3.SocketAddress_PortValue{PortValue: 9080}}}}}},
		HealthStatus: corev3.HealthStatus_UNHEALTHY,
	})
	c := Compile(resources(s))
	eps := c.Clusters[productpageChain].Endpoints
	want := []Endpoint{
		{Address: netip.MustParseAddrPort("10.244.0.10:9080"), HBONE: true, Weight: 1, Healthy: true, Workload: "productpage-v1;default;productpage;v1;Kubernetes"},
		{Address: netip.MustParseAddrPort("192.0.2.9:9080"), Weight: 1},
	}
	if !slices.Equal(eps, want) {
		t.Errorf("endpoints %+v,\nwant %+v", eps, want)
	}

	// Double HBONE to another network is refused with the cluster.
	la.Endpoints[0].LbEndpoints[0].GetEndpoint().GetAddress().GetEnvoyInternalAddress().AddressNameSpecifier =
		&corev3.EnvoyInternalAddress_ServerListenerName{ServerListenerName: InnerConnectOriginate}
	c = Compile(resources(s))
	if c.Clusters[productpageChain].Err == nil || c.Err(EndpointType) == nil {
		t.Errorf("double-HBONE endpoint accepted: %v", c.Clusters[productpageChain].Err)
	}
}

// TestOutboundSocketMatches: an outbound cluster with the
// transport_socket_matches istiod gives a waypoint's outbound clusters
// (hbone, tlsMode-istio, tlsMode-disabled) compiles, its connect_originate
// endpoints HBONE; a sidecar's endpoint (tlsMode istio, not HBONE) is
// refused (Endpoint.Err: the data path answers 503) rather than reached in
// plain TCP, the others still served; a match amber does not know refuses
// the cluster.
func TestOutboundSocketMatches(t *testing.T) {
	const outbound = "outbound|9080||productpage-v1.default.svc.cluster.local"
	build := func(t *testing.T, extra ...*clusterv3.Cluster_TransportSocketMatch) (*waypointgolden.Snapshot, *endpointv3.ClusterLoadAssignment) {
		s := golden(t, "base")
		var c *clusterv3.Cluster
		var la *endpointv3.ClusterLoadAssignment
		for _, x := range s.Clusters {
			if x.GetName() == productpageChain {
				c = proto.Clone(x).(*clusterv3.Cluster)
			}
		}
		for _, x := range s.Endpoints {
			if x.GetClusterName() == productpageChain {
				la = proto.Clone(x).(*endpointv3.ClusterLoadAssignment)
			}
		}
		c.Name, la.ClusterName = outbound, outbound
		c.EdsClusterConfig.ServiceName = outbound
		hbone := c.TransportSocket
		c.TransportSocket = nil
		raw := &corev3.TransportSocket{Name: "envoy.transport_sockets.raw_buffer", ConfigType: &corev3.TransportSocket_TypedConfig{TypedConfig: mustAny(t, &rawbufferv3.RawBuffer{})}}
		mtls := &corev3.TransportSocket{Name: "envoy.transport_sockets.tls", ConfigType: &corev3.TransportSocket_TypedConfig{TypedConfig: mustAny(t, &tlsv3.UpstreamTlsContext{
			Sni:              "outbound_.9080_._.productpage-v1.default.svc.cluster.local",
			CommonTlsContext: &tlsv3.CommonTlsContext{AlpnProtocols: []string{"istio-peer-exchange", "istio"}},
		})}}
		c.TransportSocketMatches = append([]*clusterv3.Cluster_TransportSocketMatch{
			{Name: "hbone", Match: mustStruct(t, map[string]any{"tunnel": "http"}), TransportSocket: hbone},
			{Name: "tlsMode-istio", Match: mustStruct(t, map[string]any{"tlsMode": "istio"}), TransportSocket: mtls},
			{Name: "tlsMode-disabled", Match: mustStruct(t, map[string]any{}), TransportSocket: raw},
		}, extra...)
		s.Clusters = append(s.Clusters, c)
		s.Endpoints = append(s.Endpoints, la)
		return s, la
	}

	s, _ := build(t)
	c := Compile(resources(s))
	cl := c.Clusters[outbound]
	if cl == nil || cl.Err != nil {
		t.Fatalf("outbound cluster: %+v, problems %v", cl, c.Problems)
	}
	if len(cl.Endpoints) != 1 || !cl.Endpoints[0].HBONE || cl.Endpoints[0].Err != nil || !cl.SidecarMTLS {
		t.Errorf("endpoints %+v, sidecar mTLS %v: want one HBONE endpoint, the tlsMode-istio match seen", cl.Endpoints, cl.SidecarMTLS)
	}

	s, la := build(t)
	la.Endpoints[0].LbEndpoints = append(la.Endpoints[0].LbEndpoints, &endpointv3.LbEndpoint{
		HostIdentifier: &endpointv3.LbEndpoint_Endpoint{Endpoint: &endpointv3.Endpoint{Address: &corev3.Address{
			Address: &corev3.Address_SocketAddress{SocketAddress: &corev3.SocketAddress{Address: "10.244.0.99", PortSpecifier: &corev3.SocketAddress_PortValue{PortValue: 9080}}}}}},
		Metadata: &corev3.Metadata{FilterMetadata: map[string]*structpb.Struct{"envoy.transport_socket_match": mustStruct(t, map[string]any{"tlsMode": "istio"})}},
	})
	c = Compile(resources(s))
	if cl := c.Clusters[outbound]; cl.Err != nil || len(cl.Endpoints) != 2 || cl.Endpoints[0].Err != nil || !errors.Is(cl.Endpoints[1].Err, ErrSidecarMTLS) {
		t.Errorf("a sidecar's endpoint: cluster %v, endpoints %+v; want the sidecar's alone refused", cl.Err, cl.Endpoints)
	}

	s, _ = build(t, &clusterv3.Cluster_TransportSocketMatch{Name: "user", TransportSocket: &corev3.TransportSocket{Name: "envoy.transport_sockets.tls",
		ConfigType: &corev3.TransportSocket_TypedConfig{TypedConfig: mustAny(t, &tlsv3.UpstreamTlsContext{})}}})
	c = Compile(resources(s))
	if err := c.Clusters[outbound].Err; err == nil || !strings.Contains(err.Error(), `"user"`) {
		t.Errorf("a DestinationRule's TLS match: %v, want the cluster refused", err)
	}
}

func mustStruct(t *testing.T, m map[string]any) *structpb.Struct {
	t.Helper()
	s, err := structpb.NewStruct(m)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// TestOutboundClusterFromIstiod: the outbound cluster istiod sent
// reviews' own waypoint for an HTTPRoute backend bound to the namespace's
// waypoint (testdata/outbound-reviews-v1.json, `istioctl proxy-config
// clusters <reviews-waypoint pod> --fqdn reviews-v1.default.svc.cluster.local
// -o json` on the real node, istiod eed52ebb66ad) compiles.
func TestOutboundClusterFromIstiod(t *testing.T) {
	b, err := os.ReadFile("testdata/outbound-reviews-v1.json")
	if err != nil {
		t.Fatal(err)
	}
	var c clusterv3.Cluster
	if err := protojson.Unmarshal(b, &c); err != nil {
		t.Fatal(err)
	}
	s := golden(t, "base")
	s.Clusters = append(s.Clusters, &c)
	cfg := Compile(resources(s))
	cl := cfg.Clusters[c.GetName()]
	if cl == nil || cl.Err != nil || cfg.Err(ClusterType) != nil {
		t.Fatalf("%s: %+v; NACK %v", c.GetName(), cl, cfg.Err(ClusterType))
	}
	if !cl.SidecarMTLS || cl.Service != "reviews-v1.default.svc.cluster.local" {
		t.Errorf("compiled %+v", cl)
	}
}
