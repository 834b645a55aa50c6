package proxy_test

import (
	"bufio"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	endpointv3 "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
	"google.golang.org/protobuf/types/known/structpb"

	"github.com/amber-mesh/amber/internal/testutil"
	"github.com/amber-mesh/amber/test/waypointgolden"
	"github.com/amber-mesh/amber/waypoint/config"
	"github.com/amber-mesh/amber/waypoint/proxy"
	"github.com/amber-mesh/amber/waypoint/telemetry"
	"github.com/amber-mesh/amber/xds/state"
)

const (
	ingressID   = "spiffe://cluster.local/ns/istio-system/sa/istio-ingressgateway-service-account"
	gwCluster   = "outbound|9080||productpage.default.svc.cluster.local"
	gwListener  = "0.0.0.0:8080"
	productpage = "productpage-v1"
)

// gateway is an ingress gateway under test: a Proxy configured with a
// router golden, its listeners on loopback, in the mesh of newMesh (whose
// pods' ztunnels it reaches over HBONE).
type gateway struct {
	m    *mesh
	p    *proxy.Proxy
	view *mesh // counters and logs of the gateway's own registry
	logs *logBuffer
}

func newGateway(t *testing.T, opts meshOptions) *gateway {
	t.Helper()
	m := newMesh(t, opts)
	g := &gateway{m: m, logs: &logBuffer{}}
	reg := prometheus.NewRegistry()
	g.view = &mesh{t: t, reg: reg}
	p, err := proxy.New(proxy.Config{
		Store: state.NewStore(), Certs: m.certs(), Identity: mustID(t, ingressID), Metrics: reg,
		Logger: slog.New(slog.NewJSONHandler(g.logs, nil)),
		Dial:   m.dialPod,
		Limits: opts.limits,
		Self: telemetry.Peer{Workload: "istio-ingressgateway", Namespace: "istio-system", CanonicalService: "istio-ingressgateway",
			CanonicalRevision: "latest", App: "istio-ingressgateway", Cluster: "Kubernetes"},
		Listen: func(ctx context.Context, _ netip.AddrPort) (net.Listener, error) {
			return (&net.ListenConfig{}).Listen(ctx, "tcp", "127.0.0.1:0")
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	g.p = p
	t.Cleanup(func() { p.Close() })
	return g
}

func compileRouter(tb testing.TB, s *waypointgolden.Snapshot) *config.Config {
	tb.Helper()
	c := config.Compile(config.Resources{Listeners: s.Listeners, Clusters: s.Clusters, Endpoints: s.Endpoints, Routes: s.Routes, Secrets: s.Secrets, Router: true})
	if err := c.Err(""); err != nil {
		tb.Fatalf("router golden: %v", err)
	}
	return c
}

// addr is where the gateway serves the configured listen address.
func (g *gateway) addr(configured string) string {
	g.m.t.Helper()
	var a net.Addr
	testutil.Eventually(g.m.t, "gateway listener "+configured, func() bool {
		a = g.p.GatewayAddrs()[netip.MustParseAddrPort(configured)]
		return a != nil
	})
	return a.String()
}

// get sends one HTTP/1.1 request to the gateway as an external client.
func (g *gateway) get(path string, hdr http.Header) (*http.Response, string) {
	g.m.t.Helper()
	hc := &http.Client{Transport: &http.Transport{DisableKeepAlives: true}}
	return do(g.m.t, hc, http.MethodGet, "http://"+g.addr(gwListener)+path, hdr, nil)
}

// raw writes payload on a new connection and reads one response.
func (g *gateway) raw(t *testing.T, payload string) (*http.Response, string) {
	t.Helper()
	c, err := net.Dial("tcp", g.addr(gwListener))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, err := io.WriteString(c, payload); err != nil {
		t.Fatal(err)
	}
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		t.Fatalf("no HTTP response: %v", err)
	}
	body, _ := io.ReadAll(resp.Body)
	return resp, string(body)
}

// TestGatewayBookinfo: the walkthrough's ingress (bookinfo-gateway.yaml,
// server port 80 → listener 8080): a client's plain HTTP request is
// routed by RDS and carried over HBONE to productpage's pod with the
// gateway's own identity; Envoy's gateway headers, telemetry with
// reporter="source", the access log.
func TestGatewayBookinfo(t *testing.T) {
	g := newGateway(t, meshOptions{})
	g.p.Update(compileRouter(t, golden(t, "router-bookinfo-gateway")))
	resp, body := g.get("/productpage", http.Header{"X-Forwarded-For": {"192.0.2.7"}, "X-Forwarded-Client-Cert": {"By=spiffe://evil"}})
	if resp.StatusCode != 200 || resp.Header.Get("Server") != "istio-envoy" {
		t.Fatalf("%d %v %s", resp.StatusCode, resp.Header, body)
	}
	var e echo
	if err := json.Unmarshal([]byte(body), &e); err != nil {
		t.Fatal(err)
	}
	if e.Backend != productpage || e.URI != "/productpage" {
		t.Errorf("echo %+v", e)
	}
	if xff := e.Header.Get("X-Forwarded-For"); xff != "192.0.2.7,127.0.0.1" {
		t.Errorf("x-forwarded-for %q: want the client's address appended", xff)
	}
	if e.Header.Get("X-Request-Id") == "" || e.Header.Get("X-Forwarded-Client-Cert") != "" || e.Header.Get("X-Forwarded-Proto") != "http" {
		t.Errorf("upstream headers %v", e.Header)
	}
	pp := g.m.pods[productpage]
	if peers := pp.seenPeers(); len(peers) != 1 || peers[0] != ingressID {
		t.Errorf("productpage's ztunnel saw %v, want the gateway's own identity", peers)
	}
	if pp.authorities[0] != "10.244.0.10:9080" {
		t.Errorf("CONNECT %q", pp.authorities[0])
	}
	want := map[string]string{
		"reporter": "source", "source_workload": "istio-ingressgateway", "source_workload_namespace": "istio-system",
		"source_canonical_service": "istio-ingressgateway", "source_canonical_revision": "latest", "source_principal": "unknown",
		"source_app": "istio-ingressgateway", "source_version": "unknown", "source_cluster": "Kubernetes",
		"destination_workload": "productpage-v1", "destination_workload_namespace": "default", "destination_principal": "unknown",
		"destination_app": "productpage", "destination_version": "v1", "destination_service": "productpage.default.svc.cluster.local",
		"destination_canonical_service": "productpage", "destination_canonical_revision": "v1",
		"destination_service_name": "productpage", "destination_service_namespace": "default", "destination_cluster": "Kubernetes",
		"request_protocol": "http", "response_code": "200", "grpc_response_status": "", "response_flags": "-",
		"connection_security_policy": "unknown",
	}
	testutil.Eventually(t, "istio_requests_total with reporter=source", func() bool { return g.view.counter("istio_requests_total", want) == 1 })
	// The access-log line is written after the request is counted, on
	// the request's own goroutine: wait for it too (1 run in ≈ 200 read
	// the log first and found none).
	logged := map[string]any{"gateway": "0.0.0.0_8080", "path": "/productpage", "status": 200, "cluster": gwCluster}
	testutil.Eventually(t, "the request's access-log line", func() bool { return len(g.logs.lines(logged)) > 0 })
	if l := g.logs.lines(logged); len(l) != 1 {
		t.Errorf("access log: %d lines", len(l))
	}

	// No route: 404 NR, counted; the application sees nothing.
	resp, _ = g.get("/admin", nil)
	if resp.StatusCode != 404 || resp.Header.Get("Server") != "istio-envoy" {
		t.Errorf("/admin: %d %v", resp.StatusCode, resp.Header)
	}
	g.view.waitRefused("no_route", 1)
	if len(pp.app.requests()) != 1 {
		t.Errorf("application saw %d requests", len(pp.app.requests()))
	}
	// Path normalisation before routing: the application sees the
	// normalised path.
	resp, body = g.get("/api/v1/products/../../../productpage", nil)
	if resp.StatusCode != 200 || !strings.Contains(body, `"uri":"/productpage"`) {
		t.Errorf("normalised path: %d %s", resp.StatusCode, body)
	}
	// HTTP/2 with prior knowledge on the same listener.
	h2 := &http.Client{Transport: &http2.Transport{AllowHTTP: true, DialTLSContext: func(ctx context.Context, n, a string, _ *tls.Config) (net.Conn, error) {
		return (&net.Dialer{}).DialContext(ctx, n, a)
	}}}
	resp, body = do(t, h2, http.MethodGet, "http://"+g.addr(gwListener)+"/productpage", nil, nil)
	if resp.StatusCode != 200 || resp.ProtoMajor != 2 || !strings.Contains(body, `"backend":"productpage-v1"`) {
		t.Errorf("h2c: %d %s %s", resp.StatusCode, resp.Proto, body)
	}
}

// TestGatewayUpstreamFailClosed: what the gateway must not reach it
// refuses with a status and a counter: a pod whose ztunnel presents an
// identity outside the trust domain (503 UF, upstream_identity), a sidecar
// endpoint needing Istio mTLS (503, upstream_sidecar_mtls), no endpoint
// (503 no healthy upstream), no configuration for the listener.
func TestGatewayUpstreamFailClosed(t *testing.T) {
	t.Run("foreign trust domain", func(t *testing.T) {
		g := newGateway(t, meshOptions{certAs: map[string]string{productpage: "spiffe://evil.example/ns/default/sa/bookinfo-productpage"}})
		g.p.Update(compileRouter(t, golden(t, "router-bookinfo-gateway")))
		resp, body := g.get("/productpage", nil)
		if resp.StatusCode != 503 || !strings.HasPrefix(body, "upstream connect error") {
			t.Errorf("%d %q", resp.StatusCode, body)
		}
		g.view.waitRefused("upstream_identity", 1)
		if len(g.m.pods[productpage].app.requests()) != 0 {
			t.Error("the application was reached")
		}
	})
	t.Run("sidecar endpoint", func(t *testing.T) {
		g := newGateway(t, meshOptions{})
		s := golden(t, "router-bookinfo-gateway")
		la := endpoints(t, s, gwCluster)
		la.Endpoints[0].LbEndpoints[0] = &endpointv3.LbEndpoint{
			HostIdentifier: &endpointv3.LbEndpoint_Endpoint{Endpoint: &endpointv3.Endpoint{Address: &corev3.Address{Address: &corev3.Address_SocketAddress{
				SocketAddress: &corev3.SocketAddress{Address: "10.244.0.10", PortSpecifier: &corev3.SocketAddress_PortValue{PortValue: 9080}},
			}}}},
			Metadata: &corev3.Metadata{FilterMetadata: map[string]*structpb.Struct{"envoy.transport_socket_match": {Fields: map[string]*structpb.Value{"tlsMode": structpb.NewStringValue("istio")}}}},
		}
		g.p.Update(compileRouter(t, s))
		resp, _ := g.get("/productpage", nil)
		if resp.StatusCode != 503 {
			t.Errorf("%d", resp.StatusCode)
		}
		g.view.waitRefused("upstream_sidecar_mtls", 1)
	})
	t.Run("no endpoints", func(t *testing.T) {
		g := newGateway(t, meshOptions{})
		s := golden(t, "router-bookinfo-gateway")
		endpoints(t, s, gwCluster).Endpoints = nil
		g.p.Update(compileRouter(t, s))
		resp, body := g.get("/productpage", nil)
		if resp.StatusCode != 503 || body != "no healthy upstream" {
			t.Errorf("%d %q", resp.StatusCode, body)
		}
	})
	t.Run("route configuration missing", func(t *testing.T) {
		g := newGateway(t, meshOptions{})
		s := golden(t, "router-bookinfo-gateway")
		s.Routes = nil
		g.p.Update(config.Compile(config.Resources{Listeners: s.Listeners, Clusters: s.Clusters, Endpoints: s.Endpoints, Router: true}))
		resp, _ := g.get("/productpage", nil)
		if resp.StatusCode != 503 || len(g.m.pods[productpage].app.requests()) != 0 {
			t.Errorf("%d", resp.StatusCode)
		}
	})
}

// TestGatewayUseWaypoint: with istio.io/ingress-use-waypoint the gateway
// sends HBONE to the Service's waypoint, CONNECT to the Service's VIP,
// and the waypoint (the mesh's, with its own configuration) forwards to
// the pod.
func TestGatewayUseWaypoint(t *testing.T) {
	g := newGateway(t, meshOptions{})
	g.m.wp.Update(compile(t, golden(t, "base")))
	g.m.route(netip.MustParseAddrPort("10.244.0.20:15008"), g.m.addr)
	g.p.Update(compileRouter(t, golden(t, "router-ingress-use-waypoint")))
	resp, body := g.get("/productpage", nil)
	if resp.StatusCode != 200 || !strings.Contains(body, `"backend":"productpage-v1"`) {
		t.Fatalf("%d %s", resp.StatusCode, body)
	}
	// The pod's ztunnel saw the waypoint, not the gateway.
	if peers := g.m.pods[productpage].seenPeers(); !slices.Equal(peers, []string{waypointID}) {
		t.Errorf("productpage's ztunnel saw %v", peers)
	}
}

// TestGatewayAPI: the Gateway API form's listener 0.0.0.0_80.
func TestGatewayAPI(t *testing.T) {
	g := newGateway(t, meshOptions{})
	g.p.Update(compileRouter(t, golden(t, "router-gateway-api")))
	hc := &http.Client{Transport: &http.Transport{DisableKeepAlives: true}}
	var a string
	testutil.Eventually(t, "listener 0.0.0.0:80", func() bool {
		x := g.p.GatewayAddrs()[netip.MustParseAddrPort("0.0.0.0:80")]
		if x != nil {
			a = x.String()
		}
		return x != nil
	})
	for path, want := range map[string]int{"/static": 200, "/static/app.js": 200, "/staticx": 404, "/productpage": 200} {
		if resp, _ := do(t, hc, http.MethodGet, "http://"+a+path, nil, nil); resp.StatusCode != want {
			t.Errorf("%s: %d, want %d", path, resp.StatusCode, want)
		}
	}
	// A new configuration without the listener closes it.
	s := golden(t, "router-gateway-api")
	s.Listeners = slices.DeleteFunc(s.Listeners, func(l *listenerv3.Listener) bool { return l.GetName() == "0.0.0.0_80" })
	g.p.Update(compileRouter(t, s))
	if _, err := net.DialTimeout("tcp", a, time.Second); err == nil {
		t.Error("the listener removed from LDS still accepts")
	}
}

// TestGatewayBadInput: the waypoint's HTTP/1 and HTTP/2 guards on the
// gateway's listener: each bad request a local reply and a counter,
// nothing reaching the application.
func TestGatewayBadInput(t *testing.T) {
	g := newGateway(t, meshOptions{limits: proxy.Limits{MaxRequestHeaderBytes: 8 << 10, HeaderTimeout: 300 * time.Millisecond}})
	g.p.Update(compileRouter(t, golden(t, "router-bookinfo-gateway")))
	const head = "POST /productpage HTTP/1.1\r\nHost: istio-ingressgateway.istio-system\r\n"
	for _, tc := range []struct {
		name, payload string
		status        int
		cause         string
	}{
		{"CL and TE", head + "Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400, "content_length_and_transfer_encoding"},
		{"duplicate Content-Length", head + "Content-Length: 5\r\nContent-Length: 6\r\n\r\nhello", 400, "duplicate_content_length"},
		{"oversized header", head + "X-Big: " + strings.Repeat("a", 10<<10) + "\r\n\r\n", 431, "header_too_large"},
		{"double-encoded dot segments", "GET /static/%2%65%2%65/admin HTTP/1.1\r\nHost: a\r\n\r\n", 400, "request_target"},
		{"slowloris", "GET /productpage HTTP/1.1\r\nHost: a\r\nX-A: 1\r\n", 408, "header_timeout"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			before := g.view.refused(tc.cause)
			resp, _ := g.raw(t, tc.payload)
			if resp.StatusCode != tc.status || resp.Header.Get("Server") != "istio-envoy" {
				t.Errorf("%d %v, want %d", resp.StatusCode, resp.Header, tc.status)
			}
			g.view.waitRefused(tc.cause, before+1)
		})
	}
	t.Run("HTTP/2 rapid reset", func(t *testing.T) {
		c, err := net.Dial("tcp", g.addr(gwListener))
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		h := &h2conn{fr: http2.NewFramer(c, c)}
		h.enc = hpack.NewEncoder(&h.buf)
		io.WriteString(c, http2.ClientPreface)
		h.fr.WriteSettings()
		go h.closed(t)
		for id := uint32(1); id < 2*400; id += 2 {
			if h.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: h.block(request("/hold")...), EndHeaders: true, EndStream: true}) != nil {
				break
			}
			if h.fr.WriteRSTStream(id, http2.ErrCodeCancel) != nil {
				break
			}
		}
		g.view.waitRefused("h2_rapid_reset", 1)
	})
	for _, e := range g.m.pods[productpage].app.requests() {
		if e.URI != "/hold" {
			t.Errorf("the application received %+v", e)
		}
	}
}

