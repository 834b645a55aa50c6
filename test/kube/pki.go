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
	"net"
	"os"
	"path/filepath"
	"time"

	"github.com/amber-mesh/amber/test/pki"
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
	der, err := pki.CreateCert(tmpl, tmpl, key.Public(), key, certLifetime)
	if err != nil {
		return nil, fmt.Errorf("create ca cert: %w", err)
	}
	if p.caCert, err = x509.ParseCertificate(der); err != nil {
		return nil, fmt.Errorf("parse ca cert: %w", err)
	}
	p.caKey = key
	if err := pki.WriteCertKey(p.CACert, p.CAKey, der, key); err != nil {
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
	if err := pki.WriteKey(p.ServiceAccountKey, sa); err != nil {
		return nil, err
	}
	pub, err := x509.MarshalPKIXPublicKey(sa.Public())
	if err != nil {
		return nil, fmt.Errorf("marshal service account public key: %w", err)
	}
	if err := pki.WritePEM(p.ServiceAccountPub, "PUBLIC KEY", pub, 0o644); err != nil {
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
	der, err := pki.CreateCert(tmpl, p.caCert, key.Public(), p.caKey, certLifetime)
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
	der, err := pki.CreateCert(tmpl, p.caCert, key.Public(), p.caKey, certLifetime)
	if err != nil {
		return err
	}
	return pki.WriteCertKey(certFile, keyFile, der, key)
}
