package certs

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"math/big"
	"net"
	"net/url"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/amber-mesh/amber/internal/tcptest"
	"github.com/amber-mesh/amber/tunnel/ca"
	"github.com/amber-mesh/amber/tunnel/identity"
)

// The inbound side serves productpage on 127.0.0.1 and reviews on
// 127.0.0.2, as a node hosting two pods would; 127.0.0.3 hosts nothing.
func certFor(local net.Addr) (identity.ID, error) {
	ta, ok := local.(*net.TCPAddr)
	if !ok {
		return identity.ID{}, fmt.Errorf("not TCP: %v", local)
	}
	switch ta.IP.String() {
	case "127.0.0.1":
		return productpage, nil
	case "127.0.0.2":
		return reviews, nil
	}
	return identity.ID{}, fmt.Errorf("no workload at %v", ta.IP)
}

// serverResult is what the accepting side saw of one connection.
type serverResult struct {
	err        error
	peer       identity.ID
	serverName string
	state      tls.ConnectionState
}

// mustServe accepts TLS connections with cfg on ip, completes the handshake,
// writes "ok" and reports each connection.
func mustServe(tb testing.TB, ip string, cfg *tls.Config) (string, <-chan serverResult) {
	tb.Helper()
	lis, err := net.Listen("tcp", net.JoinHostPort(ip, "0"))
	if err != nil {
		tb.Fatal(err)
	}
	results := make(chan serverResult, 16)
	tcptest.Serve(tb, lis, func(c net.Conn) {
		var sni string
		cfg := cfg.Clone()
		cfg.GetConfigForClient = func(h *tls.ClientHelloInfo) (*tls.Config, error) {
			sni = h.ServerName
			return nil, nil
		}
		tc := tls.Server(c, cfg)
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		r := serverResult{err: tc.HandshakeContext(ctx)}
		r.serverName = sni
		r.state = tc.ConnectionState()
		if r.err == nil {
			r.peer, r.err = PeerID(r.state)
			_, _ = tc.Write([]byte("ok"))
		}
		results <- r
	})
	return lis.Addr().String(), results
}

// dial connects with cfg and reads the server's "ok": in TLS 1.3 the server
// rejects a client certificate after the client's handshake has returned,
// so only the first read shows it.
func dial(tb testing.TB, addr string, cfg *tls.Config) (tls.ConnectionState, error) {
	tb.Helper()
	c, err := net.Dial("tcp", addr)
	if err != nil {
		tb.Fatal(err)
	}
	defer c.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	tc := tls.Client(c, cfg)
	if err := tc.HandshakeContext(ctx); err != nil {
		return tls.ConnectionState{}, err
	}
	_ = tc.SetDeadline(time.Now().Add(5 * time.Second))
	buf := make([]byte, 2)
	if _, err := io.ReadFull(tc, buf); err != nil {
		return tls.ConnectionState{}, err
	}
	if string(buf) != "ok" {
		return tls.ConnectionState{}, fmt.Errorf("read %q", buf)
	}
	return tc.ConnectionState(), nil
}

func result(tb testing.TB, results <-chan serverResult) serverResult {
	tb.Helper()
	select {
	case r := <-results:
		return r
	case <-time.After(5 * time.Second):
		tb.Fatal("server reported nothing")
		return serverResult{}
	}
}

// mustLeaf has l issue a certificate for id outside any Manager.
func mustLeaf(tb testing.TB, l *ca.Local, id identity.ID, ttl time.Duration) tls.Certificate {
	tb.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		tb.Fatal(err)
	}
	csr, err := ca.CreateCSR(key, id)
	if err != nil {
		tb.Fatal(err)
	}
	chain, err := l.Sign(context.Background(), csr, id, ttl)
	if err != nil {
		tb.Fatal(err)
	}
	return tls.Certificate{Certificate: [][]byte{chain[0].Raw}, PrivateKey: key, Leaf: chain[0]}
}

