package proxy_test

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"runtime"
	"strings"
	"testing"

	xdscorev3 "github.com/cncf/xds/go/xds/core/v3"
	xdsmatcherv3 "github.com/cncf/xds/go/xds/type/matcher/v3"
	endpointv3 "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	rbacv3 "github.com/envoyproxy/go-control-plane/envoy/config/rbac/v3"
	rbacnetv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/rbac/v3"
	networkinputv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/matching/common_inputs/network/v3"
	matcherv3 "github.com/envoyproxy/go-control-plane/envoy/type/matcher/v3"
	"google.golang.org/protobuf/types/known/anypb"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"github.com/amber-mesh/amber/internal/testutil"
	"github.com/amber-mesh/amber/test/waypointgolden"
	"github.com/amber-mesh/amber/tunnel/hbone"
	"github.com/amber-mesh/amber/waypoint/config"
)

// tcpGolden is the base scenario with the kubernetes Service's TCP chain
// pointed at the details pod (istiod sends no endpoints for it: the API
// server is not a mesh workload), and with network RBAC admitting only
// allowed when it is not empty.
func tcpGolden(t *testing.T, allowed string) *waypointgolden.Snapshot {
	s := golden(t, "base")
	la := endpoints(t, s, kubernetesChain)
	la.Endpoints = []*endpointv3.LocalityLbEndpoints{{LbEndpoints: []*endpointv3.LbEndpoint{hboneEndpoint("10.244.0.14:9080")}}}
	if allowed != "" {
		fc := chain(t, s, kubernetesChain)
		cfg, err := anypb.New(&rbacnetv3.RBAC{StatPrefix: "tcp.", Rules: &rbacv3.RBAC{
			Action: rbacv3.RBAC_ALLOW,
			Policies: map[string]*rbacv3.Policy{"ns[default]-policy[tcp]-rule[0]": {
				Permissions: []*rbacv3.Permission{{Rule: &rbacv3.Permission_Any{Any: true}}},
				Principals: []*rbacv3.Principal{{Identifier: &rbacv3.Principal_FilterState{FilterState: &matcherv3.FilterStateMatcher{
					Key:     "io.istio.peer_principal",
					Matcher: &matcherv3.FilterStateMatcher_StringMatch{StringMatch: &matcherv3.StringMatcher{MatchPattern: &matcherv3.StringMatcher_Exact{Exact: allowed}}},
				}}}},
			}},
		}})
		if err != nil {
			t.Fatal(err)
		}
		fc.Filters = append([]*listenerv3.Filter{{Name: "envoy.filters.network.rbac", ConfigType: &listenerv3.Filter_TypedConfig{TypedConfig: cfg}}}, fc.Filters...)
	}
	return s
}

// TestTCPChain: a non-HTTP service port of a namespace with a waypoint
// keeps working: tcp_proxy over HBONE to the endpoint, with istio_tcp_*.
func TestTCPChain(t *testing.T) {
	m := newMesh(t, meshOptions{})
	m.wp.Update(compile(t, tcpGolden(t, "")))
	s, err := m.sleep().connect(context.Background(), kubernetesVIP)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	const req = "GET /over-tcp HTTP/1.1\r\nHost: kubernetes\r\n\r\n"
	io.WriteString(s, req)
	// The client's half-close reaches the application, which answers and
	// closes: both directions end cleanly.
	s.CloseWrite()
	b, err := io.ReadAll(s)
	if err != nil {
		t.Fatal(err)
	}
	resp, body := rawResponse(t, string(b))
	if resp.StatusCode != 200 || resp.Header.Get("X-Backend") != "details-v1" || !strings.Contains(body, `"uri":"/over-tcp"`) {
		t.Fatalf("over the TCP chain: %d %v %s", resp.StatusCode, resp.Header, body)
	}
	// The application saw the client's bytes untouched: no HTTP processing
	// on a TCP chain (no x-request-id added).
	if got := m.pods["details-v1"].app.requests(); len(got) != 1 || got[0].Header.Get("X-Request-Id") != "" {
		t.Errorf("details saw %+v", got)
	}
	labels := map[string]string{
		"reporter": "waypoint", "source_workload": "sleep", "source_canonical_service": "sleep", "source_canonical_revision": "latest",
		"source_workload_namespace": "default", "source_principal": sleepID, "source_app": "sleep", "source_version": "latest", "source_cluster": "Kubernetes",
		"destination_workload": "details-v1", "destination_workload_namespace": "default", "destination_principal": "spiffe://cluster.local/ns/default/sa/bookinfo-details",
		"destination_app": "details", "destination_version": "v1", "destination_service": "kubernetes.default.svc.cluster.local",
		"destination_canonical_service": "details", "destination_canonical_revision": "v1", "destination_service_name": "kubernetes",
		"destination_service_namespace": "default", "destination_cluster": "Kubernetes", "request_protocol": "tcp", "response_flags": "-",
		"connection_security_policy": "mutual_tls",
	}
	testutil.Eventually(t, "the TCP connection closed", func() bool { return m.counter("istio_tcp_connections_closed_total", labels) == 1 })
	if got := m.counter("istio_tcp_connections_opened_total", labels); got != 1 {
		t.Errorf("opened %v; series %v", got, m.samples("istio_tcp_connections_opened_total"))
	}
	if got := m.counter("istio_tcp_received_bytes_total", labels); got != float64(len(req)) {
		t.Errorf("received %v, want %d", got, len(req))
	}
	if got := m.counter("istio_tcp_sent_bytes_total", labels); got != float64(len(b)) {
		t.Errorf("sent %v, want %d", got, len(b))
	}
}

