package proxy_test

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	endpointv3 "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	hcmv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
	"golang.org/x/net/http2"
	"google.golang.org/protobuf/types/known/anypb"

	"github.com/amber-mesh/amber/internal/testutil"
	"github.com/amber-mesh/amber/test/waypointgolden"
	"github.com/amber-mesh/amber/tunnel/ca"
	"github.com/amber-mesh/amber/tunnel/certs"
	"github.com/amber-mesh/amber/tunnel/hbone"
	"github.com/amber-mesh/amber/tunnel/identity"
	"github.com/amber-mesh/amber/waypoint/config"
	"github.com/amber-mesh/amber/waypoint/internal/memnet"
	"github.com/amber-mesh/amber/waypoint/proxy"
	"github.com/amber-mesh/amber/xds/state"
)

// The walkthrough mesh of the goldens (test/istiod waypointmesh_test.go).
const (
	trustDomain    = "cluster.local"
	productpageVIP = "10.96.10.1:9080"
	reviewsVIP     = "10.96.10.2:9080"
	kubernetesVIP  = "10.96.0.1:443"
	sleepID        = "spiffe://cluster.local/ns/default/sa/sleep"
	notSleepID     = "spiffe://cluster.local/ns/default/sa/notsleep"
	otherNsID      = "spiffe://cluster.local/ns/other/sa/sleep"
	waypointID     = "spiffe://cluster.local/ns/default/sa/waypoint"
	// sleepAddr is the sleep pod in the goldens' WDS; the test's HBONE
	// client names it in the CONNECT's forwarded header, as a ztunnel
	// dialling from its node's address does.
	sleepAddr = "10.244.0.5:40000"
)

func mustID(tb testing.TB, s string) identity.ID {
	tb.Helper()
	id, err := identity.Parse(s)
	if err != nil {
		tb.Fatal(err)
	}
	return id
}

// latest is the newest istiod version with goldens.
func latest(tb testing.TB) string {
	tb.Helper()
	vs, err := waypointgolden.Versions()
	if err != nil || len(vs) == 0 {
		tb.Fatalf("no goldens: %v", err)
	}
	return vs[len(vs)-1]
}

// golden loads a scenario of the newest istiod's goldens.
func golden(tb testing.TB, scenario string) *waypointgolden.Snapshot {
	tb.Helper()
	s, err := waypointgolden.Load(latest(tb), scenario)
	if err != nil {
		tb.Fatal(err)
	}
	return s
}

// compile compiles a golden snapshot, which must compile cleanly.
func compile(tb testing.TB, s *waypointgolden.Snapshot) *config.Config {
	tb.Helper()
	c := config.Compile(config.Resources{Listeners: s.Listeners, Clusters: s.Clusters, Endpoints: s.Endpoints})
	if err := c.Err(""); err != nil {
		tb.Fatalf("compile: %v", err)
	}
	return c
}

// mesh is the test world: a local CA, workload discovery from the
// goldens, the waypoint under test on a loopback port, and for every
// golden workload that backs a service an HTTP application behind a fake
// destination ztunnel (a real hbone.Server) on loopback. The waypoint
// reaches pod addresses through a dial function mapping them to those
// listeners.
type mesh struct {
	t     testing.TB
	net   network
	caDir string
	ca    *ca.Local
	store *state.Store
	reg   *prometheus.Registry
	logs  *logBuffer
	wp    *proxy.Proxy
	addr  netip.AddrPort
	wpID  identity.ID

	mu   sync.Mutex                        // guards dial
	dial map[netip.AddrPort]netip.AddrPort // pod address → loopback listener

	pods map[string]*pod // by workload name
}

// pod is one application pod: its app and its ztunnel's HBONE server.
type pod struct {
	name string
	ip   netip.Addr
	id   identity.ID
	app  *httpApp
	net  network
	// reject, when non-zero, makes the ztunnel refuse CONNECTs with it.
	reject atomic.Int32
	// peers records the identities that opened CONNECTs, and authorities
	// their :authority.
	mu          sync.Mutex
	peers       []string
	authorities []string
}

