package e2e

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/amber-mesh/amber/internal/testutil"
	"github.com/amber-mesh/amber/test/istiodbed"
	"github.com/amber-mesh/amber/test/meshbed"
	"github.com/amber-mesh/amber/test/promtext"
	"github.com/amber-mesh/amber/test/testbed"
	"github.com/amber-mesh/amber/tunnel/ca"
	"github.com/amber-mesh/amber/tunnel/identity"
)

// processLogs hands istiodbed a buffer per process and keeps them for the
// test's assertions and its failure log.
type processLogs struct {
	mu   sync.Mutex
	bufs map[string]*syncBuffer
}

func (l *processLogs) get(name string) *syncBuffer {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.bufs == nil {
		l.bufs = map[string]*syncBuffer{}
	}
	if l.bufs[name] == nil {
		l.bufs[name] = &syncBuffer{}
	}
	return l.bufs[name]
}

func (l *processLogs) writer(name string) io.Writer { return l.get(name) }

// dumpOnFailure logs every process's output when tb failed.
func (l *processLogs) dumpOnFailure(tb testing.TB) {
	tb.Cleanup(func() {
		if !tb.Failed() {
			return
		}
		l.mu.Lock()
		defer l.mu.Unlock()
		for name, b := range l.bufs {
			tb.Logf("%s log:\n%s", name, b)
		}
	})
}

// appRequest is one request an app server saw.
type appRequest struct {
	Method string
	Peer   netip.AddrPort
}

// httpApp is an HTTP/1.1 server in a pod that answers every request 200
// with its name and records what it saw.
type httpApp struct {
	name string
	mu   sync.Mutex
	reqs []appRequest
}

func startHTTPApp(tb testing.TB, p *testbed.Pod, port int, name string) *httpApp {
	tb.Helper()
	ln, err := p.Listen("tcp", fmt.Sprintf("[::]:%d", port))
	if err != nil {
		tb.Fatal(err)
	}
	a := &httpApp{name: name}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.Copy(io.Discard, r.Body)
		ap, _ := netip.ParseAddrPort(r.RemoteAddr)
		a.mu.Lock()
		a.reqs = append(a.reqs, appRequest{Method: r.Method, Peer: netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())})
		a.mu.Unlock()
		io.WriteString(w, name)
	})}
	go srv.Serve(ln)
	tb.Cleanup(func() { srv.Close() })
	return a
}

// requests returns what the server saw so far.
func (a *httpApp) requests() []appRequest {
	a.mu.Lock()
	defer a.mu.Unlock()
	return append([]appRequest(nil), a.reqs...)
}

// podHTTP is an HTTP/1.1 client in a pod, over one keep-alive connection.
type podHTTP struct {
	c     *http.Client
	dials int // connections dialled
	mu    sync.Mutex
}

func newPodHTTP(p *testbed.Pod) *podHTTP {
	h := &podHTTP{}
	h.c = &http.Client{
		Timeout: 10 * time.Second,
		Transport: &http.Transport{
			MaxConnsPerHost: 1,
			DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
				h.mu.Lock()
				h.dials++
				h.mu.Unlock()
				return p.Dial(ctx, network, addr)
			},
		},
	}
	return h
}

