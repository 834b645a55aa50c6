package proxy_test

import (
	"context"
	"encoding/json"
	"net/http"
	"strings"
	"testing"

	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	matcherv3 "github.com/envoyproxy/go-control-plane/envoy/type/matcher/v3"

	"github.com/amber-mesh/amber/waypoint/config"
)

// TestWalkthroughPolicy is the walkthrough's L7 policy through the whole
// data path: sleep may GET productpage, sleep may not DELETE, notsleep may
// not GET; the denials are the waypoint's own 403 inside the tunnel.
func TestWalkthroughPolicy(t *testing.T) {
	m := newMesh(t, meshOptions{})
	m.wp.Update(compile(t, golden(t, "authz-productpage-viewer")))
	sleep := m.sleep().http1(productpageVIP)

	resp, body := do(t, sleep, "GET", "http://productpage:9080/productpage", nil, nil)
	if resp.StatusCode != http.StatusOK || resp.Header.Get("X-Backend") != "productpage-v1" {
		t.Fatalf("sleep GET: %d %v %q", resp.StatusCode, resp.Header, body)
	}
	var e echo
	if err := json.Unmarshal([]byte(body), &e); err != nil {
		t.Fatal(err)
	}
	if e.URI != "/productpage" || e.Host != "productpage:9080" || e.Proto != "HTTP/1.1" {
		t.Errorf("the application saw %+v", e)
	}
	if got := resp.Header.Get("Server"); got != "istio-envoy" {
		t.Errorf("server %q, want istio-envoy (the HCM's server_name)", got)
	}
	if peers := m.pods["productpage-v1"].seenPeers(); len(peers) == 0 || peers[0] != waypointID {
		t.Errorf("productpage's ztunnel saw peers %v, want the waypoint's identity", peers)
	}

	for _, tc := range []struct {
		name   string
		c      *http.Client
		method string
	}{
		{"sleep DELETE", sleep, "DELETE"},
		{"notsleep GET", m.client(notSleepID, nil).http1(productpageVIP), "GET"},
	} {
		resp, body := do(t, tc.c, tc.method, "http://productpage:9080/productpage", nil, nil)
		if resp.StatusCode != http.StatusForbidden || body != "RBAC: access denied" {
			t.Errorf("%s: %d %q, want 403 RBAC: access denied", tc.name, resp.StatusCode, body)
		}
		if ct := resp.Header.Get("Content-Type"); ct != "text/plain" || resp.Header.Get("Server") != "istio-envoy" {
			t.Errorf("%s: local reply headers %v", tc.name, resp.Header)
		}
	}
	if n := len(m.pods["productpage-v1"].app.requests()); n != 1 {
		t.Errorf("productpage served %d requests, want only the allowed one", n)
	}
	if n := m.refused("rbac_denied"); n != 2 {
		t.Errorf("rbac_denied %v, want 2", n)
	}
	lines := m.logs.lines(map[string]any{"kind": "http", "status": 403})
	if len(lines) != 2 || !strings.Contains(lines[0]["src.identity"].(string), "sleep") {
		t.Errorf("access log of the denials: %v", lines)
	}
}

