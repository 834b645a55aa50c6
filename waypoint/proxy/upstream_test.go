package proxy_test

import (
	"context"
	"errors"
	"net/http"
	"net/netip"
	"strconv"
	"strings"
	"testing"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	luav3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/lua/v3"
	hcmv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	httpv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/upstreams/http/v3"
	"google.golang.org/protobuf/types/known/anypb"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"github.com/amber-mesh/amber/tunnel/hbone"
	"github.com/amber-mesh/amber/waypoint/config"
	"github.com/amber-mesh/amber/xds/state"
)

const upstreamErr = "upstream connect error or disconnect/reset before headers. reset reason: "

// checkReply checks a local reply: status, body, Envoy's headers, the
// access log's flags and the refusal counter.
func (m *mesh) checkReply(t *testing.T, resp *http.Response, body string, status int, wantBody, flags, cause string) {
	t.Helper()
	if resp.StatusCode != status || body != wantBody {
		t.Errorf("got %d %q, want %d %q", resp.StatusCode, body, status, wantBody)
	}
	if resp.Header.Get("Server") != "istio-envoy" || resp.Header.Get("Date") == "" {
		t.Errorf("local reply headers %v", resp.Header)
	}
	if wantBody != "" && resp.Header.Get("Content-Type") != "text/plain" {
		t.Errorf("content-type %q", resp.Header.Get("Content-Type"))
	}
	// Telemetry and the access log follow the response (waitSample).
	m.waitSample("istio_requests_total", func(l map[string]string) bool {
		return l["response_code"] == strconv.Itoa(status) && l["response_flags"] == flags
	})
	if lines := m.logs.lines(map[string]any{"status": status, "flags": flags}); len(lines) == 0 {
		t.Errorf("no access-log line with status %d flags %s:\n%s", status, flags, m.logs.buf.String())
	}
	if cause != "" {
		if n := m.refused(cause); n < 1 {
			t.Errorf("amber_waypoint_refused_total{cause=%q} = %v", cause, n)
		}
	}
}

func TestNoHealthyUpstream(t *testing.T) {
	m := newMesh(t, meshOptions{})
	s := golden(t, "base")
	endpoints(t, s, productpageCluster).Endpoints = nil
	m.wp.Update(compile(t, s))
	resp, body := do(t, m.sleep().http1(productpageVIP), "GET", "http://productpage:9080/", nil, nil)
	m.checkReply(t, resp, body, 503, "no healthy upstream", "UH", "no_healthy_upstream")
}

func TestUpstreamConnectFailure(t *testing.T) {
	t.Run("destination ztunnel refuses the CONNECT", func(t *testing.T) {
		m := newMesh(t, meshOptions{})
		m.wp.Update(compile(t, golden(t, "base")))
		pp := m.pods["productpage-v1"]
		pp.reject.Store(http.StatusUnauthorized)
		before := len(pp.seenPeers())
		resp, body := do(t, m.sleep().http1(productpageVIP), "GET", "http://productpage:9080/", nil, nil)
		// istiod's default policy retries connect failures twice; the one
		// endpoint is tried again (no other host), then the limit is hit.
		m.checkReply(t, resp, body, 503, upstreamErr+"connection failure", "UF,URX", "upstream_connect_error")
		if n := len(pp.seenPeers()) - before; n != 3 {
			t.Errorf("%d CONNECTs to productpage, want 3 (1 + 2 retries)", n)
		}
	})
	t.Run("nothing listens", func(t *testing.T) {
		m := newMesh(t, meshOptions{})
		m.wp.Update(compile(t, golden(t, "base")))
		m.unroute(netip.MustParseAddrPort("10.244.0.10:15008"))
		resp, body := do(t, m.sleep().http1(productpageVIP), "GET", "http://productpage:9080/", nil, nil)
		m.checkReply(t, resp, body, 503, upstreamErr+"connection failure", "UF,URX", "upstream_connect_error")
	})
}