type meshOptions struct {
	limits proxy.Limits
	// certAs presents another identity from a pod's ztunnel (by
	// workload name), as a pod IP reused by another workload would.
	certAs map[string]string
	// inMemory connects everything through a memnet.Network instead of
	// loopback sockets, for tests in a synctest bubble (where time is
	// what they test).
	inMemory bool
}

// network is where the mesh's listeners and connections live: loopback
// sockets, or memory for a synctest bubble.
type network interface {
	listen(tb testing.TB) (net.Listener, netip.AddrPort)
	dial(ctx context.Context, to netip.AddrPort) (net.Conn, error)
}

type loopback struct{}

func (loopback) listen(tb testing.TB) (net.Listener, netip.AddrPort) {
	tb.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		tb.Fatal(err)
	}
	return ln, ln.Addr().(*net.TCPAddr).AddrPort()
}

func (loopback) dial(ctx context.Context, to netip.AddrPort) (net.Conn, error) {
	var d net.Dialer
	return d.DialContext(ctx, "tcp", to.String())
}

type inMemory struct{ n *memnet.Network }

var loopbackAddr = netip.MustParseAddr("127.0.0.1")

func (m inMemory) listen(tb testing.TB) (net.Listener, netip.AddrPort) {
	tb.Helper()
	ln, err := m.n.Listen(netip.AddrPortFrom(loopbackAddr, 0))
	if err != nil {
		tb.Fatal(err)
	}
	return ln, ln.AddrPort()
}

func (m inMemory) dial(ctx context.Context, to netip.AddrPort) (net.Conn, error) {
	return m.n.Dial(ctx, loopbackAddr, to)
}

func newMesh(tb testing.TB, opts meshOptions) *mesh {
	tb.Helper()
	caDir := filepath.Join(tb.TempDir(), "ca")
	local, err := ca.OpenLocal(caDir, trustDomain)
	if err != nil {
		tb.Fatal(err)
	}
	var nw network = loopback{}
	if opts.inMemory {
		nw = inMemory{&memnet.Network{}}
	}
	m := &mesh{
		t: tb, net: nw, caDir: caDir, ca: local, store: state.NewStore(), reg: prometheus.NewRegistry(), logs: &logBuffer{},
		dial: map[netip.AddrPort]netip.AddrPort{}, pods: map[string]*pod{}, wpID: mustID(tb, waypointID),
	}
	wds := golden(tb, "base").Workloads
	m.store.Update(func(tx *state.Txn) {
		for _, w := range wds {
			sw, err := state.NewWorkload(w)
			if err != nil {
				tb.Fatalf("workload %s: %v", w.GetName(), err)
			}
			tx.PutWorkload(sw)
		}
	})
	for _, w := range m.store.Load().Workloads() {
		if len(w.Services) == 0 || w.Name == "sleep" || strings.HasPrefix(w.Name, "waypoint") {
			continue
		}
		id := identity.ID{TrustDomain: w.TrustDomain, Namespace: w.Namespace, ServiceAccount: w.ServiceAccount}
		if as, ok := opts.certAs[w.Name]; ok {
			id = mustID(tb, as)
		}
		m.startPod(w.Name, w.Addresses[0], id)
	}
	mgr := m.certs()
	m.wp, err = proxy.New(proxy.Config{
		Store:    m.store,
		Certs:    mgr,
		Identity: m.wpID,
		Metrics:  m.reg,
		Logger:   slog.New(slog.NewJSONHandler(m.logs, nil)),
		Dial:     m.dialPod,
		Limits:   opts.limits,
	})
	if err != nil {
		tb.Fatal(err)
	}
	var ln net.Listener
	ln, m.addr = m.net.listen(tb)
	done := make(chan error, 1)
	go func() { done <- m.wp.ServeHBONE(ln) }()
	tb.Cleanup(func() {
		if err := m.wp.Close(); err != nil {
			tb.Errorf("close waypoint: %v", err)
		}
		if err := <-done; err != proxy.ErrClosed {
			tb.Errorf("ServeHBONE: %v", err)
		}
	})
	return m
}

