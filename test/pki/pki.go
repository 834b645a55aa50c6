// Package pki is the one certificate authority of the test control planes
// (test/kube, test/cluster): a Kubernetes cluster's set of certificates and
// keys, ECDSA certificates signed by a parent, written as PEM files with
// private keys kept 0600.
package pki

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/rand"
	"crypto/x509"
	"encoding/pem"
	"fmt"
	"math/big"
	"os"
	"time"
)

// CreateCert signs tmpl with signer (parent == tmpl for a self-signed CA),
// valid from an hour ago for lifetime.
func CreateCert(tmpl, parent *x509.Certificate, pub crypto.PublicKey, signer crypto.Signer, lifetime time.Duration) ([]byte, error) {
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		return nil, fmt.Errorf("serial number: %w", err)
	}
	tmpl.SerialNumber = serial
	// Backdated so that a clock step between processes cannot make a fresh
	// certificate "not yet valid".
	tmpl.NotBefore = time.Now().Add(-time.Hour)
	tmpl.NotAfter = time.Now().Add(lifetime)
	if !tmpl.IsCA {
		tmpl.KeyUsage = x509.KeyUsageDigitalSignature
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, parent, pub, signer)
	if err != nil {
		return nil, fmt.Errorf("create certificate %q: %w", tmpl.Subject.CommonName, err)
	}
	return der, nil
}

// WriteCertKey writes a certificate and its key as PEM files.
func WriteCertKey(certFile, keyFile string, der []byte, key *ecdsa.PrivateKey) error {
	if err := WritePEM(certFile, "CERTIFICATE", der, 0o644); err != nil {
		return err
	}
	return WriteKey(keyFile, key)
}

// WriteKey writes key as a 0600 PEM file.
func WriteKey(file string, key *ecdsa.PrivateKey) error {
	der, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return fmt.Errorf("marshal key %s: %w", file, err)
	}
	return WritePEM(file, "PRIVATE KEY", der, 0o600)
}

// WritePEM writes one PEM block to file with mode.
func WritePEM(file, typ string, der []byte, mode os.FileMode) error {
	if err := os.WriteFile(file, pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der}), mode); err != nil {
		return fmt.Errorf("write %s: %w", file, err)
	}
	return nil
}