// TestDestinationIdentity: the peer at the endpoint must be exactly the
// identity workload discovery gives the pod (Envoy would accept any
// identity of the trust domain), and an endpoint discovery does not know
// is refused.
func TestDestinationIdentity(t *testing.T) {
	t.Run("another identity at the pod's address", func(t *testing.T) {
		m := newMesh(t, meshOptions{certAs: map[string]string{"productpage-v1": "spiffe://cluster.local/ns/default/sa/bookinfo-details"}})
		m.wp.Update(compile(t, golden(t, "base")))
		resp, body := do(t, m.sleep().http1(productpageVIP), "GET", "http://productpage:9080/", nil, nil)
		m.checkReply(t, resp, body, 503, upstreamErr+"connection failure", "UF,URX", "upstream_identity")
		if n := len(m.pods["productpage-v1"].app.requests()); n != 0 {
			t.Errorf("the impostor's application got %d requests", n)
		}
		if n := m.counter("amber_waypoint_hbone_client_total", map[string]string{"event": "dial_errors"}); n < 1 {
			t.Errorf("dial_errors %v", n)
		}
	})
	t.Run("no workload at the endpoint", func(t *testing.T) {
		m := newMesh(t, meshOptions{})
		m.wp.Update(compile(t, golden(t, "base")))
		m.store.Update(func(tx *state.Txn) { tx.RemoveWorkload("Kubernetes//Pod/default/productpage-v1") })
		resp, body := do(t, m.sleep().http1(productpageVIP), "GET", "http://productpage:9080/", nil, nil)
		m.checkReply(t, resp, body, 503, upstreamErr+"connection failure", "UF,URX", "upstream_identity")
		if n := len(m.pods["productpage-v1"].seenPeers()); n != 0 {
			t.Errorf("%d CONNECTs reached a pod whose identity is unknown", n)
		}
	})
}

func TestNoRoute(t *testing.T) {
	m := newMesh(t, meshOptions{})
	s := golden(t, "base")
	editRoute(t, s, productpageChain, func(r *routev3.Route) {
		r.Match.PathSpecifier = &routev3.RouteMatch_Prefix{Prefix: "/productpage"}
	})
	m.wp.Update(compile(t, s))
	hc := m.sleep().http1(productpageVIP)
	resp, body := do(t, hc, "GET", "http://productpage:9080/other", nil, nil)
	m.checkReply(t, resp, body, 404, "", "NR", "no_route")
	if resp, _ := do(t, hc, "GET", "http://productpage:9080/productpage", nil, nil); resp.StatusCode != 200 {
		t.Errorf("matching route: %d", resp.StatusCode)
	}
}

func TestAllWeightsZero(t *testing.T) {
	m := newMesh(t, meshOptions{})
	s := golden(t, "httproute-reviews-90-10")
	editRoute(t, s, reviewsChain, func(r *routev3.Route) {
		wc := r.GetRoute().GetWeightedClusters()
		wc.TotalWeight = nil
		for _, c := range wc.GetClusters() {
			c.Weight = wrapperspb.UInt32(0)
		}
	})
	m.wp.Update(compile(t, s))
	resp, body := do(t, m.sleep().http1(reviewsVIP), "GET", "http://reviews:9080/", nil, nil)
	m.checkReply(t, resp, body, 500, "", "NC", "no_cluster")
}

// TestConnectRefusals: what the waypoint answers a CONNECT it cannot
// serve, before any tunnel is accepted.
func TestConnectRefusals(t *testing.T) {
	m := newMesh(t, meshOptions{})
	sleep := m.sleep()
	status := func(authority string) int {
		t.Helper()
		s, err := sleep.connect(context.Background(), authority)
		var se *hbone.StatusError
		if !errors.As(err, &se) {
			if s != nil {
				s.Close()
			}
			t.Fatalf("CONNECT %s: %v, want a refusal", authority, err)
		}
		return se.Code
	}
	if got := status(productpageVIP); got != 503 || m.refused("no_config") != 1 {
		t.Errorf("before any configuration: %d, want 503 (counted no_config)", got)
	}
	m.wp.Update(compile(t, golden(t, "base")))
	if got := status("10.96.99.99:80"); got != 400 || m.refused("no_filter_chain") != 1 {
		t.Errorf("unknown destination: %d, want 400 (counted no_filter_chain)", got)
	}
	// A chain with a filter amber does not implement fails closed; the
	// others keep working.
	s := golden(t, "base")
	editHCM(t, s, productpageChain, func(h *hcmv3.HttpConnectionManager) {
		lua, _ := anypb.New(&luav3.Lua{DefaultSourceCode: &corev3.DataSource{Specifier: &corev3.DataSource_InlineString{InlineString: "function envoy_on_request(h) end"}}})
		h.HttpFilters = append([]*hcmv3.HttpFilter{{Name: "lua", ConfigType: &hcmv3.HttpFilter_TypedConfig{TypedConfig: lua}}}, h.HttpFilters...)
	})
	c := config.Compile(config.Resources{Listeners: s.Listeners, Clusters: s.Clusters, Endpoints: s.Endpoints})
	if c.Err(config.ListenerType) == nil {
		t.Fatal("a Lua filter compiled")
	}
	m.wp.Update(c)
	if got := status(productpageVIP); got != 503 || m.refused("chain_refused") != 1 {
		t.Errorf("refused chain: %d, want 503 (counted chain_refused)", got)
	}
	if resp, _ := do(t, sleep.http1(reviewsVIP), "GET", "http://reviews:9080/", nil, nil); resp.StatusCode != 200 {
		t.Errorf("another service beside the refused chain: %d", resp.StatusCode)
	}
	if n := m.counter("amber_waypoint_config_problems", nil); n < 1 {
		t.Errorf("amber_waypoint_config_problems %v", n)
	}
}