// certs returns a new certificate manager over the mesh CA.
func (m *mesh) certs() *certs.Manager {
	mgr := &certs.Manager{CA: m.ca}
	m.t.Cleanup(func() { mgr.Close() })
	return mgr
}

func (m *mesh) dialPod(ctx context.Context, a netip.AddrPort) (net.Conn, error) {
	m.mu.Lock()
	to, ok := m.dial[a]
	m.mu.Unlock()
	if !ok {
		return nil, fmt.Errorf("dial %s: no such pod in the test (connection refused)", a)
	}
	return m.net.dial(ctx, to)
}

// route maps a pod address to a loopback listener.
func (m *mesh) route(from, to netip.AddrPort) {
	m.mu.Lock()
	m.dial[from] = to
	m.mu.Unlock()
}

// unroute makes a pod address unreachable.
func (m *mesh) unroute(a netip.AddrPort) {
	m.mu.Lock()
	delete(m.dial, a)
	m.mu.Unlock()
}

// startPod starts a pod's application (HTTP/1.1 and h2c on one loopback
// port, standing for podIP:9080) and its ztunnel (HBONE on another,
// standing for podIP:15008), presenting id.
func (m *mesh) startPod(name string, ip netip.Addr, id identity.ID) *pod {
	p := &pod{name: name, ip: ip, id: id, net: m.net, app: startApp(m.t, m.net, name)}
	m.pods[name] = p
	mgr := m.certs()
	if id.TrustDomain != trustDomain {
		// Another trust domain of the same root, as foreignClientTLS.
		local, err := ca.OpenLocal(m.caDir, id.TrustDomain)
		if err != nil {
			m.t.Fatal(err)
		}
		mgr = &certs.Manager{CA: local}
		m.t.Cleanup(func() { mgr.Close() })
	}
	ln, lnAddr := m.net.listen(m.t)
	srv := &hbone.Server{
		TLSConfig: mgr.ServerConfig(func(net.Addr) (identity.ID, error) { return id, nil }, id.TrustDomain, trustDomain),
		Handler:   hbone.HandlerFunc(p.serveHBONE),
	}
	go srv.Serve(ln)
	m.t.Cleanup(func() { srv.Close() })
	m.route(netip.AddrPortFrom(ip, 15008), lnAddr)
	return p
}

// serveHBONE is the pod's ztunnel: it checks the CONNECT names the pod,
// records the peer, and relays to the application.
func (p *pod) serveHBONE(ctx context.Context, req *hbone.Request, rw hbone.Responder) {
	peer := "no certificate"
	if tc, ok := req.Conn.(*tls.Conn); ok {
		if id, err := certs.PeerID(tc.ConnectionState()); err == nil {
			peer = id.String()
		}
	}
	p.mu.Lock()
	p.peers = append(p.peers, peer)
	p.authorities = append(p.authorities, req.Authority)
	p.mu.Unlock()
	if code := p.reject.Load(); code != 0 {
		rw.Reject(int(code), "refused by the test")
		return
	}
	if req.Addr.Addr() != p.ip {
		rw.Reject(http.StatusBadRequest, "not this pod")
		return
	}
	up, err := p.net.dial(ctx, p.app.addr)
	if err != nil {
		rw.Reject(http.StatusServiceUnavailable, err.Error())
		return
	}
	defer up.Close()
	s, err := rw.Accept()
	if err != nil {
		return
	}
	defer s.Close()
	done := make(chan struct{})
	go func() {
		defer close(done)
		io.Copy(up, s)
		up.(interface{ CloseWrite() error }).CloseWrite()
	}()
	io.Copy(s, up)
	s.CloseWrite()
	<-done
}

func (p *pod) seenPeers() []string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return append([]string(nil), p.peers...)
}

