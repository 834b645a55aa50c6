package proxy_test

import (
	"fmt"
	"math"
	"net/http"
	"sync"
	"testing"
)

// TestTrafficSplit: reviews 90/10 between v1 and v2, in the HTTPRoute and
// the VirtualService + DestinationRule forms, within binomial bounds over
// 1000 requests (five standard deviations: a correct split fails one run
// in ~1.7 million).
func TestTrafficSplit(t *testing.T) {
	for _, sc := range []string{"httproute-reviews-90-10", "virtualservice-reviews-90-10"} {
		t.Run(sc, func(t *testing.T) {
			m := newMesh(t, meshOptions{})
			m.wp.Update(compile(t, golden(t, sc)))
			const n, p = 1000, 0.1
			sleep := m.sleep()
			counts := map[string]int{}
			var mu sync.Mutex
			var wg sync.WaitGroup
			for w := range 4 {
				hc := sleep.http1(reviewsVIP)
				wg.Add(1)
				go func() {
					defer wg.Done()
					for range n / 4 {
						req, _ := http.NewRequest("GET", "http://reviews:9080/reviews/0", nil)
						resp, err := hc.Do(req)
						if err != nil {
							t.Errorf("worker %d: %v", w, err)
							return
						}
						resp.Body.Close()
						mu.Lock()
						counts[fmt.Sprint(resp.StatusCode, " ", resp.Header.Get("X-Backend"))]++
						mu.Unlock()
					}
				}()
			}
			wg.Wait()
			v1, v2 := counts["200 reviews-v1"], counts["200 reviews-v2"]
			if v1+v2 != n {
				t.Fatalf("responses %v, want %d 200s from reviews-v1 and reviews-v2", counts, n)
			}
			sd := math.Sqrt(n * p * (1 - p))
			if lo, hi := n*p-5*sd, n*p+5*sd; float64(v2) < lo || float64(v2) > hi {
				t.Errorf("reviews-v2 got %d of %d, want within [%.0f, %.0f]", v2, n, lo, hi)
			}
		})
	}
}

// TestHeaderMatchRoute: end-user: jason goes to v2, everyone else to v1.
func TestHeaderMatchRoute(t *testing.T) {
	m := newMesh(t, meshOptions{})
	m.wp.Update(compile(t, golden(t, "httproute-header-match")))
	hc := m.sleep().http1(reviewsVIP)
	for _, tc := range []struct{ user, want string }{{"jason", "reviews-v2"}, {"bob", "reviews-v1"}, {"", "reviews-v1"}} {
		for range 5 {
			h := http.Header{}
			if tc.user != "" {
				h.Set("End-User", tc.user)
			}
			resp, _ := do(t, hc, "GET", "http://reviews:9080/reviews/0", h, nil)
			if got := resp.Header.Get("X-Backend"); resp.StatusCode != 200 || got != tc.want {
				t.Fatalf("end-user %q: %d from %q, want 200 from %s", tc.user, resp.StatusCode, got, tc.want)
			}
		}
	}
}

// TestUpdateAppliesToNextRequest: a policy installed by Update applies to
// the next request, on a connection opened before it.
func TestUpdateAppliesToNextRequest(t *testing.T) {
	m := newMesh(t, meshOptions{})
	m.wp.Update(compile(t, golden(t, "base")))
	hc := m.sleep().http1(productpageVIP)
	if resp, _ := do(t, hc, "DELETE", "http://productpage:9080/productpage", nil, nil); resp.StatusCode != 200 {
		t.Fatalf("DELETE without a policy: %d, want 200", resp.StatusCode)
	}
	m.wp.Update(compile(t, golden(t, "authz-productpage-viewer")))
	if resp, body := do(t, hc, "DELETE", "http://productpage:9080/productpage", nil, nil); resp.StatusCode != 403 {
		t.Fatalf("DELETE after the policy: %d %q, want 403", resp.StatusCode, body)
	}
	if n := m.counter("istio_tcp_connections_opened_total", nil); n != 0 {
		t.Errorf("HTTP traffic counted as TCP connections")
	}
	streams := m.counter("amber_waypoint_hbone_server_total", map[string]string{"event": "streams_opened"})
	if streams != 1 {
		t.Errorf("%v CONNECT streams, want both requests on one", streams)
	}
	m.wp.Update(compile(t, golden(t, "base")))
	if resp, _ := do(t, hc, "DELETE", "http://productpage:9080/productpage", nil, nil); resp.StatusCode != 200 {
		t.Fatalf("DELETE after removing the policy: %d, want 200", resp.StatusCode)
	}
}