// TestTCPRBAC: network RBAC refuses the CONNECT of a principal it does
// not admit, and a configuration change closes live connections it no
// longer admits.
func TestTCPRBAC(t *testing.T) {
	m := newMesh(t, meshOptions{})
	m.wp.Update(compile(t, tcpGolden(t, sleepID)))
	_, err := m.client(notSleepID, nil).connect(context.Background(), kubernetesVIP)
	var se *hbone.StatusError
	if !errors.As(err, &se) || se.Code != http.StatusUnauthorized {
		t.Fatalf("notsleep CONNECT: %v, want 401", err)
	}
	if n := m.refused("rbac_denied"); n != 1 {
		t.Errorf("rbac_denied %v", n)
	}
	s, err := m.sleep().connect(context.Background(), kubernetesVIP)
	if err != nil {
		t.Fatalf("sleep CONNECT: %v", err)
	}
	defer s.Close()
	// The connection lives (a request goes through)...
	io.WriteString(s, "GET /1 HTTP/1.1\r\nHost: k\r\n\r\n")
	buf := make([]byte, 12)
	if _, err := io.ReadFull(s, buf); err != nil || string(buf) != "HTTP/1.1 200" {
		t.Fatalf("first request: %q %v", buf, err)
	}
	// ...until a policy that no longer admits sleep arrives.
	m.wp.Update(compile(t, tcpGolden(t, notSleepID)))
	if _, err := io.ReadAll(s); err == nil {
		t.Log("stream ended cleanly")
	}
	testutil.Eventually(t, "the revoked connection's access-log line", func() bool {
		return len(m.logs.lines(map[string]any{"kind": "tcp", "error": "the configuration no longer admits the connection"})) == 1
	})
}

// TestTCPChainIdle: idle connections through a TCP chain hold no
// goroutine of the waypoint's (tunnel/relay, as in the ztunnel), and
// still carry bytes both ways when they wake.
func TestTCPChainIdle(t *testing.T) {
	m := newMesh(t, meshOptions{})
	m.wp.Update(compile(t, tcpGolden(t, "")))
	sleep := m.sleep()
	base := len(waypointGoroutines()) // the accept loop
	const n = 10
	var conns []*bufio.ReadWriter
	for i := range n {
		s, err := sleep.connect(context.Background(), kubernetesVIP)
		if err != nil {
			t.Fatal(err)
		}
		defer s.Close()
		c := bufio.NewReadWriter(bufio.NewReader(s), bufio.NewWriter(s))
		get(t, c, fmt.Sprintf("/idle/%d", i))
		conns = append(conns, c)
	}
	testutil.Eventually(t, "no goroutine of the waypoint's for idle connections", func() bool { return len(waypointGoroutines()) == base })
	for i, c := range conns {
		get(t, c, fmt.Sprintf("/awake/%d", i))
	}
}

// get sends an HTTP/1.1 request for path on c and reads its response,
// keeping the connection.
func get(t *testing.T, c *bufio.ReadWriter, path string) {
	t.Helper()
	fmt.Fprintf(c, "GET %s HTTP/1.1\r\nHost: kubernetes\r\n\r\n", path)
	c.Flush()
	resp, err := http.ReadResponse(c.Reader, nil)
	if err != nil {
		t.Fatalf("GET %s: %v", path, err)
	}
	body, err := io.ReadAll(resp.Body)
	if err != nil || resp.StatusCode != 200 || !strings.Contains(string(body), `"uri":"`+path+`"`) {
		t.Fatalf("GET %s: %d %s %v", path, resp.StatusCode, body, err)
	}
}