// httpApp is a pod's application: it answers every request with what it
// received (echo), and a few paths with special behaviour.
type httpApp struct {
	name     string
	addr     netip.AddrPort
	release  chan struct{} // closed at cleanup: /block and /hold return
	gate     chan struct{} // closed by open or at cleanup: /hold answers
	gateOnce sync.Once
	mu       sync.Mutex
	got      []echo
}

// trickleGap is the pause between /trickle's chunks.
const trickleGap = 6 * time.Second

// echo is what the application saw of a request.
type echo struct {
	Backend string      `json:"backend"`
	Method  string      `json:"method"`
	URI     string      `json:"uri"`
	Host    string      `json:"host"`
	Proto   string      `json:"proto"`
	Header  http.Header `json:"header"`
	Body    int         `json:"body"`
}

func startApp(tb testing.TB, nw network, name string) *httpApp {
	a := &httpApp{name: name, release: make(chan struct{}), gate: make(chan struct{})}
	var ln net.Listener
	ln, a.addr = nw.listen(tb)
	srv := &http.Server{Handler: a, Protocols: new(http.Protocols)}
	srv.Protocols.SetHTTP1(true)
	srv.Protocols.SetUnencryptedHTTP2(true)
	go srv.Serve(ln)
	tb.Cleanup(func() {
		close(a.release)
		a.open()
		srv.Close()
	})
	return a
}

// open lets requests waiting in /hold be answered.
func (a *httpApp) open() { a.gateOnce.Do(func() { close(a.gate) }) }

func (a *httpApp) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	n, _ := io.Copy(io.Discard, r.Body)
	e := echo{Backend: a.name, Method: r.Method, URI: r.RequestURI, Host: r.Host, Proto: r.Proto, Header: r.Header, Body: int(n)}
	a.mu.Lock()
	a.got = append(a.got, e)
	a.mu.Unlock()
	w.Header().Set("X-Backend", a.name)
	switch {
	case r.URL.Path == "/block":
		w.WriteHeader(http.StatusOK)
		w.(http.Flusher).Flush()
		select {
		case <-r.Context().Done():
		case <-a.release:
		}
		return
	case r.URL.Path == "/hold":
		// No response header until the gate opens.
		select {
		case <-r.Context().Done():
			return
		case <-a.gate:
		}
		io.WriteString(w, "held")
		return
	case r.URL.Path == "/trickle":
		// Three chunks, trickleGap apart: a response that is never idle
		// for longer than trickleGap but lasts 2·trickleGap.
		for i := range 3 {
			if i > 0 {
				select {
				case <-r.Context().Done():
					return
				case <-time.After(trickleGap):
				}
			}
			io.WriteString(w, "chunk;")
			w.(http.Flusher).Flush()
		}
		return
	case r.URL.Path == "/ws":
		// A WebSocket-style upgrade that echoes raw bytes.
		if r.Header.Get("Upgrade") != "websocket" {
			w.WriteHeader(http.StatusBadRequest)
			return
		}
		c, brw, err := w.(http.Hijacker).Hijack()
		if err != nil {
			return
		}
		defer c.Close()
		// A greeting goes out with the 101, as a server that speaks first
		// sends it: the client's HTTP reader gets it with the response.
		brw.WriteString("HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n" + r.Header.Get("X-Greeting"))
		brw.Flush()
		io.Copy(c, brw)
		return
	case strings.HasPrefix(r.URL.Path, "/status/"):
		var code int
		fmt.Sscan(strings.TrimPrefix(r.URL.Path, "/status/"), &code)
		w.WriteHeader(code)
		return
	}
	w.Header().Set("Content-Type", "application/json")
	json.NewEncoder(w).Encode(e)
}

func (a *httpApp) requests() []echo {
	a.mu.Lock()
	defer a.mu.Unlock()
	return append([]echo(nil), a.got...)
}

// client is a mesh workload talking HBONE to the waypoint as a ztunnel
// does for it: its certificate, the waypoint's identity required.
type client struct {
	m    *mesh
	id   identity.ID
	pool *hbone.Pool
	// hdr is sent on every CONNECT (forwarded, baggage).
	hdr http.Header
}

