package config

import (
	"errors"
	"net/http"
	"net/netip"
	"strings"
	"testing"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"

	"github.com/amber-mesh/amber/test/waypointgolden"
	"github.com/amber-mesh/amber/waypoint/match"
)

func routerResources(s *waypointgolden.Snapshot) Resources {
	return Resources{Listeners: s.Listeners, Clusters: s.Clusters, Endpoints: s.Endpoints, Routes: s.Routes, Secrets: s.Secrets, Router: true}
}

func loadRouter(t *testing.T, scenario string) *waypointgolden.Snapshot {
	t.Helper()
	s, err := waypointgolden.Load(latest(t), scenario)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

const productpage = "outbound|9080||productpage.default.svc.cluster.local"

// TestCompileRouterGoldens: everything a real istiod sent an ingress
// gateway compiles without a problem, every listener usable.
func TestCompileRouterGoldens(t *testing.T) {
	scenarios, err := waypointgolden.Scenarios(latest(t))
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, sc := range scenarios {
		if !strings.HasPrefix(sc, "router-") {
			continue
		}
		n++
		t.Run(sc, func(t *testing.T) {
			c := Compile(routerResources(loadRouter(t, sc)))
			for _, p := range c.Problems {
				t.Errorf("problem: %v", p)
			}
			if !c.Router || c.Originate == nil || len(c.Gateways) == 0 {
				t.Fatalf("router %v originate %v gateways %v", c.Router, c.Originate, c.Gateways)
			}
			for name, g := range c.Gateways {
				if g.Chain.Err != nil || g.Chain.HTTP == nil || g.Chain.HTTP.Routes == nil || len(g.Addresses) == 0 {
					t.Errorf("gateway %s: %+v %+v", name, g, g.Chain)
				}
			}
			for name, cl := range c.Clusters {
				if cl.Err != nil {
					t.Errorf("cluster %s: %v", name, cl.Err)
				}
			}
			if eps := c.Clusters[productpage].Endpoints; len(eps) != 1 || !eps[0].HBONE || eps[0].Err != nil {
				t.Errorf("productpage endpoints %+v", eps)
			}
		})
	}
	if n < 3 {
		t.Errorf("%d router scenarios", n)
	}
}

// The walkthrough's gateway: listener 8080 (server port 80 through the
// Service's targetPort), RDS http.8080 with bookinfo's paths, Envoy's
// gateway HCM settings, HBONE to productpage's pod.
func TestRouterBookinfo(t *testing.T) {
	c := Compile(routerResources(loadRouter(t, "router-bookinfo-gateway")))
	g := c.Gateways["0.0.0.0_8080"]
	if g == nil || g.Chain.HTTP == nil {
		t.Fatalf("no usable 0.0.0.0_8080: %+v", c.Gateways)
	}
	if len(g.Addresses) != 1 || g.Addresses[0] != netip.MustParseAddrPort("0.0.0.0:8080") {
		t.Errorf("addresses %v", g.Addresses)
	}
	h := g.Chain.HTTP
	if h.RouteName != "http.8080" || !h.UseRemoteAddress || h.ServerName != "istio-envoy" || !h.Path.Normalize ||
		!h.GenerateRequestID || h.StreamIdleTimeout != 0 || h.Stats == nil {
		t.Errorf("connection manager %+v", h)
	}
	if h.Stats.Reporter != "UNSPECIFIED" {
		t.Errorf("istio.stats reporter %q: a gateway's is unset (reporter=source)", h.Stats.Reporter)
	}
	for path, want := range map[string]bool{"/productpage": true, "/static/x.css": true, "/login": true, "/api/v1/products/1": true, "/productpage/x": false, "/admin": false} {
		r := h.Routes.Select(&match.Request{Method: http.MethodGet, Authority: "istio-ingressgateway.istio-system", Path: path, Scheme: "http", Header: http.Header{}})
		if got := r != nil; got != want {
			t.Errorf("%s: routed %v, want %v", path, got, want)
			continue
		}
		if r != nil {
			if name, _, ok := r.Forward.Pick(0); !ok || name != productpage {
				t.Errorf("%s: cluster %q", path, name)
			}
		}
	}
	ep := c.Clusters[productpage].Endpoints[0]
	if ep.Address != netip.MustParseAddrPort("10.244.0.10:9080") || ep.Via.IsValid() || !c.Clusters[productpage].SidecarMTLS {
		t.Errorf("endpoint %+v", ep)
	}
	if c.Clusters[BlackHole] == nil || len(c.Clusters[BlackHole].Endpoints) != 0 {
		t.Errorf("black hole %+v", c.Clusters[BlackHole])
	}
	if got := c.Originate.SANPrefixes; len(got) != 1 || got[0] != "spiffe://cluster.local/" {
		t.Errorf("originate SAN prefixes %v", got)
	}
}

// With istio.io/ingress-use-waypoint the endpoint is the waypoint: HBONE
// to its pod, CONNECT to the Service's VIP.
func TestRouterUseWaypoint(t *testing.T) {
	c := Compile(routerResources(loadRouter(t, "router-ingress-use-waypoint")))
	eps := c.Clusters[productpage].Endpoints
	if len(eps) != 1 || eps[0].Via != netip.MustParseAddrPort("10.244.0.20:15008") || eps[0].Address != netip.MustParseAddrPort("10.96.10.1:9080") || !eps[0].HBONE {
		t.Errorf("endpoints %+v", eps)
	}
	// The same EDS on a waypoint stays refused.
	w := Compile(Resources{Endpoints: loadRouter(t, "router-ingress-use-waypoint").Endpoints})
	if w.Err(EndpointType) == nil {
		t.Error("a waypoint accepted an endpoint through another waypoint")
	}
}

// The Gateway API form: listener 80, PathPrefix as path_separated_prefix,
// cluster_not_found_response_code.
func TestRouterGatewayAPI(t *testing.T) {
	c := Compile(routerResources(loadRouter(t, "router-gateway-api")))
	g := c.Gateways["0.0.0.0_80"]
	if g == nil || g.Chain.HTTP == nil || g.Chain.HTTP.RouteName != "http.80" {
		t.Fatalf("gateways %+v", c.Gateways)
	}
	sel := func(path string) bool {
		return g.Chain.HTTP.Routes.Select(&match.Request{Method: http.MethodGet, Authority: "x", Path: path, Scheme: "http", Header: http.Header{}}) != nil
	}
	if !sel("/static") || !sel("/static/a") || sel("/staticx") {
		t.Error("PathPrefix /static is not path-separated")
	}
}

// Fail closed: a route configuration not yet received refuses the
// listener's requests without a NACK; one the allow-list refuses is a
// problem of RDS and refuses them too; an unknown HTTP filter NACKs the
// listener.
func TestRouterFailClosed(t *testing.T) {
	s := loadRouter(t, "router-bookinfo-gateway")
	r := routerResources(s)
	r.Routes = nil
	c := Compile(r)
	if g := c.Gateways["0.0.0.0_8080"]; g.Chain.Err == nil || !errors.Is(g.Chain.Err, errRouteMissing) || c.Err("") != nil {
		t.Errorf("without RDS: chain err %v, problems %v", g.Chain.Err, c.Err(""))
	}

	rc := proto.Clone(s.Routes[0]).(*routev3.RouteConfiguration)
	rc.VirtualHosts[0].Routes[0].TypedPerFilterConfig = map[string]*anypb.Any{"envoy.filters.http.lua": {TypeUrl: "type.googleapis.com/envoy.extensions.filters.http.lua.v3.LuaPerRoute"}}
	r = routerResources(s)
	r.Routes = []*routev3.RouteConfiguration{rc}
	c = Compile(r)
	if c.Err(RouteType) == nil || c.Gateways["0.0.0.0_8080"].Chain.Err == nil {
		t.Errorf("per-route Lua: rds problems %v, chain %v", c.Err(RouteType), c.Gateways["0.0.0.0_8080"].Chain.Err)
	}
}

// The Gateway API HTTPS listener: TLS with the Secret istiod served over
// SDS, for bookinfo.example.com; without the Secret, or with one whose key
// does not parse, the listener refuses (the latter a problem of SDS).
func TestRouterTLS(t *testing.T) {
	s := loadRouter(t, "router-gateway-api-tls")
	c := Compile(routerResources(s))
	g := c.Gateways["0.0.0.0_443"]
	if g == nil || g.Chain.Err != nil || g.TLS == nil || g.TLS.Certificate == nil {
		t.Fatalf("0.0.0.0_443: %+v", g)
	}
	if g.TLS.SecretName != "kubernetes-gateway://default/bookinfo-cert" || !g.TLS.MatchesSNI("bookinfo.example.com") || g.TLS.MatchesSNI("evil.example.com") ||
		len(g.TLS.ALPN) != 2 {
		t.Errorf("TLS %+v", g.TLS)
	}
	if g.Chain.HTTP.RouteName != "https.443.default.bookinfo-gateway~istio-autogenerated-k8s-gateway~https.default" {
		t.Errorf("route %q", g.Chain.HTTP.RouteName)
	}

	r := routerResources(s)
	r.Secrets = nil
	c = Compile(r)
	if g := c.Gateways["0.0.0.0_443"]; !errors.Is(g.Chain.Err, errSecretMissing) || c.Err("") != nil || c.Gateways["0.0.0.0_80"].Chain.Err != nil {
		t.Errorf("without the secret: %v; problems %v", g.Chain.Err, c.Err(""))
	}

	bad := proto.Clone(s.Secrets[0]).(*tlsv3.Secret)
	bad.GetTlsCertificate().GetPrivateKey().Specifier = &corev3.DataSource_InlineBytes{InlineBytes: []byte("not a key")}
	r.Secrets = []*tlsv3.Secret{bad}
	c = Compile(r)
	if c.Err(SecretType) == nil || c.Gateways["0.0.0.0_443"].Chain.Err == nil {
		t.Errorf("a bad key: problems %v, chain %v", c.Err(SecretType), c.Gateways["0.0.0.0_443"].Chain.Err)
	}
	if strings.Contains(c.Err(SecretType).Error(), "not a key") {
		t.Error("the problem quotes the key material")
	}
}
