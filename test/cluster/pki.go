package cluster

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/pem"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"time"

	testpki "github.com/amber-mesh/amber/test/pki"
)

// pki is the cluster's throw-away certificate authority and the files
// the components read. Certificates are ECDSA P-256, valid for a week.
type pki struct {
	dir    string
	caCert *x509.Certificate
	caKey  crypto.Signer
}

const certLifetime = 7 * 24 * time.Hour

func (p *pki) path(name string) string { return filepath.Join(p.dir, name) }

// newPKI creates the CA, the API server's serving and kubelet-client
// certificates and the service-account key pair in dir.
func newPKI(dir string) (*pki, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("create pki: %w", err)
	}
	p := &pki{dir: dir}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("create pki: %w", err)
	}
	tmpl := &x509.Certificate{
		Subject:               pkix.Name{CommonName: "amber-cluster-ca"},
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign | x509.KeyUsageDigitalSignature,
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	der, err := testpki.CreateCert(tmpl, tmpl, key.Public(), key, certLifetime)
	if err != nil {
		return nil, err
	}
	if p.caCert, err = x509.ParseCertificate(der); err != nil {
		return nil, fmt.Errorf("create pki: %w", err)
	}
	p.caKey = key
	if err := testpki.WriteCertKey(p.path("ca.crt"), p.path("ca.key"), der, key); err != nil {
		return nil, err
	}
	serving := &x509.Certificate{
		Subject: pkix.Name{CommonName: "kube-apiserver"},
		// What a client on the node or in a pod may dial.
		DNSNames: []string{"localhost", "kubernetes", "kubernetes.default",
			"kubernetes.default.svc", "kubernetes.default.svc.cluster.local"},
		IPAddresses: []net.IP{net.ParseIP(NodeIP), net.IPv4(127, 0, 0, 1), net.ParseIP(KubernetesServiceIP)},
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	if err := p.issue(serving, "apiserver"); err != nil {
		return nil, err
	}
	kc := &x509.Certificate{
		Subject:     pkix.Name{CommonName: "kube-apiserver-kubelet-client", Organization: []string{"system:masters"}},
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	}
	if err := p.issue(kc, "apiserver-kubelet-client"); err != nil {
		return nil, err
	}
	sa, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("create pki: %w", err)
	}
	if err := testpki.WriteKey(p.path("sa.key"), sa); err != nil {
		return nil, err
	}
	pub, err := x509.MarshalPKIXPublicKey(sa.Public())
	if err != nil {
		return nil, fmt.Errorf("create pki: %w", err)
	}
	return p, testpki.WritePEM(p.path("sa.pub"), "PUBLIC KEY", pub, 0o644)
}

// kubeconfig writes DIR/<name>.kubeconfig for user in groups (the API
// server maps CN to the user and O to groups) and returns its path.
func (p *pki) kubeconfig(name, server, user string, groups ...string) (string, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return "", fmt.Errorf("kubeconfig %s: %w", name, err)
	}
	der, err := testpki.CreateCert(&x509.Certificate{
		Subject:     pkix.Name{CommonName: user, Organization: groups},
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	}, p.caCert, key.Public(), p.caKey, certLifetime)
	if err != nil {
		return "", err
	}
	kder, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return "", fmt.Errorf("kubeconfig %s: %w", name, err)
	}
	b64 := base64.StdEncoding.EncodeToString
	// %q: JSON strings are YAML strings, safe for "system:node:x".
	cfg := fmt.Sprintf(`apiVersion: v1
kind: Config
clusters:
- name: amber
  cluster:
    server: %q
    certificate-authority-data: %s
users:
- name: %q
  user:
    client-certificate-data: %s
    client-key-data: %s
contexts:
- name: amber
  context:
    cluster: amber
    user: %q
current-context: amber
`, server, b64(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: p.caCert.Raw})), user,
		b64(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})),
		b64(pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: kder})), user)
	path := filepath.Join(p.dir, name+".kubeconfig")
	if err := os.WriteFile(path, []byte(cfg), 0o600); err != nil {
		return "", fmt.Errorf("kubeconfig %s: %w", name, err)
	}
	return path, nil
}

func (p *pki) issue(tmpl *x509.Certificate, name string) error {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return fmt.Errorf("issue %s: %w", name, err)
	}
	der, err := testpki.CreateCert(tmpl, p.caCert, key.Public(), p.caKey, certLifetime)
	if err != nil {
		return err
	}
	return testpki.WriteCertKey(p.path(name+".crt"), p.path(name+".key"), der, key)
}
