package certs

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"slices"
	"strings"

	"github.com/amber-mesh/amber/tunnel/identity"
)

// alpnH2 is the only protocol HBONE speaks; RFC 9113 §3.2 makes ALPN "h2"
// the way HTTP/2 over TLS is agreed.
const alpnH2 = "h2"

// PeerError is a rejected peer certificate. It says what was expected and
// what the peer presented.
type PeerError struct {
	// Role is the peer's role: "client" or "server".
	Role string
	// Want is the identity or trust domain required, if any.
	Want string
	// Got is what the peer presented, if it got that far.
	Got string
	// Err is one of the package's sentinel errors, possibly wrapping the
	// x509 verification error.
	Err error
}

func (e *PeerError) Error() string {
	s := fmt.Sprintf("hbone %s rejected: %v", e.Role, e.Err)
	if e.Want != "" || e.Got != "" {
		s += fmt.Sprintf(" (want %s, got %s)", orNone(e.Want), orNone(e.Got))
	}
	return s
}

func (e *PeerError) Unwrap() error { return e.Err }

func orNone(s string) string {
	if s == "" {
		return "nothing"
	}
	return s
}

// ServerConfig returns the TLS configuration of the inbound HBONE listener.
// Listeners are transparent, so an accepted connection's local address is
// the destination pod's IP; certFor maps it to the workload whose
// certificate is served, which must be in trustDomain. The client must
// present a certificate chaining to the mesh roots whose SPIFFE identity
// is in one of clientTrustDomains, or in trustDomain when none is given
// (the ztunnel's case; a waypoint accepts the trust domains istiod names
// for connect_terminate, aliases included); PeerID then returns that
// identity.
func (m *Manager) ServerConfig(certFor func(local net.Addr) (identity.ID, error), trustDomain string, clientTrustDomains ...string) *tls.Config {
	if len(clientTrustDomains) == 0 {
		clientTrustDomains = []string{trustDomain}
	}
	clientTrustDomains = slices.Clone(clientTrustDomains)
	return &tls.Config{
		MinVersion: tls.VersionTLS13,
		NextProtos: []string{alpnH2},
		// The chain is verified in VerifyConnection against the mesh
		// roots: x509's client verification would also work, but doing it
		// by hand keeps both directions identical and reads the roots at
		// handshake time.
		ClientAuth: tls.RequireAnyClientCert,
		// Resumption would carry an identity across certificate rotation
		// and policy changes; Istio's ztunnel does not resume either.
		SessionTicketsDisabled: true,
		Time:                   m.now,
		GetCertificate: func(hello *tls.ClientHelloInfo) (*tls.Certificate, error) {
			if hello.Conn == nil {
				return nil, errors.New("hbone server: no connection to choose a certificate by")
			}
			local := hello.Conn.LocalAddr()
			id, err := certFor(local)
			if err != nil {
				return nil, fmt.Errorf("hbone server: no workload for %v: %w", local, err)
			}
			if id.TrustDomain != trustDomain {
				return nil, fmt.Errorf("hbone server: workload %s for %v is not in trust domain %q", id, local, trustDomain)
			}
			return m.Get(hello.Context(), id)
		},
		VerifyConnection: func(cs tls.ConnectionState) error {
			_, err := m.verifyPeer(cs, "client", x509.ExtKeyUsageClientAuth, identity.ID{}, clientTrustDomains)
			return err
		},
	}
}

// ClientConfig returns the TLS configuration for an HBONE connection from
// workload src to a server that must be exactly want. The server's chain is
// checked against the mesh roots and its URI SAN against want; there is no
// SNI and no hostname check (docs/facts.md §3, HBONE). The server is verified before
// the client certificate is sent, so src's certificate never reaches a
// server that is not want.
func (m *Manager) ClientConfig(src, want identity.ID) *tls.Config {
	return &tls.Config{
		MinVersion: tls.VersionTLS13,
		NextProtos: []string{alpnH2},
		// Hostname verification does not apply: the peer is named by its
		// SPIFFE ID, which VerifyConnection checks along with the chain.
		InsecureSkipVerify: true,
		Time:               m.now,
		GetClientCertificate: func(cri *tls.CertificateRequestInfo) (*tls.Certificate, error) {
			return m.Get(cri.Context(), src)
		},
		VerifyConnection: func(cs tls.ConnectionState) error {
			if src.TrustDomain != want.TrustDomain {
				m.rejected.Add(1)
				return &PeerError{Role: "server", Want: "trust domain " + src.TrustDomain, Got: want.String(), Err: ErrTrustDomain}
			}
			_, err := m.verifyPeer(cs, "server", x509.ExtKeyUsageServerAuth, want, []string{want.TrustDomain})
			return err
		},
	}
}

