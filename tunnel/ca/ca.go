// Package ca obtains workload certificates: a file-backed local CA and a
// client of istiod's IstioCertificateService.
package ca

import (
	"bytes"
	"context"
	"crypto"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/asn1"
	"encoding/pem"
	"errors"
	"fmt"
	"time"

	"github.com/amber-mesh/amber/tunnel/identity"
)

// Client signs workload certificates.
type Client interface {
	// Sign returns a certificate for the key in csrPEM, valid for about ttl,
	// carrying exactly the identity id. The chain is leaf first, followed by
	// any intermediates; trust anchors are not included. The CSR's URI SAN
	// must be id. A Client never returns a chain whose leaf names another
	// identity or another key.
	Sign(ctx context.Context, csrPEM []byte, id identity.ID, ttl time.Duration) (chain []*x509.Certificate, err error)
	// Roots returns the trust anchors of the mesh: peers' chains are
	// verified against them. The caller must not modify the pool.
	Roots() *x509.CertPool
}

// Errors returned (wrapped) by the clients of this package.
var (
	ErrBadCSR           = errors.New("invalid certificate signing request")
	ErrIdentityMismatch = errors.New("identity mismatch")
	ErrTrustDomain      = errors.New("trust domain not served by this CA")
	ErrBadResponse      = errors.New("invalid CA response")
	ErrUntrusted        = errors.New("certificate does not chain to the mesh roots")
	ErrCAFiles          = errors.New("invalid local CA files")
	ErrToken            = errors.New("invalid token")
)

const (
	pemCSR  = "CERTIFICATE REQUEST"
	pemCert = "CERTIFICATE"
)

var oidSubjectAltName = asn1.ObjectIdentifier{2, 5, 29, 17}

// CreateCSR returns a PEM CSR for key asking for id, shaped like Istio's
// ztunnel's: empty subject and a single URI SAN. RFC 5280 §4.2.1.6 requires
// the SAN extension to be critical when the subject is empty; x509 only does
// that for certificates, so the extension is built here.
func CreateCSR(key crypto.Signer, id identity.ID) ([]byte, error) {
	if err := id.Validate(); err != nil {
		return nil, fmt.Errorf("create csr: %w", err)
	}
	san, err := asn1.Marshal([]asn1.RawValue{{
		Class: asn1.ClassContextSpecific,
		Tag:   6, // uniformResourceIdentifier
		Bytes: []byte(id.String()),
	}})
	if err != nil {
		return nil, fmt.Errorf("create csr for %s: %w", id, err)
	}
	der, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{
		ExtraExtensions: []pkix.Extension{{Id: oidSubjectAltName, Critical: true, Value: san}},
	}, key)
	if err != nil {
		return nil, fmt.Errorf("create csr for %s: %w", id, err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: pemCSR, Bytes: der}), nil
}

// parseCSR decodes a single PEM CSR, checks its self-signature and returns
// the identity it asks for.
func parseCSR(csrPEM []byte) (*x509.CertificateRequest, identity.ID, error) {
	block, rest, err := decodePEM(csrPEM)
	if err != nil {
		return nil, identity.ID{}, fmt.Errorf("%w: %v", ErrBadCSR, err)
	}
	if block == nil {
		return nil, identity.ID{}, fmt.Errorf("%w: no PEM block", ErrBadCSR)
	}
	if block.Type != pemCSR && block.Type != "NEW "+pemCSR {
		return nil, identity.ID{}, fmt.Errorf("%w: PEM type %q", ErrBadCSR, block.Type)
	}
	if len(bytes.TrimSpace(rest)) != 0 {
		return nil, identity.ID{}, fmt.Errorf("%w: trailing data after PEM block", ErrBadCSR)
	}
	csr, err := x509.ParseCertificateRequest(block.Bytes)
	if err != nil {
		return nil, identity.ID{}, fmt.Errorf("%w: %v", ErrBadCSR, err)
	}
	if err := csr.CheckSignature(); err != nil {
		return nil, identity.ID{}, fmt.Errorf("%w: %v", ErrBadCSR, err)
	}
	id, err := identity.FromCertificateRequest(csr)
	if err != nil {
		return nil, identity.ID{}, fmt.Errorf("%w: %v", ErrBadCSR, err)
	}
	return csr, id, nil
}

// checkCSR parses csrPEM and requires it to ask for exactly id.
func checkCSR(csrPEM []byte, id identity.ID) (*x509.CertificateRequest, error) {
	if err := id.Validate(); err != nil {
		return nil, err
	}
	csr, got, err := parseCSR(csrPEM)
	if err != nil {
		return nil, err
	}
	if got != id {
		return nil, fmt.Errorf("%w: csr asks for %s, request is for %s", ErrIdentityMismatch, got, id)
	}
	return csr, nil
}

// EncodeChain returns certs as concatenated PEM.
func EncodeChain(certs []*x509.Certificate) []byte {
	var b bytes.Buffer
	for _, c := range certs {
		_ = pem.Encode(&b, &pem.Block{Type: pemCert, Bytes: c.Raw})
	}
	return b.Bytes()
}

// parseCertsPEM parses every block of data, which must all be certificates.
func parseCertsPEM(data []byte) ([]*x509.Certificate, error) {
	var certs []*x509.Certificate
	for {
		block, rest, err := decodePEM(data)
		if err != nil {
			return nil, err
		}
		if block == nil {
			return certs, nil
		}
		if block.Type != pemCert {
			return nil, fmt.Errorf("PEM type %q, want %q", block.Type, pemCert)
		}
		c, err := x509.ParseCertificate(block.Bytes)
		if err != nil {
			return nil, err
		}
		certs = append(certs, c)
		data = rest
	}
}

// publicKeyEqual compares keys of any of the standard library's types.
func publicKeyEqual(a, b crypto.PublicKey) bool {
	k, ok := a.(interface{ Equal(crypto.PublicKey) bool })
	return ok && k.Equal(b)
}

// decodePEM decodes the next PEM block of data. Unlike pem.Decode it refuses
// text before the block and PEM headers, so nothing in a CA exchange is
// silently skipped. It returns a nil block when only white space is left.
func decodePEM(data []byte) (*pem.Block, []byte, error) {
	trimmed := bytes.TrimLeft(data, " \t\r\n")
	if len(trimmed) == 0 {
		return nil, nil, nil
	}
	if !bytes.HasPrefix(trimmed, []byte("-----BEGIN ")) {
		return nil, nil, errors.New("data outside PEM blocks")
	}
	block, rest := pem.Decode(trimmed)
	if block == nil {
		return nil, nil, errors.New("malformed PEM block")
	}
	if len(block.Headers) != 0 {
		return nil, nil, errors.New("PEM headers not allowed")
	}
	return block, rest, nil
}