// TestGatewayClosed: once the gateway is closed its listener refuses
// connections: no request reaches the application around it.
func TestGatewayClosed(t *testing.T) {
	g := newGateway(t, meshOptions{})
	g.p.Update(compileRouter(t, golden(t, "router-bookinfo-gateway")))
	a := g.addr(gwListener)
	if resp, _ := g.get("/productpage", nil); resp.StatusCode != 200 {
		t.Fatalf("%d", resp.StatusCode)
	}
	g.p.Close()
	if c, err := net.DialTimeout("tcp", a, time.Second); err == nil {
		c.Close()
		t.Error("a closed gateway accepts connections")
	}
}

// TestGatewayDrain: while the gateway quiesces (pilot-agent's drain
// after SIGTERM) its listener still answers, each response ending its
// connection; Drain closes the listener and returns when its context
// ends.
func TestGatewayDrain(t *testing.T) {
	g := newGateway(t, meshOptions{})
	g.p.Update(compileRouter(t, golden(t, "router-bookinfo-gateway")))
	a := g.addr(gwListener)
	g.p.Quiesce()
	testutil.Eventually(t, "a response saying Connection: close", func() bool {
		resp, _ := g.get("/productpage", nil)
		return resp.StatusCode == 200 && resp.Close
	})
	ctx, cancel := context.WithCancel(context.Background())
	drained := make(chan error, 1)
	go func() { drained <- g.p.Drain(ctx) }()
	testutil.Eventually(t, "the listener closed by Drain", func() bool {
		c, err := net.DialTimeout("tcp", a, time.Second)
		if err == nil {
			c.Close()
		}
		return err != nil
	})
	select {
	case err := <-drained:
		t.Fatalf("Drain returned before its context ended: %v", err)
	default:
	}
	cancel()
	if err := <-drained; err == nil {
		t.Error("Drain: nil, want the context's error")
	}
}