// verifyPeer checks the peer's chain, identity and ALPN: the peer must be
// exactly want when it names a workload, and in one of trustDomains.
func (m *Manager) verifyPeer(cs tls.ConnectionState, role string, usage x509.ExtKeyUsage, want identity.ID, trustDomains []string) (identity.ID, error) {
	id, err := m.checkPeer(cs, usage, want, trustDomains)
	if err != nil {
		m.rejected.Add(1)
		err.Role = role
		return identity.ID{}, err
	}
	return id, nil
}

func (m *Manager) checkPeer(cs tls.ConnectionState, usage x509.ExtKeyUsage, want identity.ID, trustDomains []string) (identity.ID, *PeerError) {
	exact := want.Namespace != "" || want.ServiceAccount != ""
	wantText := "trust domain " + strings.Join(trustDomains, " or ")
	if exact {
		wantText = want.String()
	}
	if len(cs.PeerCertificates) == 0 {
		return identity.ID{}, &PeerError{Want: wantText, Err: ErrNoPeerCertificate}
	}
	leaf := cs.PeerCertificates[0]
	roots := m.Roots()
	if roots == nil {
		// A nil pool would make x509 fall back to the system roots.
		return identity.ID{}, &PeerError{Want: wantText, Err: fmt.Errorf("%w: no mesh roots configured", ErrUntrustedPeer)}
	}
	inter := x509.NewCertPool()
	for _, c := range cs.PeerCertificates[1:] {
		inter.AddCert(c)
	}
	if _, err := leaf.Verify(x509.VerifyOptions{
		Roots:         roots,
		Intermediates: inter,
		CurrentTime:   m.now(),
		KeyUsages:     []x509.ExtKeyUsage{usage},
	}); err != nil {
		return identity.ID{}, &PeerError{Want: wantText, Got: sanText(leaf), Err: fmt.Errorf("%w: %w", ErrUntrustedPeer, err)}
	}
	id, err := identity.FromCertificate(leaf)
	if err != nil {
		return identity.ID{}, &PeerError{Want: wantText, Got: sanText(leaf), Err: fmt.Errorf("%w: %w", ErrPeerIdentity, err)}
	}
	if !slices.Contains(trustDomains, id.TrustDomain) {
		return identity.ID{}, &PeerError{Want: wantText, Got: id.String(), Err: ErrTrustDomain}
	}
	if exact && id != want {
		return identity.ID{}, &PeerError{Want: wantText, Got: id.String(), Err: ErrPeerIdentity}
	}
	if cs.NegotiatedProtocol != alpnH2 {
		return identity.ID{}, &PeerError{Want: `ALPN "h2"`, Got: fmt.Sprintf("ALPN %q", cs.NegotiatedProtocol), Err: ErrALPN}
	}
	return id, nil
}

// sanText describes a certificate's URI SANs for an error message.
func sanText(c *x509.Certificate) string {
	if len(c.URIs) == 0 {
		return "a certificate without URI SAN"
	}
	s := ""
	for i, u := range c.URIs {
		if i > 0 {
			s += ", "
		}
		s += u.String()
	}
	return s
}

// PeerID returns the SPIFFE identity of the peer of a completed handshake.
// It does not verify anything itself: use it on connections whose
// configuration came from ServerConfig or ClientConfig, whose handshake has
// already verified the chain and the identity.
func PeerID(cs tls.ConnectionState) (identity.ID, error) {
	if !cs.HandshakeComplete {
		return identity.ID{}, fmt.Errorf("peer id: %w", ErrNotHandshaken)
	}
	if len(cs.PeerCertificates) == 0 {
		return identity.ID{}, fmt.Errorf("peer id: %w", ErrNoPeerCertificate)
	}
	id, err := identity.FromCertificate(cs.PeerCertificates[0])
	if err != nil {
		return identity.ID{}, fmt.Errorf("peer id: %w", err)
	}
	return id, nil
}