// TestRetryOtherHost: istiod's default retry policy sends a request whose
// connection failed to another endpoint.
func TestRetryOtherHost(t *testing.T) {
	m := newMesh(t, meshOptions{})
	m.wp.Update(compile(t, golden(t, "base")))
	m.pods["reviews-v1"].reject.Store(http.StatusServiceUnavailable)
	hc := m.sleep().http1(reviewsVIP)
	for range 20 {
		resp, _ := do(t, hc, "GET", "http://reviews:9080/", nil, nil)
		if resp.StatusCode != 200 || resp.Header.Get("X-Backend") != "reviews-v2" {
			t.Fatalf("%d from %q, want 200 from reviews-v2", resp.StatusCode, resp.Header.Get("X-Backend"))
		}
	}
	if len(m.pods["reviews-v1"].seenPeers()) == 0 {
		t.Fatal("reviews-v1 was never tried: the test proves nothing")
	}
	if lines := m.logs.lines(map[string]any{"status": 200, "attempts": 2}); len(lines) == 0 {
		t.Errorf("no request logged with 2 attempts")
	}
}

// TestHTTPVersions: HTTP/2 with prior knowledge from the client; the
// version to the application is what the cluster says (istiod's service
// clusters say nothing: HTTP/1.1), HTTP/2 when it asks for it, the
// client's when it asks for the downstream protocol.
func TestHTTPVersions(t *testing.T) {
	opts := func(o *httpv3.HttpProtocolOptions) *anypb.Any {
		a, err := anypb.New(o)
		if err != nil {
			t.Fatal(err)
		}
		return a
	}
	for _, tc := range []struct {
		name    string
		options *httpv3.HttpProtocolOptions
		h1, h2  string // what the application sees from an HTTP/1.1 and an HTTP/2 client
	}{
		{"istiod's default", nil, "HTTP/1.1", "HTTP/1.1"},
		{"explicit http2", &httpv3.HttpProtocolOptions{UpstreamProtocolOptions: &httpv3.HttpProtocolOptions_ExplicitHttpConfig_{
			ExplicitHttpConfig: &httpv3.HttpProtocolOptions_ExplicitHttpConfig{ProtocolConfig: &httpv3.HttpProtocolOptions_ExplicitHttpConfig_Http2ProtocolOptions{}}}}, "HTTP/2.0", "HTTP/2.0"},
		{"downstream's", &httpv3.HttpProtocolOptions{UpstreamProtocolOptions: &httpv3.HttpProtocolOptions_UseDownstreamProtocolConfig{
			UseDownstreamProtocolConfig: &httpv3.HttpProtocolOptions_UseDownstreamHttpConfig{}}}, "HTTP/1.1", "HTTP/2.0"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			m := newMesh(t, meshOptions{})
			s := golden(t, "base")
			if tc.options != nil {
				cluster(t, s, productpageCluster).TypedExtensionProtocolOptions = map[string]*anypb.Any{
					"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": opts(tc.options),
				}
			}
			m.wp.Update(compile(t, s))
			sleep := m.sleep()
			for _, c := range []struct {
				hc   *http.Client
				want string
			}{{sleep.http1(productpageVIP), tc.h1}, {sleep.http2(productpageVIP), tc.h2}} {
				for range 3 {
					resp, body := do(t, c.hc, "GET", "http://productpage:9080/p", nil, nil)
					if resp.StatusCode != 200 || !strings.Contains(body, `"proto":"`+c.want+`"`) {
						t.Fatalf("client %s: %d %s, want the application to see %s", resp.Proto, resp.StatusCode, body, c.want)
					}
				}
			}
			// Local replies inside HTTP/2 work the same.
			resp, body := do(t, sleep.http2(productpageVIP), "GET", "http://productpage:9080/p", http.Header{"X": {"1"}}, nil)
			if resp.ProtoMajor != 2 || resp.StatusCode != 200 {
				t.Fatalf("h2: %s %d %s", resp.Proto, resp.StatusCode, body)
			}
		})
	}
}

