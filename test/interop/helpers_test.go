package interop

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/amber-mesh/amber/internal/tcptest"
	"github.com/amber-mesh/amber/internal/testutil"
	"github.com/amber-mesh/amber/test/istiod"
	"github.com/amber-mesh/amber/test/proc"
	"github.com/amber-mesh/amber/tunnel/ca"
	"github.com/amber-mesh/amber/tunnel/certs"
	"github.com/amber-mesh/amber/tunnel/hbone"
	"github.com/amber-mesh/amber/tunnel/identity"
)

const trustDomain = "cluster.local"

// interopBinary returns the path of Istio's hbone-interop, building it
// with hack/istiod-bin.sh when needed.
func interopBinary(tb testing.TB) string {
	tb.Helper()
	return istiod.HBONEInterop(tb)
}

func mustID(tb testing.TB, s string) identity.ID {
	tb.Helper()
	id, err := identity.Parse(s)
	if err != nil {
		tb.Fatal(err)
	}
	return id
}

// mustCA opens a fresh local CA for trustDomain.
func mustCA(tb testing.TB) *ca.Local {
	tb.Helper()
	l, err := ca.OpenLocal(filepath.Join(tb.TempDir(), "ca"), trustDomain)
	if err != nil {
		tb.Fatalf("open local CA: %v", err)
	}
	return l
}

// mustManager returns amber's certificate manager over c.
func mustManager(tb testing.TB, c ca.Client) *certs.Manager {
	tb.Helper()
	m := &certs.Manager{CA: c}
	tb.Cleanup(func() {
		if err := m.Close(); err != nil {
			tb.Errorf("close certificate manager: %v", err)
		}
	})
	return m
}

// pemFiles are the credential files hbone-interop reads.
type pemFiles struct{ Cert, Key, Roots string }

func (p pemFiles) args() []string {
	return []string{"-cert", p.Cert, "-key", p.Key, "-roots", p.Roots}
}

// mustIssueFiles has signer issue a certificate for id, the way amber's
// manager asks for one (ca.CreateCSR), and writes it, its key and the
// roots as PEM files.
func mustIssueFiles(tb testing.TB, signer *ca.Local, id identity.ID, roots []byte) pemFiles {
	tb.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		tb.Fatal(err)
	}
	csr, err := ca.CreateCSR(key, id)
	if err != nil {
		tb.Fatalf("csr for %s: %v", id, err)
	}
	chain, err := signer.Sign(context.Background(), csr, id, time.Hour)
	if err != nil {
		tb.Fatalf("sign %s: %v", id, err)
	}
	der, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		tb.Fatal(err)
	}
	dir := tb.TempDir()
	p := pemFiles{
		Cert:  filepath.Join(dir, "cert-chain.pem"),
		Key:   filepath.Join(dir, "key.pem"),
		Roots: filepath.Join(dir, "root-cert.pem"),
	}
	for name, b := range map[string][]byte{
		p.Cert:  ca.EncodeChain(chain),
		p.Key:   pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}),
		p.Roots: roots,
	} {
		if err := os.WriteFile(name, b, 0o600); err != nil {
			tb.Fatal(err)
		}
	}
	return p
}

// crossCA signs with one CA but trusts another's roots: a workload that
// trusts the mesh while its own certificate comes from elsewhere.
type crossCA struct {
	signer *ca.Local
	trust  *ca.Local
}

func (c crossCA) Sign(ctx context.Context, csrPEM []byte, id identity.ID, ttl time.Duration) ([]*x509.Certificate, error) {
	return c.signer.Sign(ctx, csrPEM, id, ttl)
}

func (c crossCA) Roots() *x509.CertPool { return c.trust.Roots() }

// echoTarget is a loopback TCP server that sends back what it receives
// and half-closes when its client does.
type echoTarget struct {
	Addr     netip.AddrPort
	Accepted atomic.Int64
	// Ended receives, for each connection that read the client's FIN,
	// how many bytes it echoed.
	Ended chan int64
}

func startEcho(tb testing.TB) *echoTarget {
	tb.Helper()
	e := &echoTarget{Ended: make(chan int64, 64)}
	serveLoopback(tb, &e.Addr, func(c *net.TCPConn) {
		e.Accepted.Add(1)
		n, err := io.Copy(c, c)
		if err != nil {
			return
		}
		c.CloseWrite()
		e.Ended <- n
	})
	return e
}

// greeterTarget sends Greeting and half-closes at once, then counts what
// its client sends until the client's FIN.
type greeterTarget struct {
	Addr     netip.AddrPort
	Greeting string
	Received chan int64
}

func startGreeter(tb testing.TB) *greeterTarget {
	tb.Helper()
	g := &greeterTarget{Greeting: "hello from the target\n", Received: make(chan int64, 64)}
	serveLoopback(tb, &g.Addr, func(c *net.TCPConn) {
		if _, err := io.WriteString(c, g.Greeting); err != nil {
			return
		}
		c.CloseWrite()
		n, _ := io.Copy(io.Discard, c)
		g.Received <- n
	})
	return g
}

// serveLoopback runs serve for every connection to a new 127.0.0.1
// listener, whose address it stores in addr, until the test ends.
func serveLoopback(tb testing.TB, addr *netip.AddrPort, serve func(*net.TCPConn)) {
	tb.Helper()
	ln, err := net.ListenTCP("tcp", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		tb.Fatal(err)
	}
	*addr = ln.Addr().(*net.TCPAddr).AddrPort()
	tcptest.Serve(tb, ln, func(c net.Conn) { serve(c.(*net.TCPConn)) })
}

