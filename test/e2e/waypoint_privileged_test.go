package e2e

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"math"
	"net/http"
	"net/netip"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/amber-mesh/amber/internal/testutil"
	"github.com/amber-mesh/amber/test/istiod"
	"github.com/amber-mesh/amber/test/istiodbed"
	"github.com/amber-mesh/amber/test/meshbed"
	"github.com/amber-mesh/amber/test/proc"
	"github.com/amber-mesh/amber/test/promtext"
)

const reviewsHost = "reviews.default.svc.cluster.local"

// weightedTo is how the waypoint's /config_dump (white space removed)
// shows a route's weighted cluster.
func weightedTo(cluster string, weight int) string {
	return fmt.Sprintf(`"name":"%s","weight":%d`, cluster, weight)
}

// TestPrivilegedWaypoint runs Istio ambient's L7 walkthrough on one
// testbed node with a real istiod: sleep and notsleep → their ztunnel →
// amber-waypoint (a real process in an uncaptured pod of its own on the
// same node, configured as istiod's waypoint template configures the
// container) → the ztunnel → reviews v1 and v2. The waypoint enforces an
// AuthorizationPolicy and an HTTPRoute 90/10 istiod compiled for it,
// reports istio_requests_total, follows a policy change, keeps serving
// without istiod, keeps a TCP service working, and when it dies the
// service's traffic fails closed instead of going around it.
func TestPrivilegedWaypoint(t *testing.T) {
	var logs processLogs
	logs.dumpOnFailure(t)
	waypointBin, err := meshbed.BuildWaypoint(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	m := istiodbed.Start(t, istiodbed.Options{ZtunnelBin: ztunnelBin, WaypointBin: waypointBin, Log: logs.writer})
	nd := m.Nodes[0]
	z := &ztunnel{Ztunnel: nd.Ztunnel, log: logs.get("ztunnel-" + nd.Name)}
	m.LabelNamespace(t, map[string]string{"istio.io/use-waypoint": "waypoint"})

	sleep := m.AddPod(t, nd, istiodbed.Pod{Name: "sleep", Enrolled: true})
	notsleep := m.AddPod(t, nd, istiodbed.Pod{Name: "notsleep", Enrolled: true})
	v1 := m.AddPod(t, nd, istiodbed.Pod{Name: "reviews-v1", ServiceAccount: "bookinfo-reviews", Labels: map[string]string{"app": "reviews", "version": "v1"}, Enrolled: true})
	v2 := m.AddPod(t, nd, istiodbed.Pod{Name: "reviews-v2", ServiceAccount: "bookinfo-reviews", Labels: map[string]string{"app": "reviews", "version": "v2"}, Enrolled: true})
	apps := map[string]*httpApp{"reviews-v1": startHTTPApp(t, v1, 9080, "reviews-v1"), "reviews-v2": startHTTPApp(t, v2, 9080, "reviews-v2")}
	tcpEcho := mustHoldingEcho(t, v1, 9090)
	httpPort := func(port int32) corev1.ServicePort {
		return corev1.ServicePort{Name: "http", Port: port, TargetPort: intstr.FromInt32(port), Protocol: corev1.ProtocolTCP}
	}
	reviews := m.AddService(t, &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: "reviews"},
		Spec:       corev1.ServiceSpec{Selector: map[string]string{"app": "reviews"}, Ports: []corev1.ServicePort{httpPort(9080)}},
	})
	for _, v := range []string{"v1", "v2"} {
		m.AddService(t, &corev1.Service{
			ObjectMeta: metav1.ObjectMeta{Name: "reviews-" + v},
			Spec:       corev1.ServiceSpec{Selector: map[string]string{"app": "reviews", "version": v}, Ports: []corev1.ServicePort{httpPort(9080)}},
		})
	}
	// A plain TCP port (no HTTP in its name or appProtocol) behind the
	// same waypoint: istiod gives it a TCP chain.
	reviewsTCP := m.AddService(t, &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: "reviews-tcp"},
		Spec: corev1.ServiceSpec{Selector: map[string]string{"app": "reviews", "version": "v1"}, Ports: []corev1.ServicePort{
			{Name: "tcp-echo", Port: 9090, TargetPort: intstr.FromInt32(9090), Protocol: corev1.ProtocolTCP},
		}},
	})
	wpPod := m.CreateWaypoint(t, nd, "waypoint")
	wp := m.StartWaypoint(t, wpPod)
	m.Apply(t, istiod.ViewerPolicy("default", "reviews", "GET"))
	m.Apply(t, istiod.ReviewsRoute9010("default"))

	vip := netip.MustParseAddr(reviews.Spec.ClusterIP)
	url := fmt.Sprintf("http://%s/", netip.AddrPortFrom(vip, 9080))
	testutil.EventuallyNil(t, "the ztunnel to send reviews through the waypoint", func() error {
		w, err := serviceWaypoint(nd.Ztunnel, reviewsHost)
		if err != nil || w == "" {
			return fmt.Errorf("waypoint %q %v", w, err)
		}
		return nil
	})
	waitConfigDump(t, wp, "the viewer policy and the 90/10 route", "ns[default]-policy[reviews-viewer]-rule[0]",
		weightedTo("inbound-vip|9080|http|reviews-v1.default.svc.cluster.local", 90),
		weightedTo("inbound-vip|9080|http|reviews-v2.default.svc.cluster.local", 10))

	sleepHTTP, notsleepHTTP := newPodHTTP(sleep), newPodHTTP(notsleep)
	// seen counts the requests the test sent that reached each version
	// with status 200, and the 403s per client, for the metrics below.
	seen := map[string]int{}
	get := func(t *testing.T, h *podHTTP, method string) (int, string) {
		t.Helper()
		code, body, err := h.do(method, url)
		if err != nil {
			t.Fatalf("%s %s: %v", method, url, err)
		}
		return code, body
	}

	t.Run("allowed GET", func(t *testing.T) {
		code, body := get(t, sleepHTTP, http.MethodGet)
		if code != http.StatusOK || !strings.HasPrefix(body, "reviews-v") {
			t.Fatalf("sleep GET: %d %q, want 200 from reviews", code, body)
		}
		seen["sleep 200 "+body]++
		// The application sees the waypoint's pod address, as behind
		// Istio's ztunnel.
		reqs := apps[body].requests()
		if got := reqs[len(reqs)-1].Peer.Addr(); got != wpPod.Pod.IPv4 {
			t.Errorf("%s saw the request from %s, want the waypoint's %s", body, got, wpPod.Pod.IPv4)
		}
	})

	t.Run("DELETE denied", func(t *testing.T) {
		before := len(apps["reviews-v1"].requests()) + len(apps["reviews-v2"].requests())
		code, body := get(t, sleepHTTP, http.MethodDelete)
		if code != http.StatusForbidden || body != "RBAC: access denied" {
			t.Fatalf("sleep DELETE: %d %q, want 403 \"RBAC: access denied\"", code, body)
		}
		seen["sleep 403"]++
		if after := len(apps["reviews-v1"].requests()) + len(apps["reviews-v2"].requests()); after != before {
			t.Errorf("a denied request reached reviews")
		}
	})

	t.Run("other principal denied", func(t *testing.T) {
		code, body := get(t, notsleepHTTP, http.MethodGet)
		if code != http.StatusForbidden || body != "RBAC: access denied" {
			t.Fatalf("notsleep GET: %d %q, want 403", code, body)
		}
		seen["notsleep 403"]++
	})

	// split sends 1000 GETs from sleep over its one connection and checks
	// that reviews-v2 served 10 % of them within binomial bounds.
	split := func(t *testing.T) {
		t.Helper()
		const n, p = 1000, 0.1
		v2s := 0
		for range n {
			code, body := get(t, sleepHTTP, http.MethodGet)
			if code != http.StatusOK {
				t.Fatalf("GET: %d %q", code, body)
			}
			seen["sleep 200 "+body]++
			if body == "reviews-v2" {
				v2s++
			}
		}
		// Binomial(1000, 0.1): mean 100, σ ≈ 9.5. Five σ either way
		// fails a correct split once in ~3.5 million runs; 50/50 or 100/0
		// is far outside.
		sigma := math.Sqrt(n * p * (1 - p))
		if math.Abs(float64(v2s)-n*p) > 5*sigma {
			t.Errorf("reviews-v2 served %d of %d requests, want %v ± %.0f", v2s, n, n*p, 5*sigma)
		}
		t.Logf("reviews-v2 served %d of %d requests", v2s, n)
		if c := sleepHTTP.connections(); c != 1 {
			t.Errorf("sleep used %d connections, want its one keep-alive connection", c)
		}
	}

	t.Run("HTTPRoute 90/10 over 1000 requests", split)

	t.Run("istio_requests_total", func(t *testing.T) {
		ss := scrape(t, wp.Process, "istio_requests_total")
		// app and version are the canonical name and revision, as
		// Envoy's workload_discovery reports them; a pod without a
		// version label has revision "latest". An RBAC denial carries
		// no response flag (Envoy has none for it) and no upstream.
		source := func(sa string) map[string]string {
			return map[string]string{
				"reporter": "waypoint", "source_workload": sa, "source_canonical_service": sa,
				"source_canonical_revision": "latest", "source_workload_namespace": "default",
				"source_principal": "spiffe://cluster.local/ns/default/sa/" + sa, "source_app": sa,
				"source_version": "latest", "source_cluster": "Kubernetes",
				"request_protocol": "http", "grpc_response_status": "", "connection_security_policy": "mutual_tls",
			}
		}
		ok := func(version string) map[string]string {
			l := source("sleep")
			for k, v := range map[string]string{
				"destination_workload": "reviews-" + version, "destination_workload_namespace": "default",
				"destination_principal": "spiffe://cluster.local/ns/default/sa/bookinfo-reviews",
				"destination_app":       "reviews", "destination_version": version,
				"destination_service":           "reviews-" + version + ".default.svc.cluster.local",
				"destination_canonical_service": "reviews", "destination_canonical_revision": version,
				"destination_service_name": "reviews-" + version, "destination_service_namespace": "default",
				"destination_cluster": "Kubernetes", "response_code": "200", "response_flags": "-",
			} {
				l[k] = v
			}
			return l
		}
		denied := func(sa string) map[string]string {
			l := source(sa)
			for k, v := range map[string]string{
				"destination_workload": "unknown", "destination_workload_namespace": "unknown",
				"destination_principal": "unknown", "destination_app": "unknown", "destination_version": "unknown",
				"destination_service": reviewsHost, "destination_canonical_service": "unknown",
				"destination_canonical_revision": "unknown", "destination_service_name": "reviews",
				"destination_service_namespace": "default", "destination_cluster": "unknown",
				"response_code": "403", "response_flags": "-",
			} {
				l[k] = v
			}
			return l
		}
		for _, c := range []struct {
			labels map[string]string
			want   int
		}{
			{ok("v1"), seen["sleep 200 reviews-v1"]},
			{ok("v2"), seen["sleep 200 reviews-v2"]},
			{denied("sleep"), seen["sleep 403"]},
			{denied("notsleep"), seen["notsleep 403"]},
		} {
			found := false
			for _, s := range ss {
				if equalLabels(s.Labels, c.labels) {
					found = true
					if int(s.Value) != c.want {
						t.Errorf("istio_requests_total%v = %v, want %d", c.labels, s.Value, c.want)
					}
				}
			}
			if !found {
				t.Errorf("no istio_requests_total series with exactly the labels %v; have:\n%s", c.labels, seriesText(ss))
			}
		}
	})

	t.Run("VirtualService and DestinationRule 90/10 over 1000 requests", func(t *testing.T) {
		// The 2022 walkthrough's form, in place of the HTTPRoute (mixing
		// the two for one host is undefined in Istio).
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		if out, err := m.CP.Kubectl(ctx, "delete", "-n", istiodbed.Namespace, "httproute", "reviews"); err != nil {
			t.Fatalf("%v\n%s", err, out)
		}
		m.Apply(t, istiod.ReviewsVirtualService9010("default"))
		testutil.EventuallyNil(t, "the subset route in the waypoint's configuration", func() error {
			body, err := waypointConfig(wp)
			switch {
			case err != nil:
				return err
			case strings.Contains(body, weightedTo("inbound-vip|9080|http|reviews-v2.default.svc.cluster.local", 10)):
				return errors.New("the HTTPRoute's split is still there")
			case !strings.Contains(body, weightedTo("inbound-vip|9080|http/v2|reviews.default.svc.cluster.local", 10)):
				return errors.New("no subset split yet")
			}
			return nil
		})
		split(t)
	})

	t.Run("TCP service behind the waypoint", func(t *testing.T) {
		addr := netip.AddrPortFrom(netip.MustParseAddr(reviewsTCP.Spec.ClusterIP), 9090)
		if err := roundTrip(sleep, addr, "plain tcp through the waypoint"); err != nil {
			t.Fatalf("sleep → %s: %v", addr, err)
		}
		if got := tcpEcho.lastPeer(t).Addr(); got != wpPod.Pod.IPv4 {
			t.Errorf("the TCP echo saw %s, want the waypoint's %s", got, wpPod.Pod.IPv4)
		}
		testutil.Eventually(t, "the waypoint's TCP metrics", func() bool {
			return promtext.Sum(scrape(t, wp.Process, "istio_tcp_connections_closed_total"), map[string]string{
				"reporter": "waypoint", "destination_service": "reviews-tcp.default.svc.cluster.local",
				"source_principal": sleepID, "request_protocol": "tcp",
			}) >= 1
		})
	})

	t.Run("Istio's HBONE client", func(t *testing.T) {
		bin := istiod.HBONEInterop(t)
		for _, c := range []struct{ sa, want string }{{"sleep", "HTTP/1.1 200"}, {"notsleep", "HTTP/1.1 403"}} {
			files := istiodCertFiles(t, m, c.sa, c.sa)
			ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
			var stdout, stderr bytes.Buffer
			cmd := nd.Command(ctx, bin, "client", "-proxy", netip.AddrPortFrom(wpPod.Pod.IPv4, 15008).String(),
				"-target", netip.AddrPortFrom(vip, 9080).String(), "-server-id", "spiffe://cluster.local/ns/default/sa/waypoint",
				"-read", "12", "-cert", files[0], "-key", files[1], "-roots", files[2])
			cmd.Stdin = strings.NewReader("GET / HTTP/1.1\r\nHost: reviews:9080\r\n\r\n")
			cmd.Stdout, cmd.Stderr = &stdout, &stderr
			err := proc.RunLocked(cmd)
			cancel()
			if err != nil {
				t.Fatalf("%s: istio client: %v\n%s", c.sa, err, stderr.Bytes())
			}
			if got := stdout.String(); got != c.want {
				t.Errorf("%s through Istio's client: %q, want %q", c.sa, got, c.want)
			}
		}
	})

	t.Run("policy change applies to the next request", func(t *testing.T) {
		m.Apply(t, istiod.ViewerPolicy("default", "reviews", "GET", "DELETE"))
		waitConfigDump(t, wp, "DELETE in the viewer policy", `"DELETE"`)
		// The very next request, on the connection that was denied before.
		if code, body := get(t, sleepHTTP, http.MethodDelete); code != http.StatusOK {
			t.Fatalf("sleep DELETE after the policy allows it: %d %q", code, body)
		}
		if c := sleepHTTP.connections(); c != 1 {
			t.Errorf("sleep used %d connections, want its one keep-alive connection", c)
		}
	})

	t.Run("istiod stopped: last good configuration", func(t *testing.T) {
		if err := m.StopIstiod(); err != nil {
			t.Fatal(err)
		}
		testutil.EventuallyNil(t, "the waypoint to see istiod gone", func() error {
			if v := promtext.Sum(scrape(t, wp.Process, "amber_xds_events_total"), map[string]string{"event": "disconnects"}); v < 1 {
				return fmt.Errorf("disconnects %v", v)
			}
			return nil
		})
		for _, c := range []struct {
			h      *podHTTP
			method string
			want   int
		}{
			{sleepHTTP, http.MethodGet, 200},
			{sleepHTTP, http.MethodDelete, 200},
			{notsleepHTTP, http.MethodGet, 403},
			{newPodHTTP(sleep), http.MethodGet, 200}, // a new connection, a new HBONE stream
		} {
			if code, body := get(t, c.h, c.method); code != c.want {
				t.Errorf("%s without istiod: %d %q, want %d", c.method, code, body, c.want)
			}
		}
		if code, body, err := wp.Get(15021, "/healthz/ready"); err != nil || code != http.StatusOK {
			t.Errorf("waypoint not ready without istiod: %d %s %v", code, body, err)
		}
	})

	t.Run("waypoint killed: the service fails closed", func(t *testing.T) {
		before := len(apps["reviews-v1"].requests()) + len(apps["reviews-v2"].requests())
		refused := z.metric(t, "amber_proxy_refused_total", map[string]string{"reason": "upstream_errors"})
		if err := wp.Kill(); err != nil {
			t.Fatal(err)
		}
		for _, h := range []*podHTTP{sleepHTTP, newPodHTTP(sleep)} {
			if code, body, err := h.do(http.MethodGet, url); err == nil {
				t.Errorf("GET without the waypoint: %d %q, want the connection refused", code, body)
			}
		}
		if err := roundTrip(sleep, netip.AddrPortFrom(netip.MustParseAddr(reviewsTCP.Spec.ClusterIP), 9090), "around the waypoint?"); err == nil {
			t.Error("the TCP service answered without its waypoint")
		}
		if after := len(apps["reviews-v1"].requests()) + len(apps["reviews-v2"].requests()); after != before {
			t.Errorf("reviews served %d requests after its waypoint died", after-before)
		}
		select {
		case p := <-tcpEcho.peers:
			t.Errorf("the TCP echo got a connection from %s after the waypoint died", p)
		default:
		}
		testutil.Eventually(t, "the ztunnel's refusals", func() bool {
			return z.metric(t, "amber_proxy_refused_total", map[string]string{"reason": "upstream_errors"}) >= refused+3
		})
		// The ztunnel's access log names the waypoint it could not reach
		// for each of the three connections.
		hbone := netip.AddrPortFrom(wpPod.Pod.IPv4, 15008).String()
		if lines := z.accessLogs(map[string]string{"dst.hbone_addr": hbone, "error": "via " + hbone + ": dial"}); len(lines) < 3 {
			t.Errorf("%d access-log lines of a failed dial to the waypoint at %s, want 3", len(lines), hbone)
		}
	})
}

// equalLabels reports whether a and b are the same label set.
func equalLabels(a, b map[string]string) bool {
	if len(a) != len(b) {
		return false
	}
	for k, v := range a {
		if bv, ok := b[k]; !ok || bv != v {
			return false
		}
	}
	return true
}

func seriesText(ss []promtext.Sample) string {
	var b strings.Builder
	for _, s := range ss {
		fmt.Fprintf(&b, "  %v %v\n", s.Labels, s.Value)
	}
	return b.String()
}