func TestHTTP2LocalReply(t *testing.T) {
	m := newMesh(t, meshOptions{})
	m.wp.Update(compile(t, golden(t, "authz-productpage-viewer")))
	resp, body := do(t, m.sleep().http2(productpageVIP), "DELETE", "http://productpage:9080/productpage", nil, nil)
	if resp.ProtoMajor != 2 {
		t.Fatalf("not HTTP/2: %s", resp.Proto)
	}
	m.checkReply(t, resp, body, 403, "RBAC: access denied", "-", "rbac_denied")
	// gRPC requests get Envoy's trailers-only form of a local reply.
	resp, _ = do(t, m.sleep().http2(productpageVIP), "POST", "http://productpage:9080/pkg.Svc/M",
		http.Header{"Content-Type": {"application/grpc"}}, nil)
	if resp.StatusCode != 200 || resp.Header.Get("Grpc-Status") != "7" || resp.Header.Get("Grpc-Message") != "RBAC:%20access%20denied" {
		t.Errorf("gRPC denial: %d %v", resp.StatusCode, resp.Header)
	}
	m.waitSample("istio_requests_total", func(l map[string]string) bool {
		return l["request_protocol"] == "grpc" && l["grpc_response_status"] == "7" && l["response_code"] == "200"
	})
}

// TestMeshWideDestinationRule: the mesh-wide rule's
// max_requests_per_connection 1 gives every request its own upstream
// connection (a CONNECT each), and its outlier detection, which amber
// does not implement, is counted as degraded.
func TestMeshWideDestinationRule(t *testing.T) {
	m := newMesh(t, meshOptions{})
	m.wp.Update(compile(t, golden(t, "destinationrule-meshwide")))
	hc := m.sleep().http1(productpageVIP)
	for range 5 {
		if resp, _ := do(t, hc, "GET", "http://productpage:9080/", nil, nil); resp.StatusCode != 200 {
			t.Fatalf("%d", resp.StatusCode)
		}
	}
	if n := len(m.pods["productpage-v1"].seenPeers()); n != 5 {
		t.Errorf("%d CONNECTs for 5 requests, want one each", n)
	}
	if n := m.counter("amber_waypoint_config_degraded_fields", map[string]string{"reason": "resilience"}); n < 1 {
		t.Errorf("degraded resilience fields %v", n)
	}
}

// TestDirectResponseAndRedirect: route actions the waypoint answers
// itself.
func TestDirectResponseAndRedirect(t *testing.T) {
	m := newMesh(t, meshOptions{})
	s := golden(t, "base")
	editRoute(t, s, productpageChain, func(r *routev3.Route) {
		r.Action = &routev3.Route_DirectResponse{DirectResponse: &routev3.DirectResponseAction{Status: 418, Body: &corev3.DataSource{Specifier: &corev3.DataSource_InlineString{InlineString: "teapot"}}}}
	})
	editRoute(t, s, reviewsChain, func(r *routev3.Route) {
		r.Action = &routev3.Route_Redirect{Redirect: &routev3.RedirectAction{HostRedirect: "example.com", PathRewriteSpecifier: &routev3.RedirectAction_PathRedirect{PathRedirect: "/new"}}}
	})
	m.wp.Update(compile(t, s))
	sleep := m.sleep()
	resp, body := do(t, sleep.http1(productpageVIP), "GET", "http://productpage:9080/x", nil, nil)
	if resp.StatusCode != 418 || body != "teapot" {
		t.Errorf("direct response %d %q", resp.StatusCode, body)
	}
	resp, _ = do(t, sleep.http1(reviewsVIP), "GET", "http://reviews:9080/old?q=1", nil, nil)
	if resp.StatusCode != 301 || resp.Header.Get("Location") != "http://example.com/new?q=1" {
		t.Errorf("redirect %d %q", resp.StatusCode, resp.Header.Get("Location"))
	}
	if n := len(m.pods["productpage-v1"].app.requests()) + len(m.pods["reviews-v1"].app.requests()); n != 0 {
		t.Errorf("%d requests reached applications", n)
	}
}
