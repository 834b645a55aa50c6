package config

import (
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/amber-mesh/amber/test/waypointgolden"
	"github.com/amber-mesh/amber/waypoint/match"
	"github.com/amber-mesh/amber/waypoint/rbac"
	"github.com/amber-mesh/amber/waypoint/route"
)

// The walkthrough mesh of the goldens (test/istiod waypointmesh_test.go).
const (
	productpageVIP = "10.96.10.1:9080"
	reviewsVIP     = "10.96.10.2:9080"
	sleepID        = "spiffe://cluster.local/ns/default/sa/sleep"
	notSleepID     = "spiffe://cluster.local/ns/default/sa/notsleep"
	reviewsV1      = "inbound-vip|9080|http|reviews-v1.default.svc.cluster.local"
	reviewsV2      = "inbound-vip|9080|http|reviews-v2.default.svc.cluster.local"
)

func resources(s *waypointgolden.Snapshot) Resources {
	return Resources{Listeners: s.Listeners, Clusters: s.Clusters, Endpoints: s.Endpoints}
}

// latest is the newest istiod version with goldens.
func latest(t *testing.T) string {
	t.Helper()
	vs, err := waypointgolden.Versions()
	if err != nil || len(vs) == 0 {
		t.Fatalf("no goldens: %v", err)
	}
	return vs[len(vs)-1]
}

func load(t *testing.T, scenario string) *Config {
	t.Helper()
	s, err := waypointgolden.Load(latest(t), scenario)
	if err != nil {
		t.Fatal(err)
	}
	c := Compile(resources(s))
	if err := c.Err(""); err != nil {
		t.Fatalf("%s does not compile: %v", scenario, err)
	}
	return c
}

// TestCompileGoldens: everything a real istiod sent for every scenario of
// every committed version compiles without a problem.
func TestCompileGoldens(t *testing.T) {
	versions, err := waypointgolden.Versions()
	if err != nil || len(versions) == 0 {
		t.Fatalf("no goldens: %v", err)
	}
	for _, v := range versions {
		scenarios, err := waypointgolden.Scenarios(v)
		if err != nil {
			t.Fatal(err)
		}
		for _, sc := range scenarios {
			if strings.HasPrefix(sc, "router-") {
				continue // TestCompileRouterGoldens
			}
			t.Run(v+"/"+sc, func(t *testing.T) {
				s, err := waypointgolden.Load(v, sc)
				if err != nil {
					t.Fatal(err)
				}
				c := Compile(resources(s))
				for _, p := range c.Problems {
					t.Errorf("problem: %v", p)
				}
				if c.Terminate == nil || c.Dispatch == nil || c.Originate == nil {
					t.Fatalf("terminate %v dispatch %v originate %v", c.Terminate, c.Dispatch, c.Originate)
				}
				for name, ch := range c.Dispatch.Chains {
					if ch.Err != nil || (ch.HTTP == nil) == (ch.TCP == nil) {
						t.Errorf("chain %s: %+v", name, ch)
					}
				}
				for name, cl := range c.Clusters {
					if cl.Err != nil {
						t.Errorf("cluster %s: %v", name, cl.Err)
					}
				}
				for _, d := range c.Degraded {
					t.Logf("degraded: %s", d.Path)
				}
			})
		}
	}
}

// httpRequest is a request as the data path would hand it over after the
// HBONE server and main_internal: original destination, peer identity.
type httpRequest struct {
	dst       string
	method    string
	path      string
	principal string
	header    http.Header
}

// result is what the waypoint does with a request: a local reply
// (status, and the RBAC policy that denied) or forwarding to a cluster.
type result struct {
	status  int // 0: forwarded
	policy  string
	cluster string
	cl      *Cluster
}

// serve runs the request pipeline the way the data path will: dispatch,
// normalisation, RBAC filters in order, route, cluster pick.
func serve(t *testing.T, c *Config, r httpRequest, random uint64) result {
	t.Helper()
	dst := netip.MustParseAddrPort(r.dst)
	ch := c.Dispatch.Lookup(Input{Destination: dst, Protocol: func() string { return "http/1.1" }})
	if ch == nil {
		t.Fatalf("%s: no filter chain", r.dst)
	}
	if ch.Err != nil || ch.HTTP == nil {
		t.Fatalf("%s: chain %s is not a working HTTP chain: %v", r.dst, ch.Name, ch.Err)
	}
	h := ch.HTTP
	path, res := route.NormalizePath(r.path, h.Path)
	switch res {
	case route.PathReject:
		return result{status: 400}
	case route.PathRedirect:
		return result{status: 307}
	}
	if r.header == nil {
		r.header = http.Header{}
	}
	req := &match.Request{Method: r.method, Authority: r.dst, Path: path, Scheme: "http", Header: r.header}
	rr := &rbac.Request{Headers: req, Source: netip.MustParseAddr("10.244.0.5"), Destination: dst,
		FilterState: map[string]string{"io.istio.peer_principal": r.principal}}
	for _, f := range h.RBAC {
		if d := f.Evaluate(rr); !d.Allowed {
			return result{status: 403, policy: d.Policy}
		}
	}
	rt := h.Routes.Select(req)
	if rt == nil {
		return result{status: 404}
	}
	switch {
	case rt.Direct != nil:
		return result{status: rt.Direct.Status}
	case rt.Redirect != nil:
		return result{status: rt.Redirect.Code}
	}
	name, _, ok := rt.Forward.Pick(random)
	if !ok {
		return result{status: 500}
	}
	cl := c.Clusters[name]
	switch {
	case cl == nil:
		return result{status: rt.Forward.ClusterNotFound, cluster: name}
	case cl.Err != nil || len(cl.Endpoints) == 0:
		return result{status: 503, cluster: name, cl: cl}
	}
	return result{cluster: name, cl: cl}
}

