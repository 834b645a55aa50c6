package route

import (
	"errors"
	"net/http"
	"testing"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	matcherv3 "github.com/envoyproxy/go-control-plane/envoy/type/matcher/v3"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"github.com/amber-mesh/amber/waypoint/match"
)

func to(cluster string) *routev3.Route_Route {
	return &routev3.Route_Route{Route: &routev3.RouteAction{ClusterSpecifier: &routev3.RouteAction_Cluster{Cluster: cluster}}}
}

func mustNew(t *testing.T, rc *routev3.RouteConfiguration) *Config {
	t.Helper()
	c, err := New(rc)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func request(authority, path string, h http.Header) *match.Request {
	if h == nil {
		h = http.Header{}
	}
	return &match.Request{Method: "GET", Authority: authority, Path: path, Scheme: "http", Header: h}
}

func TestVirtualHostSelection(t *testing.T) {
	vh := func(name string, domains ...string) *routev3.VirtualHost {
		return &routev3.VirtualHost{Name: name, Domains: domains, Routes: []*routev3.Route{
			{Match: &routev3.RouteMatch{PathSpecifier: &routev3.RouteMatch_Prefix{Prefix: "/"}}, Action: to(name)},
		}}
	}
	c := mustNew(t, &routev3.RouteConfiguration{VirtualHosts: []*routev3.VirtualHost{
		vh("any", "*"), vh("suffix", "*.example.com"), vh("longer-suffix", "*.a.example.com"),
		vh("prefix", "api.*"), vh("exact", "api.example.com"),
	}})
	cases := map[string]string{
		"api.example.com":  "exact",
		"API.Example.COM":  "exact",
		"x.a.example.com":  "longer-suffix",
		"b.example.com":    "suffix",
		"api.other":        "prefix",
		"productpage:9080": "any",
		// The port takes part in matching: neither exact nor *.example.com.
		"api.example.com:80": "prefix",
	}
	for host, want := range cases {
		r := c.Select(request(host, "/", nil))
		if r == nil || r.Forward.Cluster != want {
			t.Errorf("host %q: route %+v, want cluster %q", host, r, want)
		}
	}
	if _, err := New(&routev3.RouteConfiguration{VirtualHosts: []*routev3.VirtualHost{vh("a", "*"), vh("b", "*")}}); err == nil {
		t.Error("a repeated domain was accepted")
	}
	none := mustNew(t, &routev3.RouteConfiguration{VirtualHosts: []*routev3.VirtualHost{vh("x", "x.example.com")}})
	if r := none.Select(request("y", "/", nil)); r != nil {
		t.Errorf("no virtual host: got %v, want nil (404)", r.Name)
	}
}

func TestRouteMatch(t *testing.T) {
	route := func(name string, m *routev3.RouteMatch) *routev3.Route {
		return &routev3.Route{Name: name, Match: m, Action: to(name)}
	}
	exact := func(v string) *matcherv3.StringMatcher {
		return &matcherv3.StringMatcher{MatchPattern: &matcherv3.StringMatcher_Exact{Exact: v}}
	}
	c := mustNew(t, &routev3.RouteConfiguration{VirtualHosts: []*routev3.VirtualHost{{
		Name: "inbound|http|9080", Domains: []string{"*"}, Routes: []*routev3.Route{
			// Istio's request-routing task: end-user jason to v2.
			route("jason", &routev3.RouteMatch{PathSpecifier: &routev3.RouteMatch_Prefix{Prefix: "/"},
				Headers: []*routev3.HeaderMatcher{{Name: "end-user", HeaderMatchSpecifier: &routev3.HeaderMatcher_StringMatch{StringMatch: exact("jason")}}}}),
			route("exact", &routev3.RouteMatch{PathSpecifier: &routev3.RouteMatch_Path{Path: "/exact"}}),
			route("nocase", &routev3.RouteMatch{PathSpecifier: &routev3.RouteMatch_Prefix{Prefix: "/NoCase"}, CaseSensitive: wrapperspb.Bool(false)}),
			route("regex", &routev3.RouteMatch{PathSpecifier: &routev3.RouteMatch_SafeRegex{SafeRegex: &matcherv3.RegexMatcher{Regex: "/re/[0-9]+"}}}),
			route("separated", &routev3.RouteMatch{PathSpecifier: &routev3.RouteMatch_PathSeparatedPrefix{PathSeparatedPrefix: "/api"}}),
			route("query", &routev3.RouteMatch{PathSpecifier: &routev3.RouteMatch_Prefix{Prefix: "/q"},
				QueryParameters: []*routev3.QueryParameterMatcher{{Name: "v", QueryParameterMatchSpecifier: &routev3.QueryParameterMatcher_StringMatch{StringMatch: exact("2")}}}}),
			route("grpc", &routev3.RouteMatch{PathSpecifier: &routev3.RouteMatch_Prefix{Prefix: "/pkg.Svc/"}, Grpc: &routev3.RouteMatch_GrpcRouteMatchOptions{}}),
			route("prefix-with-query", &routev3.RouteMatch{PathSpecifier: &routev3.RouteMatch_Prefix{Prefix: "/p?a"}}),
			route("catch-all", &routev3.RouteMatch{PathSpecifier: &routev3.RouteMatch_Prefix{Prefix: "/"}}),
		},
	}}})
	cases := []struct {
		path   string
		header http.Header
		want   string
	}{
		{"/reviews/0", http.Header{"End-User": {"jason"}}, "jason"},
		{"/reviews/0", http.Header{"End-User": {"bob"}}, "catch-all"},
		{"/exact", nil, "exact"},
		{"/exact?x=1", nil, "exact"}, // path ignores the query
		{"/exact/more", nil, "catch-all"},
		{"/nocase/x", nil, "nocase"},
		{"/re/123", nil, "regex"},
		{"/re/123/x", nil, "catch-all"}, // regex is a full match
		{"/api", nil, "separated"},
		{"/api/v1", nil, "separated"},
		{"/apiv1", nil, "catch-all"},
		{"/q?v=2", nil, "query"},
		{"/q?v=3", nil, "catch-all"},
		{"/pkg.Svc/Call", http.Header{"Content-Type": {"application/grpc+proto"}}, "grpc"},
		{"/pkg.Svc/Call", http.Header{"Content-Type": {"application/grpcx"}}, "catch-all"},
		{"/p?a=1", nil, "prefix-with-query"}, // prefix sees the query
	}
	for _, tc := range cases {
		r := c.Select(request("reviews:9080", tc.path, tc.header))
		if r == nil || r.Name != tc.want {
			got := "<nil>"
			if r != nil {
				got = r.Name
			}
			t.Errorf("%s %v: route %s, want %s", tc.path, tc.header, got, tc.want)
		}
	}
}

// TestWeightedClusters: the walkthrough's 90/10 split, picked exactly as
// Envoy picks (random modulo the total weight against the cumulative
// weights), so a uniform random source gives exactly the weights.
func TestWeightedClusters(t *testing.T) {
	c := mustNew(t, &routev3.RouteConfiguration{VirtualHosts: []*routev3.VirtualHost{{
		Name: "v", Domains: []string{"*"}, Routes: []*routev3.Route{{
			Match: &routev3.RouteMatch{PathSpecifier: &routev3.RouteMatch_Prefix{Prefix: "/"}},
			Action: &routev3.Route_Route{Route: &routev3.RouteAction{ClusterSpecifier: &routev3.RouteAction_WeightedClusters{WeightedClusters: &routev3.WeightedCluster{
				Clusters: []*routev3.WeightedCluster_ClusterWeight{
					{Name: "inbound-vip|9080|http|reviews-v1.default.svc.cluster.local", Weight: wrapperspb.UInt32(90)},
					{Name: "inbound-vip|9080|http|reviews-v2.default.svc.cluster.local", Weight: wrapperspb.UInt32(10)},
				},
			}}}},
		}},
	}}})
	f := c.Select(request("reviews:9080", "/", nil)).Forward
	counts := map[string]int{}
	for r := uint64(0); r < 1000; r++ {
		name, _, ok := f.Pick(r * 7919) // any sequence covering the residues evenly
		if !ok {
			t.Fatal("no cluster")
		}
		counts[name]++
	}
	if counts["inbound-vip|9080|http|reviews-v1.default.svc.cluster.local"] != 900 || counts["inbound-vip|9080|http|reviews-v2.default.svc.cluster.local"] != 100 {
		t.Errorf("split %v, want 900/100", counts)
	}
	zero := &Forward{Weighted: []WeightedCluster{{Name: "a"}, {Name: "b"}}}
	if _, _, ok := zero.Pick(3); ok {
		t.Error("all weights zero picked a cluster; the data path must answer 500")
	}
}

func TestActions(t *testing.T) {
	rc := &routev3.RouteConfiguration{
		RequestHeadersToAdd: []*corev3.HeaderValueOption{{Header: &corev3.HeaderValue{Key: "x-level", Value: "config"}, AppendAction: corev3.HeaderValueOption_OVERWRITE_IF_EXISTS_OR_ADD}},
		VirtualHosts: []*routev3.VirtualHost{{
			Name: "v", Domains: []string{"*"},
			RequestHeadersToAdd: []*corev3.HeaderValueOption{{Header: &corev3.HeaderValue{Key: "x-level", Value: "vhost"}, AppendAction: corev3.HeaderValueOption_OVERWRITE_IF_EXISTS_OR_ADD}},
			Routes: []*routev3.Route{
				{Name: "redirect", Match: &routev3.RouteMatch{PathSpecifier: &routev3.RouteMatch_Prefix{Prefix: "/old"}},
					Action: &routev3.Route_Redirect{Redirect: &routev3.RedirectAction{
						SchemeRewriteSpecifier: &routev3.RedirectAction_HttpsRedirect{HttpsRedirect: true},
						PathRewriteSpecifier:   &routev3.RedirectAction_PrefixRewrite{PrefixRewrite: "/new"},
					}}},
				{Name: "direct", Match: &routev3.RouteMatch{PathSpecifier: &routev3.RouteMatch_Prefix{Prefix: "/gone"}},
					Action: &routev3.Route_DirectResponse{DirectResponse: &routev3.DirectResponseAction{Status: 500}}},
				{Name: "forward", Match: &routev3.RouteMatch{PathSpecifier: &routev3.RouteMatch_Prefix{Prefix: "/v1/"}},
					RequestHeadersToAdd: []*corev3.HeaderValueOption{
						{Header: &corev3.HeaderValue{Key: "x-level", Value: "route"}},
						{Header: &corev3.HeaderValue{Key: "x-pct", Value: "100%%"}},
					},
					RequestHeadersToRemove: []string{"x-remove"},
					Action: &routev3.Route_Route{Route: &routev3.RouteAction{
						ClusterSpecifier:     &routev3.RouteAction_Cluster{Cluster: "c"},
						PrefixRewrite:        "/v2/",
						Timeout:              durationpb.New(0),
						HostRewriteSpecifier: &routev3.RouteAction_HostRewriteLiteral{HostRewriteLiteral: "backend"},
						UpgradeConfigs:       []*routev3.RouteAction_UpgradeConfig{{UpgradeType: "websocket"}},
					}}},
			},
		}},
	}
	c := mustNew(t, rc)

	r := c.Select(request("example.com:80", "/old/page?q=1", nil))
	if r.Redirect == nil || r.Redirect.Code != 301 {
		t.Fatalf("redirect route %+v", r)
	}
	if got, want := r.Location("http", "example.com:80", "/old/page?q=1"), "https://example.com/new/page?q=1"; got != want {
		t.Errorf("location %q, want %q (port 80 dropped for https)", got, want)
	}
	if d := c.Select(request("x", "/gone", nil)).Direct; d == nil || d.Status != 500 {
		t.Errorf("direct response %+v", d)
	}

	r = c.Select(request("x", "/v1/items?z", nil))
	f := r.Forward
	if f.Timeout != 0 || f.HostRewrite != "backend" || len(f.Upgrades) != 1 || f.Upgrades[0] != "websocket" || f.ClusterNotFound != 503 {
		t.Errorf("forward %+v", f)
	}
	if got := r.UpstreamPath("/v1/items?z"); got != "/v2/items?z" {
		t.Errorf("upstream path %q", got)
	}
	h := http.Header{"X-Remove": {"1"}, "X-Level": {"client"}}
	for _, m := range r.RequestMutations() {
		m.Apply(h)
	}
	// Route first (appends), then vhost and config overwrite: the least
	// specific level wins, Envoy's default.
	if got := h.Values("X-Level"); len(got) != 1 || got[0] != "config" {
		t.Errorf("x-level %v, want [config]", got)
	}
	if h.Get("X-Pct") != "100%" || h.Get("X-Remove") != "" {
		t.Errorf("headers %v", h)
	}

	// An unset timeout is Envoy's 15 s.
	d := mustNew(t, &routev3.RouteConfiguration{VirtualHosts: []*routev3.VirtualHost{{Name: "v", Domains: []string{"*"}, Routes: []*routev3.Route{
		{Match: &routev3.RouteMatch{PathSpecifier: &routev3.RouteMatch_Prefix{Prefix: "/"}}, Action: to("c")}}}}})
	if got := d.Select(request("x", "/", nil)).Forward.Timeout; got != 15*time.Second {
		t.Errorf("default timeout %v", got)
	}
}

func TestUnsupportedRouteConfig(t *testing.T) {
	base := func(mut func(*routev3.Route)) *routev3.RouteConfiguration {
		r := &routev3.Route{Match: &routev3.RouteMatch{PathSpecifier: &routev3.RouteMatch_Prefix{Prefix: "/"}}, Action: to("c")}
		mut(r)
		return &routev3.RouteConfiguration{VirtualHosts: []*routev3.VirtualHost{{Name: "v", Domains: []string{"*"}, Routes: []*routev3.Route{r}}}}
	}
	cases := map[string]*routev3.RouteConfiguration{
		"header value with a format command": base(func(r *routev3.Route) {
			r.RequestHeadersToAdd = []*corev3.HeaderValueOption{{Header: &corev3.HeaderValue{Key: "x", Value: "%DOWNSTREAM_REMOTE_ADDRESS%"}}}
		}),
		"pseudo-header mutation": base(func(r *routev3.Route) { r.RequestHeadersToRemove = []string{":authority"} }),
		"cluster header": base(func(r *routev3.Route) {
			r.Action = &routev3.Route_Route{Route: &routev3.RouteAction{ClusterSpecifier: &routev3.RouteAction_ClusterHeader{ClusterHeader: "x"}}}
		}),
		"runtime fraction": base(func(r *routev3.Route) { r.Match.RuntimeFraction = &corev3.RuntimeFractionalPercent{} }),
		"unknown retry condition": base(func(r *routev3.Route) {
			r.GetRoute().RetryPolicy = &routev3.RetryPolicy{RetryOn: "5xx,envoy-ratelimited"}
		}),
	}
	for name, rc := range cases {
		if _, err := New(rc); !errors.Is(err, ErrUnsupported) {
			t.Errorf("%s: error %v, want ErrUnsupported", name, err)
		}
	}
}

// TestIstioDefaultRetry: the policy istiod gives every waypoint route
// (pilot/pkg/networking/core/route/retry/retry.go DefaultPolicy).
func TestIstioDefaultRetry(t *testing.T) {
	p, err := newRetryPolicy(&routev3.RetryPolicy{
		RetryOn:                       "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes",
		NumRetries:                    wrapperspb.UInt32(2),
		RetryHostPredicate:            []*routev3.RetryPolicy_RetryHostPredicate{{Name: "envoy.retry_host_predicates.previous_hosts"}},
		HostSelectionRetryMaxAttempts: 5,
	})
	if err != nil {
		t.Fatal(err)
	}
	cases := []struct {
		o    Outcome
		want bool
	}{
		{Outcome{ConnectFailure: true}, true},
		{Outcome{RefusedStream: true}, true},
		// retriable-status-codes without codes: none, whatever the client asks.
		{Outcome{Status: 503}, false},
		{Outcome{Status: 500}, false},
		{Outcome{Status: 200, GRPCStatus: "14"}, true},
		{Outcome{Status: 200, GRPCStatus: "1"}, true},
		{Outcome{Status: 200, GRPCStatus: "2"}, false},
		{Outcome{Reset: true, RequestSent: true}, false},
	}
	for _, c := range cases {
		if got := p.Retriable(c.o); got != c.want {
			t.Errorf("%+v: retriable %v, want %v", c.o, got, c.want)
		}
	}
	if p.NumRetries != 2 || !p.PreviousHosts || p.HostSelectionAttempts != 5 {
		t.Errorf("policy %+v", p)
	}
}

// A VirtualService's retries.retryOn with status codes.
func TestRetryStatusCodes(t *testing.T) {
	p, err := newRetryPolicy(&routev3.RetryPolicy{RetryOn: "gateway-error,retriable-status-codes", RetriableStatusCodes: []uint32{409}})
	if err != nil {
		t.Fatal(err)
	}
	for status, want := range map[int]bool{409: true, 502: true, 503: true, 504: true, 500: false, 200: false} {
		if got := p.Retriable(Outcome{Status: status}); got != want {
			t.Errorf("status %d: retriable %v, want %v", status, got, want)
		}
	}
	if p.NumRetries != 1 {
		t.Errorf("num_retries unset: %d, want Envoy's 1", p.NumRetries)
	}
	// gateway-error covers a reset (and a per-try timeout), which becomes
	// a 503, as 5xx does (Envoy's wouldRetryFromReset).
	for _, o := range []Outcome{{Reset: true, RequestSent: true}, {ConnectFailure: true}, {RefusedStream: true}} {
		if !p.Retriable(o) {
			t.Errorf("%+v: not retriable under gateway-error", o)
		}
	}
}

// TestStreamTimeoutOverrides: a route's idle_timeout and
// max_stream_duration replace the HCM's; set to 0s they turn it off,
// unset they leave it (Envoy's optional fields).
func TestStreamTimeoutOverrides(t *testing.T) {
	action := func(edit func(*routev3.RouteAction)) *Forward {
		t.Helper()
		a := &routev3.RouteAction{ClusterSpecifier: &routev3.RouteAction_Cluster{Cluster: "c"}}
		edit(a)
		c := mustNew(t, &routev3.RouteConfiguration{VirtualHosts: []*routev3.VirtualHost{{Name: "vh", Domains: []string{"*"}, Routes: []*routev3.Route{
			{Match: &routev3.RouteMatch{PathSpecifier: &routev3.RouteMatch_Prefix{Prefix: "/"}}, Action: &routev3.Route_Route{Route: a}},
		}}}})
		return c.Select(request("x", "/", nil)).Forward
	}
	for _, tc := range []struct {
		name            string
		edit            func(*routev3.RouteAction)
		idle, maxStream time.Duration
	}{
		{"unset", func(*routev3.RouteAction) {}, 0, 0},
		{"set", func(a *routev3.RouteAction) {
			a.IdleTimeout = durationpb.New(time.Minute)
			a.MaxStreamDuration = &routev3.RouteAction_MaxStreamDuration{MaxStreamDuration: durationpb.New(time.Hour)}
		}, time.Minute, time.Hour},
		{"zero", func(a *routev3.RouteAction) {
			a.IdleTimeout = durationpb.New(0)
			a.MaxStreamDuration = &routev3.RouteAction_MaxStreamDuration{MaxStreamDuration: durationpb.New(0)}
		}, -1, -1},
		{"grpc header only", func(a *routev3.RouteAction) {
			a.MaxStreamDuration = &routev3.RouteAction_MaxStreamDuration{GrpcTimeoutHeaderMax: durationpb.New(time.Second)}
		}, 0, 0},
	} {
		f := action(tc.edit)
		if f.IdleTimeout != tc.idle || f.MaxStreamDuration != tc.maxStream {
			t.Errorf("%s: idle %v, max stream duration %v; want %v, %v", tc.name, f.IdleTimeout, f.MaxStreamDuration, tc.idle, tc.maxStream)
		}
	}
}