// selfSigned is a certificate carrying a valid mesh identity that no mesh
// CA issued.
func selfSigned(tb testing.TB, id identity.ID) tls.Certificate {
	tb.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		tb.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(7),
		URIs:                  []*url.URL{id.URL()},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(time.Hour),
		KeyUsage:              x509.KeyUsageDigitalSignature,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		BasicConstraintsValid: true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		tb.Fatal(err)
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}
}

// rawClient is a TLS client that trusts anything and presents certs: a
// peer that does not follow the rules.
func rawClient(certs ...tls.Certificate) *tls.Config {
	return &tls.Config{InsecureSkipVerify: true, MinVersion: tls.VersionTLS13, NextProtos: []string{"h2"}, Certificates: certs}
}

// rawServer is a TLS server presenting cert and asking for any client cert.
func rawServer(cert tls.Certificate) *tls.Config {
	return &tls.Config{Certificates: []tls.Certificate{cert}, ClientAuth: tls.RequireAnyClientCert, MinVersion: tls.VersionTLS13, NextProtos: []string{"h2"}}
}

type mesh struct {
	dir    string
	local  *ca.Local
	server *Manager // the destination node's ztunnel
	client *Manager // the source node's ztunnel
}

func newMesh(tb testing.TB) *mesh {
	tb.Helper()
	dir := filepath.Join(tb.TempDir(), "ca")
	local := mustLocal(tb, dir, td)
	return &mesh{
		dir:    dir,
		local:  local,
		server: mustManager(tb, &Manager{CA: local}),
		client: mustManager(tb, &Manager{CA: local}),
	}
}

func TestHandshake(t *testing.T) {
	ms := newMesh(t)
	cfg := ms.server.ServerConfig(certFor, td)
	addr1, res1 := mustServe(t, "127.0.0.1", cfg)
	addr2, res2 := mustServe(t, "127.0.0.2", cfg)

	for _, tc := range []struct {
		addr    string
		results <-chan serverResult
		want    identity.ID
	}{
		{addr1, res1, productpage},
		{addr2, res2, reviews},
	} {
		cs, err := dial(t, tc.addr, ms.client.ClientConfig(sleep, tc.want))
		if err != nil {
			t.Fatalf("dial %s: %v", tc.want, err)
		}
		r := result(t, tc.results)
		if r.err != nil {
			t.Fatalf("server: %v", r.err)
		}
		if got, err := PeerID(cs); err != nil || got != tc.want {
			t.Errorf("client sees server %v, %v; want %v", got, err, tc.want)
		}
		if r.peer != sleep {
			t.Errorf("server sees client %v, want %v", r.peer, sleep)
		}
		if cs.Version != tls.VersionTLS13 || r.state.Version != tls.VersionTLS13 {
			t.Errorf("TLS version %x/%x, want 1.3", cs.Version, r.state.Version)
		}
		if cs.NegotiatedProtocol != "h2" || r.state.NegotiatedProtocol != "h2" {
			t.Errorf("ALPN %q/%q, want h2", cs.NegotiatedProtocol, r.state.NegotiatedProtocol)
		}
		if r.serverName != "" {
			t.Errorf("client sent SNI %q, want none", r.serverName)
		}
		if cs.DidResume {
			t.Error("session resumed")
		}
	}
	if n := ms.server.Stats().PeersRejected + ms.client.Stats().PeersRejected; n != 0 {
		t.Errorf("PeersRejected = %d after good handshakes", n)
	}
}