// TestMetricsLabels: istio_requests_total with the waypoint's 25 labels,
// exactly, for an allowed request and for a denied one (no upstream: the
// destination workload is unknown, the service is the target's).
func TestMetricsLabels(t *testing.T) {
	m := newMesh(t, meshOptions{})
	m.wp.Update(compile(t, golden(t, "authz-productpage-viewer")))
	sleep := m.sleep().http1(productpageVIP)
	do(t, sleep, "GET", "http://productpage:9080/productpage", nil, nil)
	do(t, sleep, "DELETE", "http://productpage:9080/productpage", nil, nil)

	source := map[string]string{
		"reporter":                      "waypoint",
		"source_workload":               "sleep",
		"source_canonical_service":      "sleep",
		"source_canonical_revision":     "latest",
		"source_workload_namespace":     "default",
		"source_principal":              sleepID,
		"source_app":                    "sleep",
		"source_version":                "latest",
		"source_cluster":                "Kubernetes",
		"destination_service":           "productpage.default.svc.cluster.local",
		"destination_service_name":      "productpage",
		"destination_service_namespace": "default",
		"request_protocol":              "http",
		"grpc_response_status":          "",
		"response_flags":                "-",
		"connection_security_policy":    "mutual_tls",
	}
	with := func(extra map[string]string) map[string]string {
		l := map[string]string{}
		for k, v := range source {
			l[k] = v
		}
		for k, v := range extra {
			l[k] = v
		}
		return l
	}
	ok := with(map[string]string{
		"destination_workload":           "productpage-v1",
		"destination_workload_namespace": "default",
		"destination_principal":          "spiffe://cluster.local/ns/default/sa/bookinfo-productpage",
		"destination_app":                "productpage",
		"destination_version":            "v1",
		"destination_canonical_service":  "productpage",
		"destination_canonical_revision": "v1",
		"destination_cluster":            "Kubernetes",
		"response_code":                  "200",
	})
	denied := with(map[string]string{
		"destination_workload":           "unknown",
		"destination_workload_namespace": "unknown",
		"destination_principal":          "unknown",
		"destination_app":                "unknown",
		"destination_version":            "unknown",
		"destination_canonical_service":  "unknown",
		"destination_canonical_revision": "unknown",
		"destination_cluster":            "unknown",
		"response_code":                  "403",
	})
	if len(ok) != 25 || len(denied) != 25 {
		t.Fatalf("test label sets have %d and %d labels, want 25", len(ok), len(denied))
	}
	for _, name := range []string{"istio_requests_total", "istio_request_duration_milliseconds", "istio_request_bytes", "istio_response_bytes"} {
		got := m.samples(name)
		if len(got) != 2 {
			t.Errorf("%s: %d series, want 2: %v", name, len(got), got)
			continue
		}
		for _, want := range []map[string]string{ok, denied} {
			if v := m.counter(name, want); v != 1 {
				t.Errorf("%s%v = %v, want 1; have %v", name, want, v, got)
			}
		}
	}
}

// TestClientTrustDomains: a client certificate must be in a trust domain
// connect_terminate names (its URI SAN prefixes): one of another trust
// domain under the same root is refused until istiod names it (a trust
// domain alias), from the next handshake on.
func TestClientTrustDomains(t *testing.T) {
	m := newMesh(t, meshOptions{})
	m.wp.Update(compile(t, golden(t, "base")))
	alias := m.client("spiffe://alias.local/ns/default/sa/sleep", nil)
	if _, err := alias.connect(context.Background(), productpageVIP); err == nil {
		t.Fatal("a client of a trust domain connect_terminate does not name connected")
	}
	s := golden(t, "base")
	for _, l := range s.Listeners {
		if l.GetName() != config.ConnectTerminate {
			continue
		}
		ts := l.GetFilterChains()[0].GetTransportSocket().GetTypedConfig()
		d := &tlsv3.DownstreamTlsContext{}
		if err := ts.UnmarshalTo(d); err != nil {
			t.Fatal(err)
		}
		v := d.GetCommonTlsContext().GetCombinedValidationContext().GetDefaultValidationContext()
		v.MatchTypedSubjectAltNames = append(v.MatchTypedSubjectAltNames, &tlsv3.SubjectAltNameMatcher{
			SanType: tlsv3.SubjectAltNameMatcher_URI,
			Matcher: &matcherv3.StringMatcher{MatchPattern: &matcherv3.StringMatcher_Prefix{Prefix: "spiffe://alias.local/"}},
		})
		if err := ts.MarshalFrom(d); err != nil {
			t.Fatal(err)
		}
	}
	m.wp.Update(compile(t, s))
	st, err := alias.connect(context.Background(), productpageVIP)
	if err != nil {
		t.Fatalf("a client of a trust domain connect_terminate names: %v", err)
	}
	st.Close()
	if _, err := m.sleep().connect(context.Background(), productpageVIP); err != nil {
		t.Errorf("a client of the waypoint's own trust domain: %v", err)
	}
}
