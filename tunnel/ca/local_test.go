package ca

import (
	"bytes"
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"github.com/amber-mesh/amber/tunnel/identity"
)

var (
	sleepID = identity.ID{TrustDomain: "cluster.local", Namespace: "default", ServiceAccount: "sleep"}
	otherID = identity.ID{TrustDomain: "cluster.local", Namespace: "default", ServiceAccount: "notsleep"}
)

func mustLocal(tb testing.TB, td string) *Local {
	tb.Helper()
	l, err := OpenLocal(filepath.Join(tb.TempDir(), "ca"), td)
	if err != nil {
		tb.Fatal(err)
	}
	return l
}

func mustKey(tb testing.TB) *ecdsa.PrivateKey {
	tb.Helper()
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		tb.Fatal(err)
	}
	return k
}

func mustCSR(tb testing.TB, key crypto.Signer, id identity.ID) []byte {
	tb.Helper()
	csr, err := CreateCSR(key, id)
	if err != nil {
		tb.Fatal(err)
	}
	return csr
}

func TestOpenLocalCreatesAndReloads(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "ca")
	l, err := OpenLocal(dir, "cluster.local")
	if err != nil {
		t.Fatal(err)
	}
	for name, want := range map[string]os.FileMode{dir: 0o700, filepath.Join(dir, RootKeyFile): 0o600} {
		st, err := os.Stat(name)
		if err != nil {
			t.Fatal(err)
		}
		if st.Mode().Perm() != want {
			t.Errorf("%s mode %v, want %v", name, st.Mode().Perm(), want)
		}
	}
	if !l.Root().IsCA {
		t.Error("root is not a CA")
	}
	if _, ok := l.Root().PublicKey.(*ecdsa.PublicKey); !ok {
		t.Errorf("root key is %T, want ECDSA", l.Root().PublicKey)
	}
	again, err := OpenLocal(dir, "cluster.local")
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(again.RootPEM(), l.RootPEM()) {
		t.Error("reopening created a different root")
	}
	// The reopened CA signs with the same key: its leaf verifies against the
	// first instance's roots.
	chain, err := again.Sign(context.Background(), mustCSR(t, mustKey(t), sleepID), sleepID, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := chain[0].Verify(x509.VerifyOptions{Roots: l.Roots()}); err != nil {
		t.Errorf("leaf from reopened CA: %v", err)
	}
	if entries, _ := os.ReadDir(dir); len(entries) != 2 {
		t.Errorf("ca dir holds %d entries, want 2 (no temp files left)", len(entries))
	}
}

func TestOpenLocalRefusesBadFiles(t *testing.T) {
	mk := func(t *testing.T) string {
		dir := filepath.Join(t.TempDir(), "ca")
		if _, err := OpenLocal(dir, "td"); err != nil {
			t.Fatal(err)
		}
		return dir
	}
	t.Run("key only", func(t *testing.T) {
		dir := mk(t)
		os.Remove(filepath.Join(dir, RootCertFile))
		if _, err := OpenLocal(dir, "td"); err == nil {
			t.Fatal("opened a CA without its certificate")
		}
		if _, err := os.Stat(filepath.Join(dir, RootCertFile)); err == nil {
			t.Fatal("a new root was created next to the old key")
		}
	})
	t.Run("cert only", func(t *testing.T) {
		dir := mk(t)
		os.Remove(filepath.Join(dir, RootKeyFile))
		if _, err := OpenLocal(dir, "td"); err == nil {
			t.Fatal("opened a CA without its key")
		}
	})
	t.Run("mismatched key", func(t *testing.T) {
		dir, other := mk(t), mk(t)
		key, err := os.ReadFile(filepath.Join(other, RootKeyFile))
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dir, RootKeyFile), key, 0o600); err != nil {
			t.Fatal(err)
		}
		if _, err := OpenLocal(dir, "td"); !errors.Is(err, ErrCAFiles) {
			t.Fatalf("OpenLocal = %v, want ErrCAFiles", err)
		}
	})
	t.Run("readable key", func(t *testing.T) {
		dir := mk(t)
		if err := os.Chmod(filepath.Join(dir, RootKeyFile), 0o644); err != nil {
			t.Fatal(err)
		}
		if _, err := OpenLocal(dir, "td"); !errors.Is(err, ErrCAFiles) {
			t.Fatalf("OpenLocal = %v, want ErrCAFiles", err)
		}
	})
	t.Run("garbage cert", func(t *testing.T) {
		dir := mk(t)
		if err := os.WriteFile(filepath.Join(dir, RootCertFile), []byte("hello"), 0o644); err != nil {
			t.Fatal(err)
		}
		if _, err := OpenLocal(dir, "td"); !errors.Is(err, ErrCAFiles) {
			t.Fatalf("OpenLocal = %v, want ErrCAFiles", err)
		}
	})
	t.Run("bad trust domain", func(t *testing.T) {
		if _, err := OpenLocal(t.TempDir(), "Cluster.Local"); !errors.Is(err, identity.ErrTrustDomain) {
			t.Fatalf("OpenLocal = %v, want ErrTrustDomain", err)
		}
	})
}