func (m *mesh) client(principal string, hdr http.Header) *client {
	id := mustID(m.t, principal)
	mgr := m.certs()
	cfg := mgr.ClientConfig(id, m.wpID)
	if id.TrustDomain != trustDomain {
		// Another trust domain of the same root (an alias): ClientConfig
		// would refuse the waypoint's, so the client checks nothing.
		cfg = m.foreignClientTLS(id)
	}
	c := &client{m: m, id: id, hdr: hdr}
	c.pool = &hbone.Pool{Dial: func(ctx context.Context, key hbone.Key) (net.Conn, error) {
		nc, err := m.net.dial(ctx, key.Addr)
		if err != nil {
			return nil, err
		}
		tc := tls.Client(nc, cfg)
		if err := tc.HandshakeContext(ctx); err != nil {
			nc.Close()
			return nil, err
		}
		return tc, nil
	}}
	m.t.Cleanup(func() { c.pool.Close() })
	return c
}

// foreignClientTLS is a client configuration with a certificate for id,
// in another trust domain than the mesh CA's, from the same root.
func (m *mesh) foreignClientTLS(id identity.ID) *tls.Config {
	local, err := ca.OpenLocal(m.caDir, id.TrustDomain)
	if err != nil {
		m.t.Fatal(err)
	}
	mgr := &certs.Manager{CA: local}
	m.t.Cleanup(func() { mgr.Close() })
	cert, err := mgr.Get(context.Background(), id)
	if err != nil {
		m.t.Fatal(err)
	}
	return &tls.Config{Certificates: []tls.Certificate{*cert}, InsecureSkipVerify: true, NextProtos: []string{"h2"}, MinVersion: tls.VersionTLS13}
}

// sleep is the walkthrough's client, forwarded as from its pod address.
func (m *mesh) sleep() *client {
	return m.client(sleepID, http.Header{"Forwarded": {`for="` + sleepAddr + `"`}})
}

// connect opens a CONNECT stream to authority through the waypoint.
func (c *client) connect(ctx context.Context, authority string) (*hbone.Stream, error) {
	key := hbone.Key{Src: c.id.String(), Dst: c.m.wpID.String(), Addr: c.m.addr}
	return c.pool.Connect(ctx, key, authority, c.hdr.Clone())
}

// http1 is an HTTP/1.1 client whose connections are CONNECT streams to
// authority (one per connection, as a ztunnel makes one per TCP
// connection).
func (c *client) http1(authority string) *http.Client {
	t := &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			return c.connect(ctx, authority)
		},
		DisableCompression: true,
	}
	c.m.t.Cleanup(t.CloseIdleConnections)
	return &http.Client{Transport: t, CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
}

// http2 is an HTTP/2 (prior knowledge) client over one CONNECT stream
// per connection.
func (c *client) http2(authority string) *http.Client {
	t := &http2.Transport{
		AllowHTTP: true,
		DialTLSContext: func(ctx context.Context, _, _ string, _ *tls.Config) (net.Conn, error) {
			return c.connect(ctx, authority)
		},
		DisableCompression: true,
	}
	c.m.t.Cleanup(t.CloseIdleConnections)
	return &http.Client{Transport: t}
}

// do sends a request and returns the response with its body read.
func do(tb testing.TB, hc *http.Client, method, url string, hdr http.Header, body io.Reader) (*http.Response, string) {
	tb.Helper()
	req, err := http.NewRequest(method, url, body)
	if err != nil {
		tb.Fatal(err)
	}
	for k, v := range hdr {
		req.Header[k] = v
	}
	if h := hdr.Get("Host"); h != "" {
		req.Host = h
	}
	resp, err := hc.Do(req)
	if err != nil {
		tb.Fatalf("%s %s: %v", method, url, err)
	}
	b, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	if err != nil {
		tb.Fatalf("%s %s: body: %v", method, url, err)
	}
	return resp, string(b)
}