func TestWalkthroughPolicy(t *testing.T) {
	c := load(t, "authz-productpage-viewer")
	get := httpRequest{dst: productpageVIP, method: "GET", path: "/productpage", principal: sleepID}
	if r := serve(t, c, get, 0); r.status != 0 || r.cluster != "inbound-vip|9080|http|productpage.default.svc.cluster.local" ||
		r.cl.Endpoints[0].Address != netip.MustParseAddrPort("10.244.0.10:9080") || !r.cl.Endpoints[0].HBONE {
		t.Errorf("sleep GET: %+v", r)
	}
	for _, req := range []httpRequest{
		{dst: productpageVIP, method: "DELETE", path: "/productpage", principal: sleepID},
		{dst: productpageVIP, method: "GET", path: "/productpage", principal: notSleepID},
		{dst: productpageVIP, method: "GET", path: "/productpage", principal: ""},
	} {
		// An ALLOW that matches nothing denies without naming a policy.
		if r := serve(t, c, req, 0); r.status != 403 || r.policy != "" {
			t.Errorf("%s from %q: %+v, want 403", req.method, req.principal, r)
		}
	}
	// The policy targets productpage only: reviews has no RBAC filter.
	if r := serve(t, c, httpRequest{dst: reviewsVIP, method: "DELETE", path: "/reviews/1", principal: notSleepID}, 0); r.status != 0 {
		t.Errorf("reviews DELETE: %+v, want forwarded", r)
	}
	// Without the policy, anything goes.
	base := load(t, "base")
	if r := serve(t, base, httpRequest{dst: productpageVIP, method: "DELETE", path: "/productpage", principal: notSleepID}, 0); r.status != 0 {
		t.Errorf("base DELETE: %+v, want forwarded (no ALLOW policy allows)", r)
	}
}

func TestDenyAndAudit(t *testing.T) {
	c := load(t, "authz-deny-audit")
	ch := c.Dispatch.Lookup(Input{Destination: netip.MustParseAddrPort(productpageVIP), Protocol: func() string { return "http/1.1" }})
	var actions []rbac.Action
	for _, f := range ch.HTTP.RBAC {
		actions = append(actions, f.Rules.Action)
	}
	if !slices.Equal(actions, []rbac.Action{rbac.Log, rbac.Deny, rbac.Allow}) {
		t.Errorf("RBAC filter order %v, want LOG DENY ALLOW (istiod's builder order)", actions)
	}
	const (
		deny0 = "ns[default]-policy[productpage-deny-admin]-rule[0]"
		other = "spiffe://cluster.local/ns/other/sa/sleep"
	)
	cases := []struct {
		r      httpRequest
		status int
		policy string
	}{
		{httpRequest{dst: productpageVIP, method: "GET", path: "/productpage", principal: sleepID}, 0, ""},
		// notNamespaces [default]: sleep is in default, so the DENY spares it.
		{httpRequest{dst: productpageVIP, method: "GET", path: "/admin/x", principal: sleepID}, 0, ""},
		// A caller from another namespace is denied /admin* by the DENY,
		// before the ALLOW is consulted.
		{httpRequest{dst: productpageVIP, method: "GET", path: "/admin/x", principal: other}, 403, deny0},
		{httpRequest{dst: productpageVIP, method: "GET", path: "/debug/pprof", principal: other}, 403, deny0},
		// Path tricks are normalised before the DENY sees the path.
		{httpRequest{dst: productpageVIP, method: "GET", path: "/productpage/../admin/x", principal: other}, 403, deny0},
		{httpRequest{dst: productpageVIP, method: "GET", path: "/productpage/%2e%2e/admin", principal: other}, 403, deny0},
		{httpRequest{dst: productpageVIP, method: "GET", path: "/%61dmin", principal: other}, 403, deny0},
		{httpRequest{dst: productpageVIP, method: "GET", path: `/x\..\admin`, principal: other}, 403, deny0},
		// notMethods OPTIONS: the DENY spares OPTIONS; the ALLOW (GET only)
		// then denies without naming a policy.
		{httpRequest{dst: productpageVIP, method: "OPTIONS", path: "/admin", principal: other}, 403, ""},
		// The second rule needs a *.example.com host and x-debug.
		{httpRequest{dst: productpageVIP, method: "GET", path: "/productpage", principal: sleepID, header: http.Header{"X-Debug": {"1"}}}, 0, ""},
	}
	for _, tc := range cases {
		if r := serve(t, c, tc.r, 0); r.status != tc.status || r.policy != tc.policy {
			t.Errorf("%s %s from %q: %+v, want status %d policy %q", tc.r.method, tc.r.path, tc.r.principal, r, tc.status, tc.policy)
		}
	}
	// The AUDIT policy marks /login for the access log and lets it pass.
	audit := ch.HTTP.RBAC[0].Evaluate(&rbac.Request{Headers: &match.Request{Method: "POST", Path: "/login", Authority: productpageVIP, Header: http.Header{}}})
	if !audit.Allowed || !audit.Log || audit.Policy != "ns[default]-policy[productpage-audit]-rule[0]" {
		t.Errorf("audit %+v", audit)
	}
}