func TestLocalSign(t *testing.T) {
	l := mustLocal(t, "cluster.local")
	now := time.Now().Truncate(time.Second)
	l.Now = func() time.Time { return now }
	key := mustKey(t)
	chain, err := l.Sign(context.Background(), mustCSR(t, key, sleepID), sleepID, 2*time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	if len(chain) != 1 {
		t.Fatalf("chain has %d certificates, want 1 (root excluded)", len(chain))
	}
	leaf := chain[0]
	if got, err := identity.FromCertificate(leaf); err != nil || got != sleepID {
		t.Errorf("leaf identity %v, %v; want %v", got, err, sleepID)
	}
	if len(leaf.DNSNames)+len(leaf.IPAddresses)+len(leaf.EmailAddresses) != 0 || len(leaf.URIs) != 1 {
		t.Errorf("leaf SANs: dns %v ip %v email %v uri %v; want one URI", leaf.DNSNames, leaf.IPAddresses, leaf.EmailAddresses, leaf.URIs)
	}
	if leaf.KeyUsage != x509.KeyUsageDigitalSignature {
		t.Errorf("key usage %v, want digitalSignature", leaf.KeyUsage)
	}
	if !slices.Equal(leaf.ExtKeyUsage, []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth}) {
		t.Errorf("ext key usage %v", leaf.ExtKeyUsage)
	}
	if leaf.IsCA {
		t.Error("leaf is a CA")
	}
	if !leaf.NotBefore.Before(now) || now.Sub(leaf.NotBefore) > 5*time.Minute {
		t.Errorf("NotBefore %v, want slightly before %v", leaf.NotBefore, now)
	}
	if !leaf.NotAfter.Equal(now.Add(2 * time.Hour)) {
		t.Errorf("NotAfter %v, want %v", leaf.NotAfter, now.Add(2*time.Hour))
	}
	if !publicKeyEqual(&key.PublicKey, leaf.PublicKey) {
		t.Error("leaf does not carry the CSR's key")
	}
	for _, u := range []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth} {
		if _, err := leaf.Verify(x509.VerifyOptions{Roots: l.Roots(), CurrentTime: now, KeyUsages: []x509.ExtKeyUsage{u}}); err != nil {
			t.Errorf("verify for %v: %v", u, err)
		}
	}
}

func TestLocalSignTTL(t *testing.T) {
	l := mustLocal(t, "cluster.local")
	now := time.Now().Truncate(time.Second)
	l.Now = func() time.Time { return now }
	l.MaxTTL = 3 * time.Hour
	for _, tc := range []struct{ ask, want time.Duration }{
		{time.Hour, time.Hour},
		{0, 3 * time.Hour}, // DefaultTTL, then capped
		{100 * time.Hour, 3 * time.Hour},
	} {
		chain, err := l.Sign(context.Background(), mustCSR(t, mustKey(t), sleepID), sleepID, tc.ask)
		if err != nil {
			t.Fatal(err)
		}
		if got := chain[0].NotAfter.Sub(now); got != tc.want {
			t.Errorf("ttl %v gave lifetime %v, want %v", tc.ask, got, tc.want)
		}
	}
}