// raw sends payload on a fresh CONNECT stream and reads one response;
// wantClose requires the waypoint to end the stream cleanly after it.
func (c *client) raw(tb testing.TB, authority, payload string, wantClose bool) (*http.Response, string) {
	tb.Helper()
	s, err := c.connect(context.Background(), authority)
	if err != nil {
		tb.Fatalf("connect %s: %v", authority, err)
	}
	defer s.Close()
	if _, err := io.WriteString(s, payload); err != nil {
		tb.Fatalf("write: %v", err)
	}
	br := bufio.NewReader(s)
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		tb.Fatalf("no HTTP response: %v", err)
	}
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		tb.Fatalf("response body: %v", err)
	}
	if wantClose {
		if b, err := br.ReadByte(); err != io.EOF {
			tb.Errorf("after the response: %q %v, want the stream ended (EOF)", b, err)
		}
	}
	return resp, string(body)
}

// rawResponse parses the first HTTP/1 response in b.
func rawResponse(tb testing.TB, b string) (*http.Response, string) {
	tb.Helper()
	resp, err := http.ReadResponse(bufio.NewReader(strings.NewReader(b)), nil)
	if err != nil {
		tb.Fatalf("no HTTP response in %q: %v", b, err)
	}
	body, _ := io.ReadAll(resp.Body)
	return resp, string(body)
}

// counter returns the value of a counter or gauge family's sample with
// exactly these labels (0 when absent); a histogram's sample count.
func (m *mesh) counter(name string, labels map[string]string) float64 {
	for _, s := range m.samples(name) {
		if equalLabels(s.labels, labels) {
			return s.value
		}
	}
	return 0
}

type sample struct {
	labels map[string]string
	value  float64
}

func (m *mesh) samples(name string) []sample {
	mfs, err := m.reg.Gather()
	if err != nil {
		m.t.Fatalf("gather: %v", err)
	}
	var out []sample
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
		for _, mt := range mf.GetMetric() {
			l := map[string]string{}
			for _, lp := range mt.GetLabel() {
				l[lp.GetName()] = lp.GetValue()
			}
			out = append(out, sample{labels: l, value: value(mt)})
		}
	}
	return out
}

func value(mt *dto.Metric) float64 {
	switch {
	case mt.Counter != nil:
		return mt.Counter.GetValue()
	case mt.Gauge != nil:
		return mt.Gauge.GetValue()
	case mt.Histogram != nil:
		return float64(mt.Histogram.GetSampleCount())
	}
	return 0
}

func equalLabels(a, b map[string]string) bool {
	if len(a) != len(b) {
		return false
	}
	for k, v := range a {
		if b[k] != v {
			return false
		}
	}
	return true
}

// refused is amber_waypoint_refused_total for cause.
func (m *mesh) refused(cause string) float64 {
	return m.counter("amber_waypoint_refused_total", map[string]string{"cause": cause})
}

// waitRefused waits until the refusal counter of cause reached n.
func (m *mesh) waitRefused(cause string, n float64) {
	m.t.Helper()
	testutil.Eventually(m.t, "amber_waypoint_refused_total{cause="+cause+"}", func() bool { return m.refused(cause) >= n })
}

// waitSample waits for a series of name whose labels satisfy match and
// returns it: an exchange records its telemetry and access-log line once
// the response has gone out, so a client can read the response first.
func (m *mesh) waitSample(name string, match func(labels map[string]string) bool) sample {
	m.t.Helper()
	var found sample
	testutil.Eventually(m.t, "a matching "+name+" series", func() bool {
		for _, s := range m.samples(name) {
			if match(s.labels) {
				found = s
				return true
			}
		}
		return false
	})
	return found
}

// logBuffer collects the JSON access log.
type logBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (l *logBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.buf.Write(p)
}

