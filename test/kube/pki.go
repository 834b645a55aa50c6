package kube

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"time"
)

// PKI holds the files of the control plane's throw-away certificate
// authority. Every certificate is ECDSA P-256 and valid for a day.
type PKI struct {
	// CACert and CAKey are the cluster CA (PEM). The API server trusts
	// client certificates it signed (--client-ca-file); a controller-manager
	// can sign CSRs with it (--cluster-signing-cert-file/-key-file).
	CACert, CAKey string
	// ServingCert and ServingKey are the API server's serving certificate,
	// valid for 127.0.0.1 and the in-cluster names of the kubernetes service.
	ServingCert, ServingKey string
	// ServiceAccountKey and ServiceAccountPub sign and verify service
	// account tokens (a controller-manager's --service-account-private-key-file).
	ServiceAccountKey, ServiceAccountPub string
	// KubeletClientCert and KubeletClientKey authenticate the API server to
	// kubelets (exec, logs, port-forward).
	KubeletClientCert, KubeletClientKey string

	caCert *x509.Certificate
	caKey  crypto.Signer
}

// ServiceCIDR is the API server's --service-cluster-ip-range, and
// KubernetesServiceIP the address of the "kubernetes" service in it, which
// the serving certificate includes so that pods may use it.
const (
	ServiceCIDR         = "10.96.0.0/16"
	KubernetesServiceIP = "10.96.0.1"
)

const certLifetime = 24 * time.Hour

// newPKI creates a CA, the API server's serving certificate, the
// service-account key pair and the API server's kubelet client certificate
// in dir.
func newPKI(dir string) (*PKI, error) {
	p := &PKI{
		CACert:            filepath.Join(dir, "ca.crt"),
		CAKey:             filepath.Join(dir, "ca.key"),
		ServingCert:       filepath.Join(dir, "apiserver.crt"),
		ServingKey:        filepath.Join(dir, "apiserver.key"),
		ServiceAccountKey: filepath.Join(dir, "sa.key"),
		ServiceAccountPub: filepath.Join(dir, "sa.pub"),
		KubeletClientCert: filepath.Join(dir, "apiserver-kubelet-client.crt"),
		KubeletClientKey:  filepath.Join(dir, "apiserver-kubelet-client.key"),
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("create pki dir: %w", err)
	}

	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("generate ca key: %w", err)
	}
	tmpl := &x509.Certificate{
		Subject:               pkix.Name{CommonName: "amber-test-ca"},
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign | x509.KeyUsageDigitalSignature,
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	der, err := createCert(tmpl, tmpl, key.Public(), key)
	if err != nil {
		return nil, fmt.Errorf("create ca cert: %w", err)
	}
	if p.caCert, err = x509.ParseCertificate(der); err != nil {
		return nil, fmt.Errorf("parse ca cert: %w", err)
	}
	p.caKey = key
	if err := writeCertKey(p.CACert, p.CAKey, der, key); err != nil {
		return nil, err
	}

	serving := &x509.Certificate{
		Subject: pkix.Name{CommonName: "kube-apiserver"},
		// The names a client inside the cluster or on the node may dial.
		DNSNames: []string{
			"localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc",
			"kubernetes.default.svc.cluster.local",
		},
		IPAddresses: []net.IP{net.IPv4(127, 0, 0, 1), net.ParseIP(KubernetesServiceIP)},
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	if err := p.issue(serving, p.ServingCert, p.ServingKey); err != nil {
		return nil, fmt.Errorf("issue serving cert: %w", err)
	}
	kc := &x509.Certificate{
		Subject:     pkix.Name{CommonName: "kube-apiserver-kubelet-client", Organization: []string{"system:masters"}},
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	}
	if err := p.issue(kc, p.KubeletClientCert, p.KubeletClientKey); err != nil {
		return nil, fmt.Errorf("issue kubelet client cert: %w", err)
	}

	sa, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("generate service account key: %w", err)
	}
	if err := writeKey(p.ServiceAccountKey, sa); err != nil {
		return nil, err
	}
	pub, err := x509.MarshalPKIXPublicKey(sa.Public())
	if err != nil {
		return nil, fmt.Errorf("marshal service account public key: %w", err)
	}
	if err := writePEM(p.ServiceAccountPub, "PUBLIC KEY", pub, 0o644); err != nil {
		return nil, err
	}
	return p, nil
}

// ClientCert issues a client certificate for user in groups (the API
// server maps CN to the user name and O to groups) and returns it and its
// key as PEM.
func (p *PKI) ClientCert(user string, groups ...string) (certPEM, keyPEM []byte, err error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, fmt.Errorf("generate client key for %s: %w", user, err)
	}
	tmpl := &x509.Certificate{
		Subject:     pkix.Name{CommonName: user, Organization: groups},
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	}
	der, err := createCert(tmpl, p.caCert, key.Public(), p.caKey)
	if err != nil {
		return nil, nil, fmt.Errorf("issue client cert for %s: %w", user, err)
	}
	kder, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return nil, nil, fmt.Errorf("marshal client key for %s: %w", user, err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}),
		pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: kder}), nil
}

// CAPEM returns the CA certificate as PEM.
func (p *PKI) CAPEM() []byte {
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: p.caCert.Raw})
}

func (p *PKI) issue(tmpl *x509.Certificate, certFile, keyFile string) error {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return fmt.Errorf("generate key: %w", err)
	}
	der, err := createCert(tmpl, p.caCert, key.Public(), p.caKey)
	if err != nil {
		return err
	}
	return writeCertKey(certFile, keyFile, der, key)
}

func createCert(tmpl, parent *x509.Certificate, pub crypto.PublicKey, signer crypto.Signer) ([]byte, error) {
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		return nil, fmt.Errorf("serial number: %w", err)
	}
	tmpl.SerialNumber = serial
	// Backdated so that a clock step between processes cannot make a fresh
	// certificate "not yet valid".
	tmpl.NotBefore = time.Now().Add(-time.Hour)
	tmpl.NotAfter = time.Now().Add(certLifetime)
	if !tmpl.IsCA {
		tmpl.KeyUsage = x509.KeyUsageDigitalSignature
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, parent, pub, signer)
	if err != nil {
		return nil, fmt.Errorf("create certificate %q: %w", tmpl.Subject.CommonName, err)
	}
	return der, nil
}

func writeCertKey(certFile, keyFile string, der []byte, key *ecdsa.PrivateKey) error {
	if err := writePEM(certFile, "CERTIFICATE", der, 0o644); err != nil {
		return err
	}
	return writeKey(keyFile, key)
}

func writeKey(file string, key *ecdsa.PrivateKey) error {
	der, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return fmt.Errorf("marshal key %s: %w", file, err)
	}
	return writePEM(file, "PRIVATE KEY", der, 0o600)
}

func writePEM(file, typ string, der []byte, mode os.FileMode) error {
	if err := os.WriteFile(file, pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der}), mode); err != nil {
		return fmt.Errorf("write %s: %w", file, err)
	}
	return nil
}