func TestHandshakeRejects(t *testing.T) {
	ms := newMesh(t)
	ctx := testCtx(t)
	goodServer := ms.server.ServerConfig(certFor, td)

	// Same root, other trust domain: exactly what the trust-domain check is for.
	evilLocal := mustLocal(t, ms.dir, "evil.local")
	evil := mustManager(t, &Manager{CA: evilLocal})
	evilID := func(id identity.ID) identity.ID { id.TrustDomain = "evil.local"; return id }
	evilSleep, err := evil.Get(ctx, evilID(sleep))
	if err != nil {
		t.Fatal(err)
	}
	goodSleep, err := ms.client.Get(ctx, sleep)
	if err != nil {
		t.Fatal(err)
	}
	past := mustLocal(t, ms.dir, td)
	past.Now = func() time.Time { return time.Now().Add(-3 * time.Hour) }
	expiredSleep := mustLeaf(t, past, sleep, time.Hour)
	expiredProductpage := mustLeaf(t, past, productpage, time.Hour)
	goodProductpage := mustLeaf(t, ms.local, productpage, time.Hour)

	tls12Client := rawClient(*goodSleep)
	tls12Client.MinVersion, tls12Client.MaxVersion = tls.VersionTLS12, tls.VersionTLS12
	http11Client := rawClient(*goodSleep)
	http11Client.NextProtos = []string{"http/1.1"}
	noALPNClient := rawClient(*goodSleep)
	noALPNClient.NextProtos = nil
	tls12Server := rawServer(goodProductpage)
	tls12Server.MinVersion, tls12Server.MaxVersion = tls.VersionTLS12, tls.VersionTLS12
	noALPNServer := rawServer(goodProductpage)
	noALPNServer.NextProtos = nil

	for _, tc := range []struct {
		name   string
		ip     string      // server address; default 127.0.0.1
		server *tls.Config // default goodServer
		client *tls.Config
		// At least one side must fail; these say how.
		clientErr error
		serverErr error
		serverMsg string
		clientMsg []string
	}{
		{
			name:      "wrong SAN",
			ip:        "127.0.0.2",
			client:    ms.client.ClientConfig(sleep, productpage),
			clientErr: ErrPeerIdentity,
			clientMsg: []string{"want " + productpage.String(), "got " + reviews.String()},
		},
		{
			name:      "server in another trust domain",
			server:    evil.ServerConfig(func(a net.Addr) (identity.ID, error) { id, err := certFor(a); return evilID(id), err }, "evil.local"),
			client:    ms.client.ClientConfig(sleep, productpage),
			clientErr: ErrTrustDomain,
			clientMsg: []string{productpage.String(), evilID(productpage).String()},
		},
		{
			name:      "client in another trust domain",
			client:    rawClient(*evilSleep),
			serverErr: ErrTrustDomain,
			serverMsg: evilID(sleep).String(),
		},
		{
			name:      "client asked for another trust domain",
			client:    ms.client.ClientConfig(sleep, evilID(productpage)),
			clientErr: ErrTrustDomain,
		},
		{
			name:      "expired client cert",
			client:    rawClient(expiredSleep),
			serverErr: ErrUntrustedPeer,
			serverMsg: "expired",
		},
		{
			name:      "expired server cert",
			server:    rawServer(expiredProductpage),
			client:    ms.client.ClientConfig(sleep, productpage),
			clientErr: ErrUntrustedPeer,
			clientMsg: []string{"expired"},
		},
		{
			name:      "self-signed client cert",
			client:    rawClient(selfSigned(t, sleep)),
			serverErr: ErrUntrustedPeer,
		},
		{
			name:      "self-signed server cert",
			server:    rawServer(selfSigned(t, productpage)),
			client:    ms.client.ClientConfig(sleep, productpage),
			clientErr: ErrUntrustedPeer,
		},
		{
			name:      "missing client cert",
			client:    rawClient(),
			serverMsg: "certificate",
		},
		{
			name:      "TLS 1.2 client",
			client:    tls12Client,
			serverMsg: "version",
		},
		{
			name:   "TLS 1.2 server",
			server: tls12Server,
			client: ms.client.ClientConfig(sleep, productpage),
		},
		{
			// crypto/tls lets an "http/1.1"-only client through without
			// ALPN for compatibility; the explicit check catches it.
			name:      "client offers http/1.1 only",
			client:    http11Client,
			serverErr: ErrALPN,
		},
		{
			name:      "client offers no ALPN",
			client:    noALPNClient,
			serverErr: ErrALPN,
		},
		{
			name:      "server ignores ALPN",
			server:    noALPNServer,
			client:    ms.client.ClientConfig(sleep, productpage),
			clientErr: ErrALPN,
		},
		{
			name:      "no workload at the address",
			ip:        "127.0.0.3",
			client:    ms.client.ClientConfig(sleep, productpage),
			serverMsg: "no workload",
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ip, server := tc.ip, tc.server
			if ip == "" {
				ip = "127.0.0.1"
			}
			if server == nil {
				server = goodServer
			}
			addr, results := mustServe(t, ip, server)
			_, cerr := dial(t, addr, tc.client)
			r := result(t, results)
			if cerr == nil {
				t.Fatalf("client connected; server error %v", r.err)
			}
			if r.err == nil {
				t.Fatalf("server accepted the connection; client error %v", cerr)
			}
			if tc.clientErr != nil && !errors.Is(cerr, tc.clientErr) {
				t.Errorf("client error %v, want %v", cerr, tc.clientErr)
			}
			for _, m := range tc.clientMsg {
				if !strings.Contains(cerr.Error(), m) {
					t.Errorf("client error %q does not mention %q", cerr, m)
				}
			}
			if tc.serverErr != nil && !errors.Is(r.err, tc.serverErr) {
				t.Errorf("server error %v, want %v", r.err, tc.serverErr)
			}
			if tc.serverMsg != "" && !strings.Contains(r.err.Error(), tc.serverMsg) {
				t.Errorf("server error %q does not mention %q", r.err, tc.serverMsg)
			}
		})
	}
}