// TestGatewayTLS: the Gateway API HTTPS listener terminates TLS with the
// Secret istiod served over SDS, for the SNI its chain serves, HTTP/1.1
// and HTTP/2 by ALPN; another SNI, or no Secret, fails the handshake
// (fail closed, counted), never plain text.
func TestGatewayTLS(t *testing.T) {
	g := newGateway(t, meshOptions{})
	s := golden(t, "router-gateway-api-tls")
	g.p.Update(compileRouter(t, s))
	roots := x509.NewCertPool()
	if !roots.AppendCertsFromPEM(s.Secrets[0].GetTlsCertificate().GetCertificateChain().GetInlineBytes()) {
		t.Fatal("no certificate in the golden's secret")
	}
	var a string
	testutil.Eventually(t, "listener 0.0.0.0:443", func() bool {
		if x := g.p.GatewayAddrs()[netip.MustParseAddrPort("0.0.0.0:443")]; x != nil {
			a = x.String()
		}
		return a != ""
	})
	client := func(sni string, h2 bool) *http.Client {
		tr := &http.Transport{
			TLSClientConfig:   &tls.Config{RootCAs: roots, ServerName: sni},
			DisableKeepAlives: true, ForceAttemptHTTP2: h2,
			DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
				return (&net.Dialer{}).DialContext(ctx, "tcp", a)
			},
		}
		if !h2 {
			tr.TLSNextProto = map[string]func(string, *tls.Conn) http.RoundTripper{}
		}
		return &http.Client{Transport: tr}
	}
	for _, h2 := range []bool{false, true} {
		resp, body := do(t, client("bookinfo.example.com", h2), http.MethodGet, "https://bookinfo.example.com/productpage", nil, nil)
		if resp.StatusCode != 200 || (resp.ProtoMajor == 2) != h2 || !strings.Contains(body, `"backend":"productpage-v1"`) {
			t.Errorf("h2 %v: %d %s %s", h2, resp.StatusCode, resp.Proto, body)
		}
		if !strings.Contains(body, `"X-Forwarded-Proto":["https"]`) {
			t.Errorf("x-forwarded-proto: %s", body)
		}
	}
	if _, err := client("evil.example.com", false).Get("https://evil.example.com/productpage"); err == nil {
		t.Error("a server name no chain serves got an answer")
	}
	g.view.waitRefused("gateway_tls_handshake", 1)

	s.Secrets = nil
	g.p.Update(config.Compile(config.Resources{Listeners: s.Listeners, Clusters: s.Clusters, Endpoints: s.Endpoints, Routes: s.Routes, Router: true}))
	if _, err := client("bookinfo.example.com", false).Get("https://bookinfo.example.com/productpage"); err == nil {
		t.Error("an answer without the secret")
	}
	g.view.waitRefused("gateway_tls_handshake", 2)
	c, err := net.Dial("tcp", a)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	io.WriteString(c, "GET /productpage HTTP/1.1\r\nHost: a\r\n\r\n")
	if b, _ := io.ReadAll(c); strings.Contains(string(b), "HTTP/1.1") {
		t.Errorf("plain text on the TLS port: %q", b)
	}
}