// closedPort returns a loopback address nothing listens on.
func closedPort(tb testing.TB) netip.AddrPort {
	tb.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		tb.Fatal(err)
	}
	ap := ln.Addr().(*net.TCPAddr).AddrPort()
	ln.Close()
	return ap
}

// startAmberServer serves h with amber's HBONE server on a loopback port,
// presenting m's certificate for id and accepting clients of trustDomain.
func startAmberServer(tb testing.TB, m *certs.Manager, id identity.ID, h hbone.Handler) (*hbone.Server, netip.AddrPort) {
	tb.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		tb.Fatal(err)
	}
	srv := &hbone.Server{
		TLSConfig: m.ServerConfig(func(net.Addr) (identity.ID, error) { return id, nil }, trustDomain),
		Handler:   h,
		Stats:     new(hbone.Stats),
	}
	done := make(chan error, 1)
	go func() { done <- srv.Serve(ln) }()
	tb.Cleanup(func() {
		if err := srv.Close(); err != nil {
			tb.Errorf("close amber server: %v", err)
		}
		if err := <-done; !errors.Is(err, hbone.ErrServerClosed) {
			tb.Errorf("amber server: Serve returned %v, want ErrServerClosed", err)
		}
	})
	return srv, ln.Addr().(*net.TCPAddr).AddrPort()
}

// newAmberPool returns amber's HBONE client pool dialling with m's
// client configuration, from src to a server that must be want.
func newAmberPool(tb testing.TB, m *certs.Manager, src, want identity.ID) *hbone.Pool {
	tb.Helper()
	cfg := m.ClientConfig(src, want)
	p := &hbone.Pool{
		Dial: func(ctx context.Context, key hbone.Key) (net.Conn, error) {
			var d net.Dialer
			nc, err := d.DialContext(ctx, "tcp", key.Addr.String())
			if err != nil {
				return nil, err
			}
			tc := hbone.TLSClient(nc, cfg)
			if err := tc.HandshakeContext(ctx); err != nil {
				nc.Close()
				return nil, err
			}
			return tc, nil
		},
		Stats: new(hbone.Stats),
	}
	tb.Cleanup(func() {
		if err := p.Close(); err != nil {
			tb.Errorf("close amber pool: %v", err)
		}
	})
	return p
}

// istioClientResult is what one run of hbone-interop client produced.
type istioClientResult struct {
	Stdout, Stderr []byte
	Err            error // the exit status
}

// runIstioClient runs Istio's HBONE client with args and payload on stdin.
func runIstioClient(tb testing.TB, bin string, payload []byte, args ...string) istioClientResult {
	tb.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	var stdout, stderr bytes.Buffer
	cmd := exec.CommandContext(ctx, bin, append([]string{"client"}, args...)...)
	cmd.Stdin = bytes.NewReader(payload)
	cmd.Stdout = &stdout
	cmd.Stderr = &stderr
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	err := proc.RunLocked(cmd)
	if ctx.Err() != nil {
		tb.Fatalf("istio client did not finish in time; stderr:\n%s", stderr.Bytes())
	}
	return istioClientResult{Stdout: stdout.Bytes(), Stderr: stderr.Bytes(), Err: err}
}

// istioServer is a running hbone-interop server.
type istioServer struct {
	Addr netip.AddrPort
	p    *proc.Process
}

// startIstioServer runs Istio's HBONE server on a loopback port with
// files' credentials until the test ends.
func startIstioServer(tb testing.TB, bin string, files pemFiles) *istioServer {
	tb.Helper()
	dir := tb.TempDir()
	addrFile := filepath.Join(dir, "addr")
	args := append([]string{"server", "-listen", "127.0.0.1:0", "-addr-file", addrFile}, files.args()...)
	p, err := proc.Start("istio hbone server", bin, args, nil, dir, filepath.Join(dir, "server.log"))
	if err != nil {
		tb.Fatal(err)
	}
	s := &istioServer{p: p}
	tb.Cleanup(func() {
		if tb.Failed() {
			tb.Logf("istio hbone server log (%s):\n%s", p.Log, p.LogTail(40))
		}
		if err := p.Stop(5 * time.Second); err != nil {
			tb.Errorf("istio hbone server: %v", err)
		}
	})
	var b []byte
	testutil.EventuallyNil(tb, "istio's hbone server listening", func() error {
		if done, err := p.Exited(); done {
			tb.Fatalf("istio hbone server %v before listening:\n%s", err, p.LogTail(20))
		}
		var err error
		b, err = os.ReadFile(addrFile)
		return err
	})
	if s.Addr, err = netip.ParseAddrPort(strings.TrimSpace(string(b))); err != nil {
		tb.Fatalf("istio hbone server address: %v", err)
	}
	return s
}

// Connects returns the "connect <authority> peer=<id>" lines the server
// printed so far.
func (s *istioServer) Connects() []string {
	b, _ := os.ReadFile(s.p.Log)
	var out []string
	for _, l := range strings.Split(string(b), "\n") {
		if strings.HasPrefix(l, "connect ") {
			out = append(out, l)
		}
	}
	return out
}

// randomBytes returns n bytes that no two tests share.
func randomBytes(tb testing.TB, n int) []byte {
	tb.Helper()
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		tb.Fatal(err)
	}
	return b
}

// tlsState is what amber's server hands its handler as Request.Conn.
type tlsState interface{ ConnectionState() tls.ConnectionState }