// TestServerTrustDomains: a server given several client trust domains
// accepts clients of each, one verification per handshake, and rejects a
// client of any other once, naming them all.
func TestServerTrustDomains(t *testing.T) {
	ms := newMesh(t)
	ctx := testCtx(t)
	other := mustManager(t, &Manager{CA: mustLocal(t, ms.dir, "other.local")})
	asOther := func(id identity.ID) identity.ID { id.TrustDomain = "other.local"; return id }
	otherSleep, err := other.Get(ctx, asOther(sleep))
	if err != nil {
		t.Fatal(err)
	}
	evil := mustManager(t, &Manager{CA: mustLocal(t, ms.dir, "evil.local")})
	evilSleep, err := evil.Get(ctx, identity.ID{TrustDomain: "evil.local", Namespace: sleep.Namespace, ServiceAccount: sleep.ServiceAccount})
	if err != nil {
		t.Fatal(err)
	}
	addr, results := mustServe(t, "127.0.0.1", ms.server.ServerConfig(certFor, td, td, "other.local"))
	for _, tc := range []struct {
		client *tls.Config
		want   identity.ID
	}{
		{ms.client.ClientConfig(sleep, productpage), sleep},
		{rawClient(*otherSleep), asOther(sleep)},
	} {
		if _, err := dial(t, addr, tc.client); err != nil {
			t.Fatalf("client %v: %v", tc.want, err)
		}
		if r := result(t, results); r.err != nil || r.peer != tc.want {
			t.Errorf("server saw %v, %v; want %v", r.peer, r.err, tc.want)
		}
	}
	if _, err := dial(t, addr, rawClient(*evilSleep)); err == nil {
		t.Fatal("a client of another trust domain connected")
	}
	r := result(t, results)
	if !errors.Is(r.err, ErrTrustDomain) || !strings.Contains(r.err.Error(), "trust domain "+td+" or other.local") {
		t.Errorf("server error %v, want ErrTrustDomain naming both trust domains", r.err)
	}
	if n := ms.server.Stats().PeersRejected; n != 1 {
		t.Errorf("PeersRejected = %d, want 1", n)
	}
}

func TestPeerIDNeedsHandshake(t *testing.T) {
	if _, err := PeerID(tls.ConnectionState{}); !errors.Is(err, ErrNotHandshaken) {
		t.Errorf("PeerID(zero) = %v", err)
	}
	if _, err := PeerID(tls.ConnectionState{HandshakeComplete: true}); !errors.Is(err, ErrNoPeerCertificate) {
		t.Errorf("PeerID(no certs) = %v", err)
	}
}
