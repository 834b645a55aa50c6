package identity

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/asn1"
	"errors"
	"math/big"
	"net/url"
	"testing"
	"time"
)

// rawSAN builds a subjectAltName extension value holding the given URIs
// byte for byte, bypassing url.URL.
func rawSAN(t *testing.T, uris ...string) []byte {
	t.Helper()
	var names []asn1.RawValue
	for _, u := range uris {
		names = append(names, asn1.RawValue{Class: asn1.ClassContextSpecific, Tag: tagURI, Bytes: []byte(u)})
	}
	names = append(names, asn1.RawValue{Class: asn1.ClassContextSpecific, Tag: 2, Bytes: []byte("example.com")}) // dNSName
	b, err := asn1.Marshal(names)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func mustCert(t *testing.T, tmpl *x509.Certificate) *x509.Certificate {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl.SerialNumber = big.NewInt(1)
	tmpl.NotBefore = time.Now().Add(-time.Hour)
	tmpl.NotAfter = time.Now().Add(time.Hour)
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	return cert
}

func TestFromCertificate(t *testing.T) {
	sleep := "spiffe://cluster.local/ns/default/sa/sleep"
	mustURL := func(s string) *url.URL {
		u, err := url.Parse(s)
		if err != nil {
			t.Fatal(err)
		}
		return u
	}
	ext := func(uris ...string) []pkix.Extension {
		return []pkix.Extension{{Id: oidSubjectAltName, Critical: true, Value: rawSAN(t, uris...)}}
	}
	for _, tc := range []struct {
		name    string
		tmpl    x509.Certificate
		want    ID
		wantErr error
	}{
		{name: "one spiffe uri", tmpl: x509.Certificate{URIs: []*url.URL{mustURL(sleep)}, DNSNames: []string{"x.example"}},
			want: ID{"cluster.local", "default", "sleep"}},
		{name: "no san", tmpl: x509.Certificate{Subject: pkix.Name{CommonName: sleep}}, wantErr: ErrNoURISAN},
		{name: "dns only", tmpl: x509.Certificate{DNSNames: []string{"sleep.default.svc"}}, wantErr: ErrNoURISAN},
		{name: "two spiffe uris", tmpl: x509.Certificate{URIs: []*url.URL{mustURL(sleep), mustURL("spiffe://cluster.local/ns/default/sa/other")}},
			wantErr: ErrManyURISANs},
		{name: "spiffe and https", tmpl: x509.Certificate{URIs: []*url.URL{mustURL(sleep), mustURL("https://example.com/")}},
			wantErr: ErrManyURISANs},
		{name: "not spiffe", tmpl: x509.Certificate{URIs: []*url.URL{mustURL("https://cluster.local/ns/default/sa/sleep")}},
			wantErr: ErrScheme},
		{name: "wrong shape", tmpl: x509.Certificate{URIs: []*url.URL{mustURL("spiffe://cluster.local/sleep")}},
			wantErr: ErrPath},
		// url.Parse would decode %73 to "s"; the raw SAN is what the CA
		// signed, and it is not a valid ID.
		{name: "percent encoded", tmpl: x509.Certificate{ExtraExtensions: ext("spiffe://cluster.local/ns/default/sa/%73leep")},
			wantErr: ErrSegment},
		{name: "raw exact", tmpl: x509.Certificate{ExtraExtensions: ext(sleep)}, want: ID{"cluster.local", "default", "sleep"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cert := mustCert(t, &tc.tmpl)
			got, err := FromCertificate(cert)
			if tc.wantErr != nil {
				if !errors.Is(err, tc.wantErr) {
					t.Fatalf("FromCertificate = %+v, %v; want error %v", got, err, tc.wantErr)
				}
				return
			}
			if err != nil || got != tc.want {
				t.Fatalf("FromCertificate = %+v, %v; want %+v", got, err, tc.want)
			}
		})
	}
	if _, err := FromCertificate(nil); !errors.Is(err, ErrNoCertificate) {
		t.Errorf("FromCertificate(nil) = %v", err)
	}
}

func TestFromCertificateRequest(t *testing.T) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	want := ID{"td", "ns1", "sa1"}
	der, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{URIs: []*url.URL{want.URL()}}, key)
	if err != nil {
		t.Fatal(err)
	}
	csr, err := x509.ParseCertificateRequest(der)
	if err != nil {
		t.Fatal(err)
	}
	got, err := FromCertificateRequest(csr)
	if err != nil || got != want {
		t.Fatalf("FromCertificateRequest = %+v, %v", got, err)
	}

	der, err = x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{DNSNames: []string{"a"}}, key)
	if err != nil {
		t.Fatal(err)
	}
	csr, err = x509.ParseCertificateRequest(der)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := FromCertificateRequest(csr); !errors.Is(err, ErrNoURISAN) {
		t.Fatalf("FromCertificateRequest without URI = %v", err)
	}
}