// do sends method to url and returns the status and body.
func (h *podHTTP) do(method, url string) (int, string, error) {
	req, err := http.NewRequest(method, url, nil)
	if err != nil {
		return 0, "", err
	}
	resp, err := h.c.Do(req)
	if err != nil {
		return 0, "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b), err
}

func (h *podHTTP) connections() int {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.dials
}

// scrape returns the samples of family name on a process's metrics port.
func scrape(tb testing.TB, p *meshbed.Process, name string) []promtext.Sample {
	tb.Helper()
	code, body, err := p.Get(15020, "/stats/prometheus")
	if err != nil || code != http.StatusOK {
		tb.Fatalf("scrape: %d %v", code, err)
	}
	ss, err := promtext.Parse(strings.NewReader(body), name)
	if err != nil {
		tb.Fatal(err)
	}
	return ss
}

// serviceWaypoint returns the waypoint the ztunnel's configuration names
// for the service hostname, "" when none (or the service is unknown).
func serviceWaypoint(z *meshbed.Ztunnel, hostname string) (string, error) {
	body, err := z.ConfigDump()
	if err != nil {
		return "", err
	}
	var d struct {
		Services []struct {
			Hostname string `json:"hostname"`
			Waypoint string `json:"waypoint"`
		} `json:"services"`
	}
	if err := json.Unmarshal([]byte(body), &d); err != nil {
		return "", err
	}
	for _, s := range d.Services {
		if s.Hostname == hostname {
			return s.Waypoint, nil
		}
	}
	return "", nil
}

// waypointConfig returns the waypoint's Envoy config_dump without white space.
func waypointConfig(w *meshbed.Waypoint) (string, error) {
	body, err := w.Admin("/config_dump")
	return strings.Join(strings.Fields(body), ""), err
}

// waitConfigDump waits until the waypoint's Envoy config_dump contains
// every one of needles (white space aside).
func waitConfigDump(tb testing.TB, w *meshbed.Waypoint, what string, needles ...string) {
	tb.Helper()
	testutil.EventuallyNil(tb, what+" in the waypoint's configuration", func() error {
		body, err := waypointConfig(w)
		if err != nil {
			return err
		}
		for _, n := range needles {
			if !strings.Contains(body, strings.Join(strings.Fields(n), "")) {
				return fmt.Errorf("no %q yet", n)
			}
		}
		return nil
	})
}

// istiodCertFiles has istiod's CA issue the pod's own identity a
// certificate, asked for with a token bound to the pod as its proxy would,
// and writes chain, key and roots as PEM files (hbone-interop's -cert,
// -key, -roots).
func istiodCertFiles(tb testing.TB, m *istiodbed.Mesh, pod, serviceAccount string) [3]string {
	tb.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	obj, err := m.CP.Client.CoreV1().Pods(istiodbed.Namespace).Get(ctx, pod, metav1.GetOptions{})
	if err != nil {
		tb.Fatal(err)
	}
	tok, err := m.Istiod.TokenFor(ctx, istiodbed.Namespace, serviceAccount, obj)
	if err != nil {
		tb.Fatal(err)
	}
	dir := tb.TempDir()
	files := [3]string{filepath.Join(dir, "cert-chain.pem"), filepath.Join(dir, "key.pem"), filepath.Join(dir, "root-cert.pem")}
	tokenFile := filepath.Join(dir, "istio-token")
	if err := os.WriteFile(tokenFile, []byte(tok), 0o600); err != nil {
		tb.Fatal(err)
	}
	id := identity.ID{TrustDomain: "cluster.local", Namespace: istiodbed.Namespace, ServiceAccount: serviceAccount}
	c, err := ca.NewIstio(ca.IstioConfig{
		Address: m.Istiod.Address, ServerName: m.Istiod.ServerName, RootPEM: m.Istiod.RootPEM,
		TokenFile: tokenFile, Self: id, SelfOnly: true,
	})
	if err != nil {
		tb.Fatal(err)
	}
	defer c.Close()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		tb.Fatal(err)
	}
	csr, err := ca.CreateCSR(key, id)
	if err != nil {
		tb.Fatal(err)
	}
	chain, err := c.Sign(ctx, csr, id, time.Hour)
	if err != nil {
		tb.Fatalf("istiod's CA for %s: %v", id, err)
	}
	der, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		tb.Fatal(err)
	}
	for i, b := range [][]byte{ca.EncodeChain(chain), pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}), m.Istiod.RootPEM} {
		if err := os.WriteFile(files[i], b, 0o600); err != nil {
			tb.Fatal(err)
		}
	}
	return files
}
