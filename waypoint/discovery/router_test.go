package discovery_test

import (
	"slices"
	"testing"

	"github.com/amber-mesh/amber/internal/testutil"
	"github.com/amber-mesh/amber/waypoint/config"
	"github.com/amber-mesh/amber/waypoint/discovery"
)

// TestRouterThroughXDS: istiod's configuration for the walkthrough's
// ingress gateway, served over delta ADS: RDS asked for by the name the
// listener gives, EDS only for the cluster the routes send to (not every
// Service's), everything ACKed and compiled without a problem.
func TestRouterThroughXDS(t *testing.T) {
	f := startSet(t, "router-bookinfo-gateway", discovery.NewRouter)
	testutil.Eventually(t, "ACKs of every type", func() bool {
		return f.acked(config.ListenerType) && f.acked(config.ClusterType) && f.acked(config.RouteType) && f.acked(config.EndpointType)
	})
	testutil.Eventually(t, "warm endpoints", f.set.EndpointsWarm)
	if got := f.set.RDSNames(); !slices.Equal(got, []string{"http.8080"}) {
		t.Errorf("RDS names %v", got)
	}
	if got, want := f.set.EDSNames(), []string{"outbound|9080||productpage.default.svc.cluster.local"}; !slices.Equal(got, want) {
		t.Errorf("EDS names %v, want %v", got, want)
	}
	testutil.Eventually(t, "a compilation with the routes and endpoints", func() bool {
		c := f.pub.latest()
		g := c.Gateways["0.0.0.0_8080"]
		return c.Router && g != nil && g.Chain.Err == nil && len(c.Clusters["outbound|9080||productpage.default.svc.cluster.local"].Endpoints) == 1
	})
	if err := f.pub.latest().Err(""); err != nil {
		t.Fatalf("problems: %v", err)
	}
	if n := len(f.set.Snapshot().Routes); n != 1 {
		t.Errorf("%d route configurations held", n)
	}
}

// TestRouterSecretsThroughXDS: a TLS listener's Secret asked for by the
// name the listener gives, and compiled into its certificate.
func TestRouterSecretsThroughXDS(t *testing.T) {
	f := startSet(t, "router-gateway-api-tls", discovery.NewRouter)
	testutil.Eventually(t, "the HTTPS listener with its certificate", func() bool {
		c := f.pub.latest()
		if c == nil {
			return false
		}
		g := c.Gateways["0.0.0.0_443"]
		return g != nil && g.Chain.Err == nil && g.TLS != nil && g.TLS.Certificate != nil
	})
	if got := f.set.SDSNames(); !slices.Equal(got, []string{"kubernetes-gateway://default/bookinfo-cert"}) {
		t.Errorf("SDS names %v", got)
	}
	if err := f.pub.latest().Err(""); err != nil {
		t.Errorf("problems: %v", err)
	}
}
