package proxy

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"math/big"
	"net"
	"testing"
	"time"

	"github.com/amber-mesh/amber/tunnel/certs"
	"github.com/amber-mesh/amber/tunnel/identity"
)

// handshake runs a TLS handshake over an in-memory connection and
// returns the server's end.
func handshake(t *testing.T, server, client *tls.Config) *tls.Conn {
	t.Helper()
	a, b := net.Pipe()
	s, c := tls.Server(a, server), tls.Client(b, client)
	// Closing the pipe, not the TLS ends: their close_notify would wait
	// for a reader.
	t.Cleanup(func() { a.Close(); b.Close() })
	errc := make(chan error, 1)
	go func() { errc <- c.Handshake() }()
	if err := s.Handshake(); err != nil {
		t.Fatal(err)
	}
	if err := <-errc; err != nil {
		t.Fatal(err)
	}
	return s
}

// TestPeersShared: the streams of one HBONE connection share its peer
// identity, parsed once, exactly what certs.PeerID returns; the entry
// goes with the last stream that held it.
func TestPeersShared(t *testing.T) {
	mgr := mustCerts(t)
	sleep, pp := workloadID(wl("sleep", 0, "10.0.0.3")), workloadID(wl("productpage", 0, "10.0.0.2"))
	srvConf := mgr.ServerConfig(func(net.Addr) (identity.ID, error) { return pp, nil }, "cluster.local")
	tc := handshake(t, srvConf, mgr.ClientConfig(sleep, pp))
	want, err := certs.PeerID(tc.ConnectionState())
	if err != nil {
		t.Fatal(err)
	}
	var ps peers
	first, err := ps.acquire(tc)
	if err != nil || first.id != want || want != sleep {
		t.Fatalf("acquire = %v, %v; want %v as certs.PeerID returns it", first.id, err, want)
	}
	second, err := ps.acquire(tc)
	if err != nil || second != first {
		t.Fatalf("a second stream's acquire = %p, %v; want the first's %p", second, err, first)
	}
	other, err := ps.acquire(handshake(t, srvConf, mgr.ClientConfig(sleep, pp)))
	if err != nil || other == first || other.id != want {
		t.Fatalf("another connection's acquire = %p (%v), %v; want its own entry", other, other.id, err)
	}
	ps.release(first)
	if len(ps.m) != 2 {
		t.Fatalf("%d entries after one of two streams ended, want 2", len(ps.m))
	}
	ps.release(second)
	ps.release(other)
	if len(ps.m) != 0 {
		t.Errorf("%d entries after every stream ended, want none", len(ps.m))
	}
}

// TestPeersRefused: a connection whose certificate names no SPIFFE ID,
// or whose handshake did not complete, gets certs.PeerID's error, and
// nothing is kept for it.
func TestPeersRefused(t *testing.T) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour)}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cert := tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}
	noSAN := handshake(t,
		&tls.Config{Certificates: []tls.Certificate{cert}, ClientAuth: tls.RequireAnyClientCert},
		&tls.Config{Certificates: []tls.Certificate{cert}, InsecureSkipVerify: true})
	a, b := net.Pipe()
	unfinished := tls.Server(a, &tls.Config{})
	t.Cleanup(func() { a.Close(); b.Close() })
	var ps peers
	for name, tc := range map[string]*tls.Conn{"no URI SAN": noSAN, "no handshake": unfinished} {
		_, want := certs.PeerID(tc.ConnectionState())
		pr, err := ps.acquire(tc)
		if want == nil || err == nil || err.Error() != want.Error() || pr != nil {
			t.Errorf("%s: acquire = %v, %v; want certs.PeerID's error %v", name, pr, err, want)
		}
	}
	if len(ps.m) != 0 {
		t.Errorf("%d entries kept for refused connections", len(ps.m))
	}
}
