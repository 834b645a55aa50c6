package pki

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
)

// Cluster is a Kubernetes control plane's throw-away certificate
// authority and the files its components read, all in one directory.
// Every certificate is ECDSA P-256.
type Cluster struct {
	// CACert and CAKey are the cluster CA (PEM). The API server trusts
	// client certificates it signed (--client-ca-file); a
	// controller-manager can sign CSRs with it
	// (--cluster-signing-cert-file/-key-file).
	CACert, CAKey string
	// ServingCert and ServingKey are the API server's serving
	// certificate, valid for localhost, the in-cluster names of the
	// kubernetes service and ClusterOptions.ServingIPs.
	ServingCert, ServingKey string
	// ServiceAccountKey and ServiceAccountPub sign and verify service
	// account tokens (a controller-manager's
	// --service-account-private-key-file).
	ServiceAccountKey, ServiceAccountPub string
	// KubeletClientCert and KubeletClientKey authenticate the API server to
	// kubelets (exec, logs, port-forward).
	KubeletClientCert, KubeletClientKey string

	lifetime time.Duration
	caCert   *x509.Certificate
	caKey    crypto.Signer
}

// ClusterOptions configures NewCluster.
type ClusterOptions struct {
	// CAName is the CA's common name. Empty: "amber-test-ca".
	CAName string
	// ServingIPs are the addresses the API server's serving certificate
	// is valid for (127.0.0.1, the kubernetes service's address, a
	// node's address).
	ServingIPs []net.IP
	// Lifetime is how long every certificate is valid. Zero: a day.
	Lifetime time.Duration
}

// NewCluster creates the CA, the API server's serving and kubelet-client
// certificates and the service-account key pair in dir.
func NewCluster(dir string, o ClusterOptions) (*Cluster, error) {
	if o.CAName == "" {
		o.CAName = "amber-test-ca"
	}
	if o.Lifetime == 0 {
		o.Lifetime = 24 * time.Hour
	}
	c := &Cluster{
		CACert:            filepath.Join(dir, "ca.crt"),
		CAKey:             filepath.Join(dir, "ca.key"),
		ServingCert:       filepath.Join(dir, "apiserver.crt"),
		ServingKey:        filepath.Join(dir, "apiserver.key"),
		ServiceAccountKey: filepath.Join(dir, "sa.key"),
		ServiceAccountPub: filepath.Join(dir, "sa.pub"),
		KubeletClientCert: filepath.Join(dir, "apiserver-kubelet-client.crt"),
		KubeletClientKey:  filepath.Join(dir, "apiserver-kubelet-client.key"),
		lifetime:          o.Lifetime,
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("create pki dir: %w", err)
	}

	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("generate ca key: %w", err)
	}
	tmpl := &x509.Certificate{
		Subject:               pkix.Name{CommonName: o.CAName},
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign | x509.KeyUsageDigitalSignature,
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	der, err := CreateCert(tmpl, tmpl, key.Public(), key, c.lifetime)
	if err != nil {
		return nil, fmt.Errorf("create ca cert: %w", err)
	}
	if c.caCert, err = x509.ParseCertificate(der); err != nil {
		return nil, fmt.Errorf("parse ca cert: %w", err)
	}
	c.caKey = key
	if err := WriteCertKey(c.CACert, c.CAKey, der, key); err != nil {
		return nil, err
	}

	serving := &x509.Certificate{
		Subject: pkix.Name{CommonName: "kube-apiserver"},
		// The names a client on the node or in a pod may dial.
		DNSNames: []string{
			"localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc",
			"kubernetes.default.svc.cluster.local",
		},
		IPAddresses: o.ServingIPs,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	if err := c.issue(serving, c.ServingCert, c.ServingKey); err != nil {
		return nil, fmt.Errorf("issue serving cert: %w", err)
	}
	kc := &x509.Certificate{
		Subject:     pkix.Name{CommonName: "kube-apiserver-kubelet-client", Organization: []string{"system:masters"}},
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	}
	if err := c.issue(kc, c.KubeletClientCert, c.KubeletClientKey); err != nil {
		return nil, fmt.Errorf("issue kubelet client cert: %w", err)
	}

	sa, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("generate service account key: %w", err)
	}
	if err := WriteKey(c.ServiceAccountKey, sa); err != nil {
		return nil, err
	}
	pub, err := x509.MarshalPKIXPublicKey(sa.Public())
	if err != nil {
		return nil, fmt.Errorf("marshal service account public key: %w", err)
	}
	if err := WritePEM(c.ServiceAccountPub, "PUBLIC KEY", pub, 0o644); err != nil {
		return nil, err
	}
	return c, nil
}

// ClientCert issues a client certificate for user in groups (the API
// server maps CN to the user name and O to groups) and returns it and its
// key as PEM.
func (c *Cluster) ClientCert(user string, groups ...string) (certPEM, keyPEM []byte, err error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, fmt.Errorf("generate client key for %s: %w", user, err)
	}
	tmpl := &x509.Certificate{
		Subject:     pkix.Name{CommonName: user, Organization: groups},
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	}
	der, err := CreateCert(tmpl, c.caCert, key.Public(), c.caKey, c.lifetime)
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
func (c *Cluster) CAPEM() []byte {
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: c.caCert.Raw})
}

// Kubeconfig returns a kubeconfig for server, its one context named name,
// authenticating user with the client certificate certPEM and keyPEM (from
// ClientCert).
func (c *Cluster) Kubeconfig(name, server, user string, certPEM, keyPEM []byte) []byte {
	b64 := base64.StdEncoding.EncodeToString
	// %q: JSON strings are YAML strings, safe for "system:node:x".
	return fmt.Appendf(nil, `apiVersion: v1
kind: Config
clusters:
- name: %[1]q
  cluster:
    server: %[2]q
    certificate-authority-data: %[3]s
users:
- name: %[4]q
  user:
    client-certificate-data: %[5]s
    client-key-data: %[6]s
contexts:
- name: %[1]q
  context:
    cluster: %[1]q
    user: %[4]q
current-context: %[1]q
`, name, server, b64(c.CAPEM()), user, b64(certPEM), b64(keyPEM))
}

func (c *Cluster) issue(tmpl *x509.Certificate, certFile, keyFile string) error {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return fmt.Errorf("generate key: %w", err)
	}
	der, err := CreateCert(tmpl, c.caCert, key.Public(), c.caKey, c.lifetime)
	if err != nil {
		return err
	}
	return WriteCertKey(certFile, keyFile, der, key)
}
