package hbone_test

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"io"
	"math/big"
	"net"
	"net/netip"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/amber-mesh/amber/tunnel/hbone"
)

var (
	certOnce             sync.Once
	serverTLS, clientTLS *tls.Config
)

// mustTLS returns throwaway mutual-TLS configurations: one self-signed
// certificate, trusted by both sides, for 127.0.0.1.
func mustTLS(tb testing.TB) (server, client *tls.Config) {
	tb.Helper()
	certOnce.Do(func() {
		key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if err != nil {
			panic(err)
		}
		tmpl := &x509.Certificate{
			SerialNumber:          big.NewInt(1),
			Subject:               pkix.Name{CommonName: "hbone-test"},
			NotBefore:             time.Now().Add(-time.Hour),
			NotAfter:              time.Now().Add(24 * time.Hour),
			KeyUsage:              x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign,
			ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
			BasicConstraintsValid: true,
			IsCA:                  true,
			IPAddresses:           []net.IP{net.IPv4(127, 0, 0, 1)},
		}
		der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
		if err != nil {
			panic(err)
		}
		leaf, err := x509.ParseCertificate(der)
		if err != nil {
			panic(err)
		}
		cert := tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key, Leaf: leaf}
		pool := x509.NewCertPool()
		pool.AddCert(leaf)
		serverTLS = &tls.Config{
			Certificates: []tls.Certificate{cert},
			ClientAuth:   tls.RequireAndVerifyClientCert,
			ClientCAs:    pool,
			MinVersion:   tls.VersionTLS13,
		}
		clientTLS = &tls.Config{
			Certificates: []tls.Certificate{cert},
			RootCAs:      pool,
			ServerName:   "127.0.0.1",
			NextProtos:   []string{"h2"},
			MinVersion:   tls.VersionTLS13,
		}
	})
	return serverTLS.Clone(), clientTLS.Clone()
}

// checkLeaks fails the test if goroutines started during it are still
// running after its cleanups. Call it first so its cleanup runs last.
func checkLeaks(tb testing.TB) {
	tb.Helper()
	before := runtime.NumGoroutine()
	tb.Cleanup(func() {
		deadline := time.Now().Add(5 * time.Second)
		for runtime.NumGoroutine() > before {
			if time.Now().After(deadline) {
				buf := make([]byte, 1<<20)
				buf = buf[:runtime.Stack(buf, true)]
				tb.Errorf("goroutines leaked: %d before, %d after\n%s", before, runtime.NumGoroutine(), buf)
				return
			}
			time.Sleep(10 * time.Millisecond)
		}
	})
}

type testServer struct {
	*hbone.Server
	Addr  netip.AddrPort
	Stats *hbone.Stats
}

// startServer serves h on a loopback listener until the test ends.
func startServer(tb testing.TB, h hbone.Handler, mod ...func(*hbone.Server)) *testServer {
	tb.Helper()
	stls, _ := mustTLS(tb)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		tb.Fatal(err)
	}
	ts := &testServer{
		Server: &hbone.Server{TLSConfig: stls, Handler: h, Stats: new(hbone.Stats)},
		Addr:   ln.Addr().(*net.TCPAddr).AddrPort(),
	}
	ts.Stats = ts.Server.Stats
	for _, m := range mod {
		m(ts.Server)
	}
	done := make(chan error, 1)
	go func() { done <- ts.Serve(ln) }()
	tb.Cleanup(func() {
		if err := ts.Close(); err != nil {
			tb.Errorf("server close: %v", err)
		}
		if err := <-done; !errors.Is(err, hbone.ErrServerClosed) {
			tb.Errorf("Serve returned %v, want ErrServerClosed", err)
		}
	})
	return ts
}

type testPool struct {
	*hbone.Pool
	Dials atomic.Int64
	Key   hbone.Key
	Stats *hbone.Stats
	// plainTLS dials with tls.Client instead of hbone.TLSClient.
	plainTLS bool
	// src is the loopback address dialled from; empty: the system's
	// choice.
	src string
}

// newPool returns a pool dialling ts until the test ends.
// pipePool is newPool for tests in a testing/synctest bubble: each dial is
// served by srv over net.Pipe, whose reads and writes block durably, as
// sockets' do not, so synctest.Wait and fake time work across the tunnel.
func pipePool(t *testing.T, srv *hbone.Server, mod ...func(*hbone.Pool)) *testPool {
	t.Helper()
	tp := &testPool{Key: hbone.Key{Src: "spiffe://td/ns/a/sa/a", Dst: "spiffe://td/ns/b/sa/b", Addr: netip.MustParseAddrPort("127.0.0.1:15008")}, Stats: new(hbone.Stats)}
	tp.Pool = &hbone.Pool{
		Dial: func(ctx context.Context, key hbone.Key) (net.Conn, error) {
			tp.Dials.Add(1)
			c, s := net.Pipe()
			go srv.ServeConn(context.Background(), s)
			return c, nil
		},
		Stats: tp.Stats,
	}
	for _, m := range mod {
		m(tp.Pool)
	}
	t.Cleanup(func() {
		tp.Close()
		srv.Close()
	})
	return tp
}

func newPool(tb testing.TB, ts *testServer, mod ...func(*hbone.Pool)) *testPool {
	tb.Helper()
	_, ctls := mustTLS(tb)
	tp := &testPool{Key: hbone.Key{Src: "spiffe://td/ns/a/sa/a", Dst: "spiffe://td/ns/b/sa/b", Addr: ts.Addr}, Stats: new(hbone.Stats)}
	tp.Pool = &hbone.Pool{
		Dial: func(ctx context.Context, key hbone.Key) (net.Conn, error) {
			tp.Dials.Add(1)
			var d net.Dialer
			if tp.src != "" {
				d.LocalAddr = &net.TCPAddr{IP: net.ParseIP(tp.src)}
			}
			nc, err := d.DialContext(ctx, "tcp", key.Addr.String())
			if err != nil {
				return nil, err
			}
			tc := hbone.TLSClient(nc, ctls)
			if tp.plainTLS {
				tc = tls.Client(nc, ctls)
			}
			if err := tc.HandshakeContext(ctx); err != nil {
				nc.Close()
				return nil, err
			}
			return tc, nil
		},
		Stats: tp.Stats,
	}
	for _, m := range mod {
		m(tp.Pool)
	}
	tb.Cleanup(func() {
		if err := tp.Close(); err != nil {
			tb.Errorf("pool close: %v", err)
		}
	})
	return tp
}

// connect opens a stream to a fixed authority through tp.
func (tp *testPool) connect(tb testing.TB) *hbone.Stream {
	tb.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	s, err := tp.Connect(ctx, tp.Key, "10.0.0.1:8080", nil)
	if err != nil {
		tb.Fatalf("connect: %v", err)
	}
	tb.Cleanup(func() { s.Close() })
	return s
}

// echo accepts and copies the stream back to itself, half-closing when
// the client does.
var echo = hbone.HandlerFunc(func(ctx context.Context, req *hbone.Request, rw hbone.Responder) {
	s, err := rw.Accept()
	if err != nil {
		return
	}
	if _, err := io.Copy(s, s); err != nil {
		return
	}
	s.CloseWrite()
})

func readAllString(tb testing.TB, r io.Reader) string {
	tb.Helper()
	var sb strings.Builder
	if _, err := io.Copy(&sb, r); err != nil {
		tb.Fatalf("read: %v", err)
	}
	return sb.String()
}