// waypointGoroutines returns the stacks of the goroutines running code
// of the waypoint's data path or of the relay, other than tests'.
func waypointGoroutines() []string {
	buf := make([]byte, 1<<20)
	for {
		n := runtime.Stack(buf, true)
		if n < len(buf) {
			buf = buf[:n]
			break
		}
		buf = make([]byte, 2*len(buf))
	}
	var out []string
	for _, g := range strings.Split(string(buf), "\n\n") {
		if strings.Contains(g, "github.com/amber-mesh/amber/waypoint/proxy.") || strings.Contains(g, "github.com/amber-mesh/amber/tunnel/relay.") {
			out = append(out, g)
		}
	}
	return out
}

// workloadAddressed adds to s's main_internal the matcher istiod gives a
// workload waypoint for a pod address: the sniffed protocol picks
// direct-http or direct-tcp.
func workloadAddressed(t *testing.T, s *waypointgolden.Snapshot, pod string) {
	t.Helper()
	chainAction := func(name string) *xdsmatcherv3.Matcher_OnMatch {
		a, err := anypb.New(wrapperspb.String(name))
		if err != nil {
			t.Fatal(err)
		}
		return &xdsmatcherv3.Matcher_OnMatch{OnMatch: &xdsmatcherv3.Matcher_OnMatch_Action{Action: &xdscorev3.TypedExtensionConfig{Name: name, TypedConfig: a}}}
	}
	in, err := anypb.New(&networkinputv3.ApplicationProtocolInput{})
	if err != nil {
		t.Fatal(err)
	}
	sniff := &xdsmatcherv3.Matcher{
		OnNoMatch: chainAction("direct-tcp"),
		MatcherType: &xdsmatcherv3.Matcher_MatcherTree_{MatcherTree: &xdsmatcherv3.Matcher_MatcherTree{
			Input: &xdscorev3.TypedExtensionConfig{Name: "application-protocol", TypedConfig: in},
			TreeType: &xdsmatcherv3.Matcher_MatcherTree_ExactMatchMap{ExactMatchMap: &xdsmatcherv3.Matcher_MatcherTree_MatchMap{Map: map[string]*xdsmatcherv3.Matcher_OnMatch{
				"'h2c'": chainAction("direct-http"), "'http/1.1'": chainAction("direct-http"),
			}}},
		}},
	}
	for _, l := range s.Listeners {
		if l.GetName() != config.MainInternal {
			continue
		}
		tc := l.GetFilterChainMatcher().GetMatcherTree().GetCustomMatch().GetTypedConfig()
		ip := &xdsmatcherv3.IPMatcher{}
		if err := tc.UnmarshalTo(ip); err != nil {
			t.Fatal(err)
		}
		ip.RangeMatchers = append(ip.RangeMatchers, &xdsmatcherv3.IPMatcher_IPRangeMatcher{
			Ranges:  []*xdscorev3.CidrRange{{AddressPrefix: pod, PrefixLen: wrapperspb.UInt32(32)}},
			OnMatch: &xdsmatcherv3.Matcher_OnMatch{OnMatch: &xdsmatcherv3.Matcher_OnMatch_Matcher{Matcher: sniff}},
		})
		if err := tc.MarshalFrom(ip); err != nil {
			t.Fatal(err)
		}
		return
	}
	t.Fatal("no main_internal")
}

// TestSniffedTCP: a workload-addressed stream whose first bytes are not
// HTTP is sniffed onto direct-tcp, and the bytes the sniffer read reach
// the application first (it answers them: they are not a request it
// understands).
func TestSniffedTCP(t *testing.T) {
	m := newMesh(t, meshOptions{})
	s := golden(t, "base")
	workloadAddressed(t, s, "10.244.0.14")
	m.wp.Update(compile(t, s))
	st, err := m.sleep().connect(context.Background(), "10.244.0.14:9080")
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	const payload = "HELLO over tcp\r\n\r\n"
	io.WriteString(st, payload)
	st.CloseWrite()
	b, err := io.ReadAll(st)
	if err != nil {
		t.Fatal(err)
	}
	if resp, _ := rawResponse(t, string(b)); resp.StatusCode != http.StatusBadRequest {
		t.Errorf("the application answered %d, want its 400 for the sniffed bytes", resp.StatusCode)
	}
	testutil.Eventually(t, "the direct-tcp access-log line", func() bool {
		return len(m.logs.lines(map[string]any{"kind": "tcp", "chain": "direct-tcp", "bytes_received": len(payload)})) == 1
	})
}
