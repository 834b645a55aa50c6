package ca

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"io/fs"
	"math/big"
	"net/url"
	"os"
	"path/filepath"
	"time"

	"github.com/amber-mesh/amber/tunnel/identity"
)

// File names inside a local CA directory.
const (
	RootCertFile = "root-cert.pem"
	RootKeyFile  = "root-key.pem"
)

const (
	// DefaultTTL is used when Sign is asked for a non-positive TTL; it is
	// Istio's default workload certificate lifetime.
	DefaultTTL = 24 * time.Hour
	// DefaultMaxTTL is Istio's default cap on workload certificate
	// lifetime (MAX_WORKLOAD_CERT_TTL).
	DefaultMaxTTL = 90 * 24 * time.Hour
	// backdate covers clock skew between the signer and the peers that
	// will verify the certificate.
	backdate = time.Minute
	rootTTL  = 10 * 365 * 24 * time.Hour
)

// Local is a CA whose root certificate and key live in a directory. It is
// meant for local mode and tests; it signs only identities of its own trust
// domain.
type Local struct {
	// Now is the CA's clock. Nil means time.Now. Set it before the first
	// Sign.
	Now func() time.Time
	// MaxTTL caps the lifetime of issued certificates. Zero means
	// DefaultMaxTTL. Set it before the first Sign.
	MaxTTL time.Duration

	trustDomain string
	root        *x509.Certificate
	rootPEM     []byte
	key         crypto.Signer
	roots       *x509.CertPool
}

var _ Client = (*Local)(nil)

// OpenLocal loads root-cert.pem and root-key.pem from dir, or creates both
// (ECDSA P-256, key mode 0600, dir 0700) when neither exists. A directory
// holding only one of them, or a key that does not match the certificate,
// is an error: regenerating would silently change the mesh's root.
func OpenLocal(dir, trustDomain string) (*Local, error) {
	if err := identity.CheckTrustDomain(trustDomain); err != nil {
		return nil, fmt.Errorf("open local ca %s: %w", dir, err)
	}
	certPath, keyPath := filepath.Join(dir, RootCertFile), filepath.Join(dir, RootKeyFile)
	_, certErr := os.Stat(certPath)
	_, keyErr := os.Stat(keyPath)
	switch {
	case errors.Is(certErr, fs.ErrNotExist) && errors.Is(keyErr, fs.ErrNotExist):
		if err := createRoot(dir, trustDomain, certPath, keyPath); err != nil {
			return nil, fmt.Errorf("open local ca %s: %w", dir, err)
		}
	case certErr != nil:
		return nil, fmt.Errorf("open local ca %s: %w", dir, certErr)
	case keyErr != nil:
		return nil, fmt.Errorf("open local ca %s: %w", dir, keyErr)
	}
	l, err := loadLocal(certPath, keyPath)
	if err != nil {
		return nil, fmt.Errorf("open local ca %s: %w", dir, err)
	}
	l.trustDomain = trustDomain
	return l, nil
}

func loadLocal(certPath, keyPath string) (*Local, error) {
	st, err := os.Stat(keyPath)
	if err != nil {
		return nil, err
	}
	if st.Mode().Perm()&0o077 != 0 {
		return nil, fmt.Errorf("%w: %s has mode %v, want 0600", ErrCAFiles, keyPath, st.Mode().Perm())
	}
	keyPEM, err := os.ReadFile(keyPath)
	if err != nil {
		return nil, err
	}
	certPEM, err := os.ReadFile(certPath)
	if err != nil {
		return nil, err
	}
	certs, err := parseCertsPEM(certPEM)
	if err != nil || len(certs) != 1 {
		return nil, fmt.Errorf("%w: %s must hold exactly one certificate (%v)", ErrCAFiles, certPath, err)
	}
	root := certs[0]
	if !root.IsCA || !root.BasicConstraintsValid {
		return nil, fmt.Errorf("%w: %s is not a CA certificate", ErrCAFiles, certPath)
	}
	key, err := parseKey(keyPEM)
	if err != nil {
		return nil, fmt.Errorf("%w: %s: %v", ErrCAFiles, keyPath, err)
	}
	if !publicKeyEqual(key.Public(), root.PublicKey) {
		return nil, fmt.Errorf("%w: %s does not match %s", ErrCAFiles, keyPath, certPath)
	}
	roots := x509.NewCertPool()
	roots.AddCert(root)
	return &Local{
		root:    root,
		rootPEM: pem.EncodeToMemory(&pem.Block{Type: pemCert, Bytes: root.Raw}),
		key:     key,
		roots:   roots,
	}, nil
}

