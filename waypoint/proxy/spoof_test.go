package proxy_test

import (
	"encoding/json"
	"net/http"
	"testing"
)

// TestSpoofedHeaders: what a client claims in headers changes neither
// its identity, its telemetry nor what the application learns from the
// waypoint: a client's x-forwarded-client-cert is removed (SANITIZE),
// x-envoy-* control headers are removed, baggage and an inner forwarded
// header pass through untouched but count for nothing, and a CONNECT's
// forwarded address counts only when it is a workload of the identity the
// client proved.
func TestSpoofedHeaders(t *testing.T) {
	m := newMesh(t, meshOptions{})
	m.wp.Update(compile(t, golden(t, "authz-productpage-viewer")))
	spoof := http.Header{
		"X-Forwarded-Client-Cert":        {`By=spiffe://cluster.local/ns/default/sa/productpage;URI=spiffe://cluster.local/ns/default/sa/sleep`},
		"Baggage":                        {"k8s.namespace.name=default,k8s.deployment.name=productpage-v1,service.name=productpage"},
		"Forwarded":                      {`for="10.244.0.10:9080"`},
		"X-Envoy-Retry-On":               {"5xx"},
		"X-Envoy-Internal":               {"true"},
		"X-Envoy-Upstream-Rq-Timeout-Ms": {"1"},
		"X-Forwarded-For":                {"10.0.0.1"},
		"X-Request-Id":                   {"client-chosen"},
	}
	resp, body := do(t, m.sleep().http1(productpageVIP), "GET", "http://productpage:9080/productpage", spoof, nil)
	if resp.StatusCode != 200 {
		t.Fatalf("%d %s", resp.StatusCode, body)
	}
	var e echo
	json.Unmarshal([]byte(body), &e)
	for _, k := range []string{"X-Forwarded-Client-Cert", "X-Envoy-Retry-On", "X-Envoy-Internal", "X-Envoy-Upstream-Rq-Timeout-Ms"} {
		if v := e.Header.Get(k); v != "" {
			t.Errorf("the application got %s: %q", k, v)
		}
	}
	// Envoy passes these on unchanged (and so does amber); they decide
	// nothing in the waypoint.
	for _, k := range []string{"Baggage", "Forwarded", "X-Forwarded-For", "X-Request-Id"} {
		if got := e.Header.Get(k); got != spoof.Get(k) {
			t.Errorf("the application got %s %q, want %q", k, got, spoof.Get(k))
		}
	}
	if e.Header.Get("X-Forwarded-Proto") != "http" {
		t.Errorf("x-forwarded-proto %q", e.Header.Get("X-Forwarded-Proto"))
	}
	// Telemetry names sleep, from workload discovery and its certificate,
	// not productpage from baggage or forwarded.
	m.waitSample("istio_requests_total", func(map[string]string) bool { return true })
	ok := m.samples("istio_requests_total")
	if len(ok) != 1 || ok[0].labels["source_workload"] != "sleep" || ok[0].labels["source_principal"] != sleepID {
		t.Errorf("series %v", ok)
	}

	// notsleep claims sleep's pod address in its CONNECT: its labels stay
	// its own (principal only: it has no workload), and the policy still
	// sees notsleep.
	liar := m.client(notSleepID, http.Header{"Forwarded": {`for="` + sleepAddr + `"`}})
	resp, _ = do(t, liar.http1(productpageVIP), "GET", "http://productpage:9080/productpage", nil, nil)
	if resp.StatusCode != 403 {
		t.Errorf("notsleep with sleep's address: %d, want 403", resp.StatusCode)
	}
	m.waitSample("istio_requests_total", func(l map[string]string) bool { return l["source_principal"] == notSleepID })
	for _, s := range m.samples("istio_requests_total") {
		if s.labels["source_principal"] == notSleepID && s.labels["source_workload"] != "unknown" {
			t.Errorf("notsleep reported as workload %q", s.labels["source_workload"])
		}
	}
}