// lines returns the access-log lines whose attributes include want.
func (l *logBuffer) lines(want map[string]any) []map[string]any {
	l.mu.Lock()
	data := l.buf.String()
	l.mu.Unlock()
	var out []map[string]any
	for _, line := range strings.Split(data, "\n") {
		if line == "" {
			continue
		}
		var rec map[string]any
		if err := json.Unmarshal([]byte(line), &rec); err != nil {
			continue
		}
		ok := rec["msg"] == "access"
		for k, v := range want {
			if fmt.Sprint(rec[k]) != fmt.Sprint(v) {
				ok = false
			}
		}
		if ok {
			out = append(out, rec)
		}
	}
	return out
}

// chain returns main_internal's filter chain name of s, to edit in place.
func chain(tb testing.TB, s *waypointgolden.Snapshot, name string) *listenerv3.FilterChain {
	tb.Helper()
	for _, l := range s.Listeners {
		if l.GetName() != config.MainInternal {
			continue
		}
		for _, fc := range l.GetFilterChains() {
			if fc.GetName() == name {
				return fc
			}
		}
	}
	tb.Fatalf("no filter chain %s", name)
	return nil
}

// editHCM edits the HTTP connection manager of chain name in s.
func editHCM(tb testing.TB, s *waypointgolden.Snapshot, name string, edit func(*hcmv3.HttpConnectionManager)) {
	tb.Helper()
	fc := chain(tb, s, name)
	f := fc.GetFilters()[len(fc.GetFilters())-1]
	h := &hcmv3.HttpConnectionManager{}
	if err := f.GetTypedConfig().UnmarshalTo(h); err != nil {
		tb.Fatal(err)
	}
	edit(h)
	a, err := anypb.New(h)
	if err != nil {
		tb.Fatal(err)
	}
	f.ConfigType = &listenerv3.Filter_TypedConfig{TypedConfig: a}
}

// editRoute edits the first route of chain name's route configuration.
func editRoute(tb testing.TB, s *waypointgolden.Snapshot, name string, edit func(*routev3.Route)) {
	tb.Helper()
	editHCM(tb, s, name, func(h *hcmv3.HttpConnectionManager) {
		edit(h.GetRouteConfig().GetVirtualHosts()[0].GetRoutes()[0])
	})
}

// cluster returns cluster name of s.
func cluster(tb testing.TB, s *waypointgolden.Snapshot, name string) *clusterv3.Cluster {
	return find(tb, s.Clusters, name, (*clusterv3.Cluster).GetName)
}

// endpoints returns the load assignment of cluster name of s.
func endpoints(tb testing.TB, s *waypointgolden.Snapshot, name string) *endpointv3.ClusterLoadAssignment {
	return find(tb, s.Endpoints, name, (*endpointv3.ClusterLoadAssignment).GetClusterName)
}

// find returns the resource called name.
func find[T any](tb testing.TB, rs []T, name string, nameOf func(T) string) T {
	tb.Helper()
	for _, r := range rs {
		if nameOf(r) == name {
			return r
		}
	}
	tb.Fatalf("no resource %s", name)
	var zero T
	return zero
}

// hboneEndpoint is an EDS endpoint the way istiod sends a mesh pod.
func hboneEndpoint(addr string) *endpointv3.LbEndpoint {
	return &endpointv3.LbEndpoint{
		HostIdentifier: &endpointv3.LbEndpoint_Endpoint{Endpoint: &endpointv3.Endpoint{
			Address: &corev3.Address{Address: &corev3.Address_EnvoyInternalAddress{EnvoyInternalAddress: &corev3.EnvoyInternalAddress{
				AddressNameSpecifier: &corev3.EnvoyInternalAddress_ServerListenerName{ServerListenerName: config.ConnectOriginate},
				EndpointId:           addr,
			}}},
		}},
		HealthStatus: corev3.HealthStatus_HEALTHY,
	}
}

const (
	productpageChain   = "inbound-vip|9080|http|productpage.default.svc.cluster.local"
	productpageCluster = productpageChain
	reviewsChain       = "inbound-vip|9080|http|reviews.default.svc.cluster.local"
	kubernetesChain    = "inbound-vip|443|tcp|kubernetes.default.svc.cluster.local"
)
