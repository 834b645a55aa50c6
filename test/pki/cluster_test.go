package pki

import (
	"crypto/ecdsa"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"net"
	"os"
	"slices"
	"testing"
)

// The certificates are what the API server and its clients check: the
// serving certificate verifies for the names clients dial, client
// certificates carry user and groups, and the service-account key pair
// matches.
func TestCluster(t *testing.T) {
	const serviceIP = "10.96.0.1"
	p, err := NewCluster(t.TempDir(), ClusterOptions{ServingIPs: []net.IP{net.IPv4(127, 0, 0, 1), net.ParseIP(serviceIP)}})
	if err != nil {
		t.Fatal(err)
	}
	roots := x509.NewCertPool()
	if !roots.AppendCertsFromPEM(p.CAPEM()) {
		t.Fatal("CA PEM does not parse")
	}

	serving, err := tls.LoadX509KeyPair(p.ServingCert, p.ServingKey)
	if err != nil {
		t.Fatalf("serving key pair: %v", err)
	}
	for _, name := range []string{"127.0.0.1", "localhost", "kubernetes.default.svc", serviceIP} {
		_, err := serving.Leaf.Verify(x509.VerifyOptions{Roots: roots, DNSName: name, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}})
		if err != nil {
			t.Errorf("serving cert for %s: %v", name, err)
		}
	}
	if _, err := serving.Leaf.Verify(x509.VerifyOptions{Roots: roots, DNSName: "10.0.0.1"}); err == nil {
		t.Error("serving cert verifies for 10.0.0.1, want only its own names")
	}

	certPEM, keyPEM, err := p.ClientCert("system:node:n1", "system:nodes")
	if err != nil {
		t.Fatal(err)
	}
	client, err := tls.X509KeyPair(certPEM, keyPEM)
	if err != nil {
		t.Fatalf("client key pair: %v", err)
	}
	if _, err := client.Leaf.Verify(x509.VerifyOptions{Roots: roots, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}); err != nil {
		t.Errorf("client cert: %v", err)
	}
	if client.Leaf.Subject.CommonName != "system:node:n1" || !slices.Equal(client.Leaf.Subject.Organization, []string{"system:nodes"}) {
		t.Errorf("client cert subject %v, want CN=system:node:n1 O=system:nodes", client.Leaf.Subject)
	}

	keyDER := readPEM(t, p.ServiceAccountKey)
	key, err := x509.ParsePKCS8PrivateKey(keyDER)
	if err != nil {
		t.Fatalf("service account key: %v", err)
	}
	pub, err := x509.ParsePKIXPublicKey(readPEM(t, p.ServiceAccountPub))
	if err != nil {
		t.Fatalf("service account public key: %v", err)
	}
	if !key.(*ecdsa.PrivateKey).PublicKey.Equal(pub) {
		t.Error("service account public key does not match the private key")
	}
	if fi, err := os.Stat(p.CAKey); err != nil || fi.Mode().Perm() != 0o600 {
		t.Errorf("CA key mode: %v %v, want 0600", fi.Mode(), err)
	}
}

func readPEM(t *testing.T, file string) []byte {
	t.Helper()
	b, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	block, _ := pem.Decode(b)
	if block == nil {
		t.Fatalf("%s: no PEM block", file)
	}
	return block.Bytes
}