// TestGatewayListenError: a listen address that cannot be opened is
// counted and reported (readiness fails on it) until a configuration no
// longer has it.
func TestGatewayListenError(t *testing.T) {
	m := newMesh(t, meshOptions{})
	reg := prometheus.NewRegistry()
	p, err := proxy.New(proxy.Config{
		Store: state.NewStore(), Certs: m.certs(), Identity: mustID(t, ingressID), Metrics: reg, Dial: m.dialPod,
		Listen: func(ctx context.Context, a netip.AddrPort) (net.Listener, error) {
			if a.Port() == 80 {
				return nil, errors.New("bind: permission denied")
			}
			return (&net.ListenConfig{}).Listen(ctx, "tcp", "127.0.0.1:0")
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	view := &mesh{t: t, reg: reg}
	p.Update(compileRouter(t, golden(t, "router-gateway-api")))
	if err := p.ListenError(); err == nil || !strings.Contains(err.Error(), "0.0.0.0:80") {
		t.Errorf("ListenError %v", err)
	}
	if view.refused("gateway_listen_failed") != 1 {
		t.Errorf("gateway_listen_failed %v", view.refused("gateway_listen_failed"))
	}
	p.Update(compileRouter(t, golden(t, "router-bookinfo-gateway")))
	if err := p.ListenError(); err != nil {
		t.Errorf("after the listener went away: %v", err)
	}
}
