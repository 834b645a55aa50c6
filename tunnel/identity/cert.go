package identity

import (
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/asn1"
	"errors"
	"fmt"
)

// Certificate errors.
var (
	ErrNoCertificate = errors.New("no certificate")
	ErrNoURISAN      = errors.New("no URI SAN")
	ErrManyURISANs   = errors.New("more than one URI SAN")
	ErrBadSAN        = errors.New("malformed subjectAltName extension")
)

var oidSubjectAltName = asn1.ObjectIdentifier{2, 5, 29, 17}

// GeneralName tag of uniformResourceIdentifier (RFC 5280 §4.2.1.6).
const tagURI = 6

// FromCertificate returns the SPIFFE ID of an X.509-SVID. The X509-SVID spec
// (§2) requires exactly one URI SAN; a certificate with none or several is
// not a workload certificate and is rejected rather than guessed at.
func FromCertificate(cert *x509.Certificate) (ID, error) {
	if cert == nil {
		return ID{}, fmt.Errorf("identity from certificate: %w", ErrNoCertificate)
	}
	id, err := fromExtensions(cert.Extensions)
	if err != nil {
		return ID{}, fmt.Errorf("identity from certificate (serial %s): %w", cert.SerialNumber, err)
	}
	return id, nil
}

// FromCertificateRequest returns the SPIFFE ID a CSR asks for, with the same
// rules as FromCertificate. It does not check the CSR's signature.
func FromCertificateRequest(csr *x509.CertificateRequest) (ID, error) {
	if csr == nil {
		return ID{}, fmt.Errorf("identity from csr: %w", ErrNoCertificate)
	}
	id, err := fromExtensions(csr.Extensions)
	if err != nil {
		return ID{}, fmt.Errorf("identity from csr: %w", err)
	}
	return id, nil
}

// fromExtensions reads the URI SANs from the raw extension rather than from
// x509's parsed URIs: url.Parse unescapes and re-escapes, and an identity
// must be compared exactly as the CA signed it.
func fromExtensions(exts []pkix.Extension) (ID, error) {
	var uris []string
	seen := false
	for _, ext := range exts {
		if !ext.Id.Equal(oidSubjectAltName) {
			continue
		}
		if seen {
			return ID{}, ErrBadSAN // RFC 5280 §4.2: an extension appears at most once.
		}
		seen = true
		u, err := uriSANs(ext.Value)
		if err != nil {
			return ID{}, err
		}
		uris = u
	}
	switch len(uris) {
	case 0:
		return ID{}, ErrNoURISAN
	case 1:
		return Parse(uris[0])
	default:
		return ID{}, fmt.Errorf("%w: %d", ErrManyURISANs, len(uris))
	}
}

func uriSANs(der []byte) ([]string, error) {
	var seq asn1.RawValue
	rest, err := asn1.Unmarshal(der, &seq)
	if err != nil || len(rest) != 0 || seq.Class != asn1.ClassUniversal || seq.Tag != asn1.TagSequence || !seq.IsCompound {
		return nil, ErrBadSAN
	}
	var uris []string
	for b := seq.Bytes; len(b) > 0; {
		var name asn1.RawValue
		b, err = asn1.Unmarshal(b, &name)
		if err != nil {
			return nil, ErrBadSAN
		}
		if name.Class == asn1.ClassContextSpecific && name.Tag == tagURI && !name.IsCompound {
			uris = append(uris, string(name.Bytes))
		}
	}
	return uris, nil
}
