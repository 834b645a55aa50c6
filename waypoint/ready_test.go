package waypoint

import (
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"google.golang.org/protobuf/types/known/anypb"

	"github.com/amber-mesh/amber/test/waypointgolden"
	"github.com/amber-mesh/amber/waypoint/config"
	"github.com/amber-mesh/amber/waypoint/discovery"
	"github.com/amber-mesh/amber/xds/client"
)

func goldenResources(t *testing.T) map[string][]*discoveryv3.Resource {
	t.Helper()
	s, err := waypointgolden.Latest("base")
	if err != nil {
		t.Fatal(err)
	}
	rs, err := waypointgolden.Resources(s)
	if err != nil {
		t.Fatal(err)
	}
	return rs
}

func handlers(set *discovery.Set) map[string]client.Handler {
	out := map[string]client.Handler{}
	for _, ty := range set.Types() {
		out[ty.URL] = ty.Handler
	}
	return out
}

func probe(t *testing.T, r *readiness) (int, string) {
	t.Helper()
	rec := httptest.NewRecorder()
	r.ServeHTTP(rec, httptest.NewRequest(http.MethodGet, "/healthz/ready", nil))
	return rec.Code, rec.Body.String()
}

// TestReadiness: pilot-agent's readiness, step by step: nothing from
// istiod, LDS refused, only part of the configuration, endpoints missing,
// no certificate; then ready, and ready it stays (a later NACK changes
// nothing) until the waypoint drains.
func TestReadiness(t *testing.T) {
	rs := goldenResources(t)
	set := discovery.New(nil)
	h := handlers(set)
	readyCalls := 0
	r := &readiness{set: set, onReady: func() { readyCalls++ }}
	step := func(wantCode int, wantBody string) {
		t.Helper()
		code, body := probe(t, r)
		if code != wantCode || !strings.Contains(body, wantBody) {
			t.Errorf("probe = %d %q, want %d %q", code, body, wantCode, wantBody)
		}
	}

	step(http.StatusServiceUnavailable, "config not received from XDS server (is Istiod running?)")

	garbage := &discoveryv3.Resource{Name: config.MainInternal, Resource: &anypb.Any{TypeUrl: config.ListenerType, Value: []byte{0xff}}}
	h[config.ListenerType].Apply([]*discoveryv3.Resource{garbage}, nil)
	step(http.StatusServiceUnavailable, "config received from XDS server, but was rejected: cds updates: 0 successful, 0 rejected; lds updates: 0 successful, 1 rejected")

	h[config.ClusterType].Apply(rs[config.ClusterType], nil)
	step(http.StatusServiceUnavailable, "but was rejected")
	h[config.ListenerType].Apply(rs[config.ListenerType], nil)
	step(http.StatusServiceUnavailable, errEDS.Error())
	h[config.EndpointType].Apply(rs[config.EndpointType], nil)
	step(http.StatusServiceUnavailable, errNoCert.Error())
	if readyCalls != 0 {
		t.Fatal("ready before the certificate")
	}

	r.cert.Store(true)
	step(http.StatusOK, "")
	step(http.StatusOK, "")
	if readyCalls != 1 {
		t.Errorf("onReady called %d times", readyCalls)
	}

	// A refused update later: Envoy keeps serving, pilot-agent keeps
	// reporting ready.
	h[config.ListenerType].Apply([]*discoveryv3.Resource{garbage}, nil)
	step(http.StatusOK, "")

	r.draining.Store(true)
	step(http.StatusServiceUnavailable, "draining")
}

// TestReadinessWithoutEDSClusters: a configuration without EDS clusters
// needs no endpoints to be ready.
func TestReadinessWithoutEDSClusters(t *testing.T) {
	rs := goldenResources(t)
	set := discovery.New(nil)
	h := handlers(set)
	var static []*discoveryv3.Resource
	for _, c := range rs[config.ClusterType] {
		if c.GetName() == config.ConnectOriginate || c.GetName() == config.MainInternal {
			static = append(static, c)
		}
	}
	h[config.ClusterType].Apply(static, nil)
	h[config.ListenerType].Apply(rs[config.ListenerType], nil)
	r := &readiness{set: set}
	r.cert.Store(true)
	if code, body := probe(t, r); code != http.StatusOK {
		t.Errorf("probe = %d %q", code, body)
	}
}
