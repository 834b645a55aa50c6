package e2e

import (
	"bufio"
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"io"
	"net"
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
	"github.com/amber-mesh/amber/test/testbed"
)

const productpageHost = "productpage.default.svc.cluster.local"

// ingressPolicy is the walkthrough's L4 policy on productpage: only the
// ingress gateway's identity is admitted (enforced by productpage's
// ztunnel).
const ingressPolicy = `apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: productpage-ingress
  namespace: default
spec:
  selector:
    matchLabels:
      app: productpage
  action: ALLOW
  rules:
  - from:
    - source:
        principals: ["cluster.local/ns/istio-system/sa/istio-ingressgateway-service-account"]
`

// TestPrivilegedGateway runs the walkthrough's ingress steps on one
// testbed node with a real istiod: amber-waypoint as the legacy chart's
// istio-ingressgateway (`proxy router`, a real process in an uncaptured
// pod in istio-system with the chart's service account and labels), the
// 2022 bookinfo-gateway.yaml (server port 80 → listener 8080), sleep →
// the gateway's Service → the gateway → HBONE with its own identity →
// the ztunnel → productpage. An L4 policy admitting only the gateway's
// principal lets its requests through and denies sleep's own; istiod's
// metrics labels with reporter="source"; bad input gets local replies;
// when the gateway dies its traffic fails instead of going around it.
func TestPrivilegedGateway(t *testing.T) {
	var logs processLogs
	logs.dumpOnFailure(t)
	bin, err := meshbed.BuildWaypoint(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	m := istiodbed.Start(t, istiodbed.Options{ZtunnelBin: ztunnelBin, WaypointBin: bin, Log: logs.writer})
	nd := m.Nodes[0]

	sleep := m.AddPod(t, nd, istiodbed.Pod{Name: "sleep", Enrolled: true})
	pp := m.AddPod(t, nd, istiodbed.Pod{Name: "productpage-v1", ServiceAccount: "bookinfo-productpage", Labels: map[string]string{"app": "productpage", "version": "v1"}, Enrolled: true})
	app := startHTTPApp(t, pp, 9080, "productpage-v1")
	productpage := m.AddService(t, &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: "productpage"},
		Spec: corev1.ServiceSpec{Selector: map[string]string{"app": "productpage"}, Ports: []corev1.ServicePort{
			{Name: "http", Port: 9080, TargetPort: intstr.FromInt32(9080), Protocol: corev1.ProtocolTCP},
		}},
	})
	gwPod, gwSvc := m.CreateIngress(t, nd)
	gw := m.StartWaypoint(t, gwPod)
	m.Apply(t, istiod.BookinfoGatewayYAML("default"))
	waitConfigDump(t, gw, "bookinfo's routes on listener 8080", `"name":"0.0.0.0_8080"`, `"route_config_name":"http.8080"`,
		`"cluster":"outbound|9080||`+productpageHost+`"`)

	ingress := fmt.Sprintf("http://%s/productpage", netip.AddrPortFrom(netip.MustParseAddr(gwSvc.Spec.ClusterIP), 80))
	sleepHTTP := newPodHTTP(sleep)
	get := func(t *testing.T, url string) (int, string) {
		t.Helper()
		code, body, err := sleepHTTP.do(http.MethodGet, url)
		if err != nil {
			t.Fatalf("GET %s: %v", url, err)
		}
		return code, body
	}
	ok := 0

	t.Run("sleep through the ingress", func(t *testing.T) {
		// Until EDS brought productpage's endpoint: 503 no healthy upstream.
		testutil.EventuallyNil(t, "a 200 through the gateway", func() error {
			code, body, err := newPodHTTP(sleep).do(http.MethodGet, ingress)
			if err != nil || code != http.StatusOK || body != "productpage-v1" {
				return fmt.Errorf("GET %s: %d %q %v", ingress, code, body, err)
			}
			return nil
		})
		ok = len(app.requests())
		// The application sees the gateway's pod address: the request came
		// over HBONE from the gateway, not around it.
		reqs := app.requests()
		if got := reqs[len(reqs)-1].Peer.Addr(); got != gwPod.Pod.IPv4 {
			t.Errorf("productpage saw the request from %s, want the gateway's %s", got, gwPod.Pod.IPv4)
		}
		if code, _ := get(t, strings.TrimSuffix(ingress, "/productpage")+"/admin"); code != http.StatusNotFound {
			t.Errorf("no route: %d, want 404", code)
		}
	})

	// The Gateway API form: a Gateway of class istio and its HTTPRoute,
	// served by a second amber-waypoint in the Gateway's pod.
	apiPod, apiSvc := m.CreateGatewayAPIPod(t, nd, "bookinfo-gateway", 80, 443)
	api := m.StartWaypoint(t, apiPod)
	m.Apply(t, istiod.GatewayAPIBookinfoYAML("default"))
	// Its HTTPS listener, terminating TLS with a Secret (certificateRefs).
	m.Apply(t, istiod.BookinfoTLSYAML("default"))
	apiURL := fmt.Sprintf("http://%s", netip.AddrPortFrom(netip.MustParseAddr(apiSvc.Spec.ClusterIP), 80))

	t.Run("Gateway API form", func(t *testing.T) {
		testutil.EventuallyNil(t, "a 200 through the Gateway API gateway", func() error {
			code, body, err := newPodHTTP(sleep).do(http.MethodGet, apiURL+"/productpage")
			if err != nil || code != http.StatusOK || body != "productpage-v1" {
				return fmt.Errorf("GET %s/productpage: %d %q %v", apiURL, code, body, err)
			}
			return nil
		})
		// PathPrefix /static matches whole segments only.
		for path, want := range map[string]int{"/static/app.js": 200, "/staticx": 404} {
			if code, _ := get(t, apiURL+path); code != want {
				t.Errorf("%s: %d, want %d", path, code, want)
			}
		}
		ok = len(app.requests()) - 2 // the Gateway API gateway's own two 200s aside
	})

	t.Run("Gateway API HTTPS with the Secret", func(t *testing.T) {
		roots := x509.NewCertPool()
		roots.AppendCertsFromPEM([]byte(istiod.BookinfoCertPEM))
		https := func(sni string) (*http.Response, error) {
			hc := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{
				TLSClientConfig: &tls.Config{RootCAs: roots, ServerName: sni},
				DialContext: func(ctx context.Context, network, _ string) (net.Conn, error) {
					return sleep.Dial(ctx, network, netip.AddrPortFrom(netip.MustParseAddr(apiSvc.Spec.ClusterIP), 443).String())
				},
			}}
			resp, err := hc.Get("https://" + istiod.BookinfoHost + "/productpage")
			if err == nil {
				io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
			}
			return resp, err
		}
		testutil.EventuallyNil(t, "a 200 over HTTPS", func() error {
			resp, err := https(istiod.BookinfoHost)
			if err != nil {
				return err
			}
			if resp.StatusCode != http.StatusOK {
				return fmt.Errorf("%d", resp.StatusCode)
			}
			return nil
		})
		if _, err := https("evil.example.com"); err == nil {
			t.Error("a server name the listener does not serve got an answer")
		}
		ok = len(app.requests()) - 3
	})

	t.Run("L4 policy admits the gateway's principal only", func(t *testing.T) {
		m.Apply(t, ingressPolicy)
		direct := fmt.Sprintf("http://%s/productpage", netip.AddrPortFrom(netip.MustParseAddr(productpage.Spec.ClusterIP), 9080))
		testutil.EventuallyNil(t, "sleep's direct request to be denied", func() error {
			if code, body, err := newPodHTTP(sleep).do(http.MethodGet, direct); err == nil {
				return fmt.Errorf("direct GET: %d %q", code, body)
			}
			return nil
		})
		for range 10 {
			if code, body := get(t, ingress); code != http.StatusOK || body != "productpage-v1" {
				t.Fatalf("through the gateway with the policy: %d %q", code, body)
			}
			ok++
		}
		// The Gateway API gateway's identity (bookinfo-gateway-istio) is
		// not admitted: productpage's ztunnel refuses its HBONE, and the
		// gateway answers 503 rather than reaching around it.
		before := len(app.requests())
		if code, body := get(t, apiURL+"/productpage"); code != http.StatusServiceUnavailable || !strings.HasPrefix(body, "upstream connect error") {
			t.Errorf("another gateway's principal: %d %q, want 503", code, body)
		}
		if len(app.requests()) != before {
			t.Error("productpage served a principal the policy does not admit")
		}
	})

	t.Run("istio_requests_total with reporter source", func(t *testing.T) {
		want := map[string]string{
			"reporter": "source", "source_workload": istiod.IngressName, "source_canonical_service": istiod.IngressName,
			"source_canonical_revision": "latest", "source_workload_namespace": "istio-system", "source_principal": "unknown",
			"source_app": istiod.IngressName, "source_version": "unknown", "source_cluster": "Kubernetes",
			"destination_workload": "productpage-v1", "destination_workload_namespace": "default", "destination_principal": "unknown",
			"destination_app": "productpage", "destination_version": "v1", "destination_service": productpageHost,
			"destination_canonical_service": "productpage", "destination_canonical_revision": "v1",
			"destination_service_name": "productpage", "destination_service_namespace": "default", "destination_cluster": "Kubernetes",
			"request_protocol": "http", "response_code": "200", "grpc_response_status": "", "response_flags": "-",
			"connection_security_policy": "unknown",
		}
		ss := scrape(t, gw.Process, "istio_requests_total")
		for _, s := range ss {
			if equalLabels(s.Labels, want) {
				if int(s.Value) != ok {
					t.Errorf("istio_requests_total = %v, want %d", s.Value, ok)
				}
				return
			}
		}
		t.Errorf("no istio_requests_total series with exactly %v; have:\n%s", want, seriesText(ss))
	})

	t.Run("bad input", func(t *testing.T) {
		before := len(app.requests())
		gwAddr := netip.AddrPortFrom(gwPod.Pod.IPv4, 8080)
		for _, tc := range []struct {
			name, payload string
			status        int
		}{
			{"smuggling: CL and TE", "POST /productpage HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400},
			{"oversized header", "GET /productpage HTTP/1.1\r\nHost: a\r\nX-Big: " + strings.Repeat("a", 70<<10) + "\r\n\r\n", 431},
			{"double-encoded dot segments", "GET /static/%2%65%2%65/admin HTTP/1.1\r\nHost: a\r\n\r\n", 400},
		} {
			code, err := rawHTTP(sleep, gwAddr, tc.payload)
			if err != nil || code != tc.status {
				t.Errorf("%s: %d %v, want %d", tc.name, code, err, tc.status)
			}
		}
		if n := len(app.requests()) - before; n != 0 {
			t.Errorf("productpage received %d of the refused requests", n)
		}
	})

	t.Run("gateway killed: no way around it", func(t *testing.T) {
		before := len(app.requests())
		if err := gw.Kill(); err != nil {
			t.Fatal(err)
		}
		if code, body, err := newPodHTTP(sleep).do(http.MethodGet, ingress); err == nil {
			t.Errorf("GET without the gateway: %d %q, want the connection to fail", code, body)
		}
		if err := api.Kill(); err != nil {
			t.Fatal(err)
		}
		if code, body, err := newPodHTTP(sleep).do(http.MethodGet, apiURL+"/productpage"); err == nil {
			t.Errorf("GET without the Gateway API gateway: %d %q", code, body)
		}
		if n := len(app.requests()) - before; n != 0 {
			t.Errorf("productpage served %d requests after the gateway died", n)
		}
	})
}

// rawHTTP sends payload from pod p to addr and returns the response's
// status.
func rawHTTP(p *testbed.Pod, addr netip.AddrPort, payload string) (int, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := p.Dial(ctx, "tcp", addr.String())
	if err != nil {
		return 0, err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.WriteString(c, payload); err != nil {
		return 0, err
	}
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		return 0, err
	}
	resp.Body.Close()
	return resp.StatusCode, nil
}