func TestTrafficSplit(t *testing.T) {
	for _, sc := range []string{"httproute-reviews-90-10", "virtualservice-reviews-90-10"} {
		t.Run(sc, func(t *testing.T) {
			c := load(t, sc)
			counts := map[string]int{}
			endpoints := map[string]string{}
			for i := uint64(0); i < 1000; i++ {
				r := serve(t, c, httpRequest{dst: reviewsVIP, method: "GET", path: "/reviews/0", principal: sleepID}, i)
				if r.status != 0 {
					t.Fatalf("%+v", r)
				}
				counts[r.cluster]++
				var eps []string
				for _, e := range r.cl.Endpoints {
					eps = append(eps, e.Address.String())
				}
				endpoints[r.cluster] = strings.Join(eps, ",")
			}
			if len(counts) != 2 {
				t.Fatalf("clusters %v, want two", counts)
			}
			var v1, v2 string
			for name := range counts {
				switch endpoints[name] {
				case "10.244.0.11:9080":
					v1 = name
				case "10.244.0.12:9080":
					v2 = name
				}
			}
			if counts[v1] != 900 || counts[v2] != 100 {
				t.Errorf("split %v over endpoints %v, want 900 to reviews-v1's pod, 100 to reviews-v2's", counts, endpoints)
			}
			if sc == "virtualservice-reviews-90-10" {
				if cl := c.Clusters[v1]; cl.Subset != "v1" || cl.LB != Random {
					t.Errorf("cluster %s: subset %q lb %v, want v1 RANDOM (the DestinationRule's)", v1, cl.Subset, cl.LB)
				}
			}
		})
	}
}

func TestHeaderMatchRoute(t *testing.T) {
	c := load(t, "httproute-header-match")
	for _, tc := range []struct {
		user, want string
	}{{"jason", reviewsV2}, {"bob", reviewsV1}, {"", reviewsV1}} {
		h := http.Header{}
		if tc.user != "" {
			h.Set("End-User", tc.user)
		}
		if r := serve(t, c, httpRequest{dst: reviewsVIP, method: "GET", path: "/reviews/0", principal: sleepID, header: h}, 0); r.cluster != tc.want {
			t.Errorf("end-user %q: %+v, want %s", tc.user, r, tc.want)
		}
	}
}

// TestPeerAuthenticationChangesNothing: STRICT mTLS is what a waypoint's
// HBONE listener enforces anyway; istiod's output is the base's.
func TestPeerAuthenticationChangesNothing(t *testing.T) {
	dir := filepath.Join(waypointgolden.Dir(), latest(t))
	for _, f := range []string{"lds.json", "cds.json", "eds.json"} {
		a, err := os.ReadFile(filepath.Join(dir, "base", f))
		if err != nil {
			t.Fatal(err)
		}
		b, err := os.ReadFile(filepath.Join(dir, "peerauthentication-strict", f))
		if err != nil {
			t.Fatal(err)
		}
		if string(a) != string(b) {
			t.Errorf("%s differs between base and peerauthentication-strict", f)
		}
	}
}

// TestMeshWideDestinationRule: a root-namespace DestinationRule for
// *.svc.cluster.local reaches every waypoint cluster and is accepted, the
// parts amber does not honour (outlier detection) counted as degraded.
func TestMeshWideDestinationRule(t *testing.T) {
	c := load(t, "destinationrule-meshwide")
	cl := c.Clusters["inbound-vip|9080|http|productpage.default.svc.cluster.local"]
	if cl == nil {
		t.Fatal("no productpage cluster")
	}
	if cl.LB != LeastRequest || cl.MaxRequestsPerConnection != 1 || cl.ConnectTimeout != 5*time.Second {
		t.Errorf("cluster %+v", cl)
	}
	want := Limits{MaxConnections: 100, MaxPendingRequests: 64, MaxRequests: 128, MaxRetries: 3}
	if cl.Limits != want {
		t.Errorf("limits %+v, want %+v", cl.Limits, want)
	}
	if !slices.ContainsFunc(c.Degraded, func(d Degradation) bool { return strings.Contains(d.Path, "outlier_detection") }) {
		t.Errorf("outlier detection not reported as degraded: %v", c.Degraded)
	}
}