func parseKey(keyPEM []byte) (crypto.Signer, error) {
	block, _, err := decodePEM(keyPEM)
	if err != nil {
		return nil, err
	}
	if block == nil {
		return nil, errors.New("no PEM block")
	}
	var key any
	switch block.Type {
	case "EC PRIVATE KEY":
		key, err = x509.ParseECPrivateKey(block.Bytes)
	case "RSA PRIVATE KEY":
		key, err = x509.ParsePKCS1PrivateKey(block.Bytes)
	case "PRIVATE KEY":
		key, err = x509.ParsePKCS8PrivateKey(block.Bytes)
	default:
		return nil, fmt.Errorf("PEM type %q is not a private key", block.Type)
	}
	if err != nil {
		return nil, err
	}
	switch k := key.(type) {
	case *ecdsa.PrivateKey:
		return k, nil
	case *rsa.PrivateKey:
		return k, nil
	case ed25519.PrivateKey:
		return k, nil
	}
	return nil, fmt.Errorf("unsupported key type %T", key)
}

func createRoot(dir, trustDomain, certPath, keyPath string) error {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return err
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return err
	}
	now := time.Now()
	serial, err := randomSerial()
	if err != nil {
		return err
	}
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{Organization: []string{trustDomain}, CommonName: "amber local root CA"},
		NotBefore:             now.Add(-backdate),
		NotAfter:              now.Add(rootTTL),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return err
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return err
	}
	// Key first: a crash in between leaves a key without a certificate,
	// which OpenLocal refuses rather than pairing with a new root.
	if err := writeNew(keyPath, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER}), 0o600); err != nil {
		return err
	}
	return writeNew(certPath, pem.EncodeToMemory(&pem.Block{Type: pemCert, Bytes: der}), 0o644)
}

// writeNew writes data to path without ever exposing a partial file and
// without replacing an existing one (link(2) fails with EEXIST).
func writeNew(path string, data []byte, perm os.FileMode) error {
	f, err := os.CreateTemp(filepath.Dir(path), ".tmp-"+filepath.Base(path)+"-*")
	if err != nil {
		return err
	}
	tmp := f.Name()
	defer os.Remove(tmp)
	if err := f.Chmod(perm); err != nil {
		f.Close()
		return err
	}
	if _, err := f.Write(data); err != nil {
		f.Close()
		return err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	return os.Link(tmp, path)
}

func randomSerial() (*big.Int, error) {
	// RFC 5280 §4.1.2.2: positive, at most 20 octets; 128 random bits.
	return rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 128))
}

// TrustDomain returns the trust domain this CA signs for.
func (l *Local) TrustDomain() string { return l.trustDomain }

// Roots returns a pool holding the root certificate.
func (l *Local) Roots() *x509.CertPool { return l.roots }

// RootPEM returns the root certificate in PEM.
func (l *Local) RootPEM() []byte { return append([]byte(nil), l.rootPEM...) }

// Root returns the root certificate.
func (l *Local) Root() *x509.Certificate { return l.root }

// Sign checks the CSR's self-signature, requires its only URI SAN to be id
// and id to be in the CA's trust domain, and issues a leaf carrying only that
// URI SAN, usable for TLS server and client authentication. A non-positive
// ttl means DefaultTTL; the lifetime is capped at MaxTTL and at the root's
// expiry.
func (l *Local) Sign(ctx context.Context, csrPEM []byte, id identity.ID, ttl time.Duration) ([]*x509.Certificate, error) {
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("local ca: sign %s: %w", id, err)
	}
	if id.TrustDomain != l.trustDomain {
		return nil, fmt.Errorf("local ca: sign %s: %w: want %q", id, ErrTrustDomain, l.trustDomain)
	}
	csr, err := checkCSR(csrPEM, id)
	if err != nil {
		return nil, fmt.Errorf("local ca: sign %s: %w", id, err)
	}
	leaf, err := l.issue(csr.PublicKey, id, ttl)
	if err != nil {
		return nil, fmt.Errorf("local ca: sign %s: %w", id, err)
	}
	return []*x509.Certificate{leaf}, nil
}

// issue signs pub for id without looking at any CSR.
func (l *Local) issue(pub crypto.PublicKey, id identity.ID, ttl time.Duration) (*x509.Certificate, error) {
	switch k := pub.(type) {
	case *ecdsa.PublicKey, ed25519.PublicKey:
	case *rsa.PublicKey:
		if k.N.BitLen() < 2048 {
			return nil, fmt.Errorf("%w: RSA key of %d bits", ErrBadCSR, k.N.BitLen())
		}
	default:
		return nil, fmt.Errorf("%w: key type %T", ErrBadCSR, pub)
	}
	now := time.Now()
	if l.Now != nil {
		now = l.Now()
	}
	maxTTL := l.MaxTTL
	if maxTTL <= 0 {
		maxTTL = DefaultMaxTTL
	}
	if ttl <= 0 {
		ttl = DefaultTTL
	}
	ttl = min(ttl, maxTTL)
	notAfter := now.Add(ttl)
	if notAfter.After(l.root.NotAfter) {
		notAfter = l.root.NotAfter
	}
	serial, err := randomSerial()
	if err != nil {
		return nil, err
	}
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		NotBefore:             now.Add(-backdate),
		NotAfter:              notAfter,
		URIs:                  []*url.URL{id.URL()},
		KeyUsage:              x509.KeyUsageDigitalSignature,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		BasicConstraintsValid: true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, l.root, pub, l.key)
	if err != nil {
		return nil, err
	}
	return x509.ParseCertificate(der)
}