func TestLocalSignRejects(t *testing.T) {
	l := mustLocal(t, "cluster.local")
	key := mustKey(t)
	good := mustCSR(t, key, sleepID)

	tampered := func() []byte {
		b, _ := pem.Decode(good)
		der := bytes.Clone(b.Bytes)
		der[len(der)-3] ^= 0x01
		return pem.EncodeToMemory(&pem.Block{Type: pemCSR, Bytes: der})
	}()
	csrWith := func(tmpl *x509.CertificateRequest) []byte {
		der, err := x509.CreateCertificateRequest(rand.Reader, tmpl, key)
		if err != nil {
			t.Fatal(err)
		}
		return pem.EncodeToMemory(&pem.Block{Type: pemCSR, Bytes: der})
	}
	canceled, cancel := context.WithCancel(context.Background())
	cancel()
	for _, tc := range []struct {
		name string
		ctx  context.Context
		csr  []byte
		id   identity.ID
		want error
	}{
		{"csr for another identity", nil, good, otherID, ErrIdentityMismatch},
		{"other trust domain", nil, mustCSR(t, key, identity.ID{TrustDomain: "evil.local", Namespace: "default", ServiceAccount: "sleep"}),
			identity.ID{TrustDomain: "evil.local", Namespace: "default", ServiceAccount: "sleep"}, ErrTrustDomain},
		{"tampered signature", nil, tampered, sleepID, ErrBadCSR},
		{"garbage", nil, []byte("not a csr"), sleepID, ErrBadCSR},
		{"text before pem", nil, append([]byte("x\n"), good...), sleepID, ErrBadCSR},
		{"two pem blocks", nil, append(bytes.Clone(good), good...), sleepID, ErrBadCSR},
		{"certificate not csr", nil, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: []byte{1}}), sleepID, ErrBadCSR},
		{"no uri san", nil, csrWith(&x509.CertificateRequest{Subject: pkix.Name{CommonName: sleepID.String()}}), sleepID, ErrBadCSR},
		{"two uri sans", nil, csrWith(&x509.CertificateRequest{URIs: []*url.URL{sleepID.URL(), otherID.URL()}}), sleepID, ErrBadCSR},
		{"invalid id", nil, good, identity.ID{TrustDomain: "cluster.local", Namespace: "default", ServiceAccount: "a/b"}, identity.ErrSegment},
		{"canceled", canceled, good, sleepID, context.Canceled},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ctx := tc.ctx
			if ctx == nil {
				ctx = context.Background()
			}
			chain, err := l.Sign(ctx, tc.csr, tc.id, time.Hour)
			if !errors.Is(err, tc.want) {
				t.Fatalf("Sign = %d certs, %v; want %v", len(chain), err, tc.want)
			}
			if chain != nil {
				t.Fatal("chain returned with error")
			}
		})
	}
}

func TestCreateCSRShape(t *testing.T) {
	csrPEM := mustCSR(t, mustKey(t), sleepID)
	csr, id, err := parseCSR(csrPEM)
	if err != nil {
		t.Fatal(err)
	}
	if id != sleepID {
		t.Errorf("csr asks for %v", id)
	}
	if len(csr.Subject.Names) != 0 {
		t.Errorf("subject %v, want empty", csr.Subject)
	}
	var san *pkix.Extension
	for i := range csr.Extensions {
		if csr.Extensions[i].Id.Equal(oidSubjectAltName) {
			san = &csr.Extensions[i]
		}
	}
	if san == nil || !san.Critical {
		t.Errorf("SAN extension %+v, want critical (RFC 5280 §4.2.1.6, empty subject)", san)
	}
	if _, err := CreateCSR(mustKey(t), identity.ID{}); err == nil {
		t.Error("CreateCSR accepted the zero ID")
	}
}
