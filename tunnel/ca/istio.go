package ca

import (
	"bytes"
	"cmp"
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"os"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/backoff"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	"google.golang.org/protobuf/types/known/structpb"
	pb "istio.io/api/security/v1alpha1"

	"github.com/amber-mesh/amber/tunnel/identity"
)

// Names istiod reads (istio/istio security/pkg/server/ca: server.go reads
// the request metadata field, kubeauth/kube_jwt.go the gRPC header).
const (
	metaImpersonatedIdentity = "ImpersonatedIdentity"
	headerClusterID          = "clusterid"
	// DefaultClusterID is Istio's default CLUSTER_ID.
	DefaultClusterID    = "Kubernetes"
	headerAuthorization = "authorization"
)

// IstioConfig configures an Istio CA client.
type IstioConfig struct {
	// Address is istiod's CA endpoint as a gRPC target, normally
	// "istiod.istio-system.svc:15012". Required.
	Address string
	// ServerName is the name istiod's serving certificate is verified
	// against. Zero means the host part of Address.
	ServerName string
	// RootPEM holds the mesh root certificates (Istio's istio-ca-root-cert
	// ConfigMap, root-cert.pem). istiod's serving certificate is verified
	// against them, every issued leaf must chain to them, and Roots returns
	// them. Required.
	RootPEM []byte
	// TokenFile holds the bearer token (a Kubernetes service-account token
	// with audience "istio-ca"). It is read on every call because projected
	// tokens are rotated in place. Zero means no authorization header is
	// sent, which istiod refuses unless another authenticator applies.
	TokenFile string
	// ClusterID is sent as the "clusterid" header. istiod finds the node
	// authorizer for an impersonating request only through it (it refuses
	// with "no node authorizer for cluster \"\"" otherwise), so it is
	// always sent. Zero means DefaultClusterID.
	ClusterID string
	// Self is the caller's own identity. Requests for any other identity
	// carry the ImpersonatedIdentity metadata, which istiod honours only for
	// callers in CA_TRUSTED_NODE_ACCOUNTS. Zero means every request
	// carries it, as Istio's ztunnel in shared (node proxy) mode does.
	Self identity.ID
	// SelfOnly makes the client sign Self's certificates only, as a
	// workload's own proxy (pilot-agent for a sidecar or a waypoint) does:
	// it never sends ImpersonatedIdentity, istiod takes the identity from
	// the token, and a request for any other identity fails here with
	// ErrIdentityMismatch. It requires Self.
	SelfOnly bool
}

// Istio is a Client of istiod's istio.v1.auth.IstioCertificateService.
type Istio struct {
	cfg   IstioConfig
	roots *x509.CertPool
	creds *TokenCredentials
	conn  *grpc.ClientConn
	svc   pb.IstioCertificateServiceClient
}

var _ Client = (*Istio)(nil)

// NewIstio validates cfg and prepares a connection to istiod. It does not
// dial: the connection is made by the first Sign.
func NewIstio(cfg IstioConfig) (*Istio, error) {
	if cfg.Address == "" {
		return nil, errors.New("istio ca: no address")
	}
	roots, err := ParseRoots(cfg.RootPEM)
	if err != nil {
		return nil, fmt.Errorf("istio ca: %w", err)
	}
	switch {
	case !cfg.Self.IsZero():
		if err := cfg.Self.Validate(); err != nil {
			return nil, fmt.Errorf("istio ca: self identity: %w", err)
		}
	case cfg.SelfOnly:
		return nil, errors.New("istio ca: SelfOnly without Self")
	}
	// The token goes into each request's metadata by hand rather than as
	// the channel's per-call credentials, so that a bad token fails Sign
	// with ErrToken before anything is sent.
	conn, err := DialIstiod(cfg.Address, cfg.ServerName, roots, nil)
	if err != nil {
		return nil, fmt.Errorf("istio ca: %w", err)
	}
	creds := &TokenCredentials{File: cfg.TokenFile, ClusterID: cfg.ClusterID}
	return &Istio{cfg: cfg, roots: roots, creds: creds, conn: conn, svc: pb.NewIstioCertificateServiceClient(conn)}, nil
}

// Roots returns the pool built from IstioConfig.RootPEM.
func (c *Istio) Roots() *x509.CertPool { return c.roots }

// Close closes the connection to istiod; pending calls fail.
func (c *Istio) Close() error {
	if err := c.conn.Close(); err != nil {
		return fmt.Errorf("istio ca: close: %w", err)
	}
	return nil
}

// Sign sends the CSR to istiod the way Istio's ztunnel does
// (src/identity/caclient.rs): the PEM CSR, the validity in seconds,
// ImpersonatedIdentity metadata, a bearer token and an optional clusterid
// header. istiod chooses the SAN from the caller's credentials, so the reply
// is checked: its leaf must carry exactly id, hold the CSR's key and chain
// to the mesh roots.
func (c *Istio) Sign(ctx context.Context, csrPEM []byte, id identity.ID, ttl time.Duration) ([]*x509.Certificate, error) {
	chain, err := c.sign(ctx, csrPEM, id, ttl)
	if err != nil {
		return nil, fmt.Errorf("istio ca: sign %s: %w", id, err)
	}
	return chain, nil
}

func (c *Istio) sign(ctx context.Context, csrPEM []byte, id identity.ID, ttl time.Duration) ([]*x509.Certificate, error) {
	if c.cfg.SelfOnly && id != c.cfg.Self {
		return nil, fmt.Errorf("%w: this client signs only its own identity %s", ErrIdentityMismatch, c.cfg.Self)
	}
	csr, err := checkCSR(csrPEM, id)
	if err != nil {
		return nil, err
	}
	md, err := c.creds.GetRequestMetadata(ctx)
	if err != nil {
		return nil, err
	}
	for k, v := range md {
		ctx = metadata.AppendToOutgoingContext(ctx, k, v)
	}
	req := &pb.IstioCertificateRequest{Csr: string(csrPEM)}
	if ttl > 0 {
		// Whole seconds, rounded up; zero lets istiod choose its default.
		req.ValidityDuration = int64((ttl + time.Second - 1) / time.Second)
	}
	if c.cfg.Self.IsZero() || c.cfg.Self != id {
		req.Metadata = &structpb.Struct{Fields: map[string]*structpb.Value{
			metaImpersonatedIdentity: structpb.NewStringValue(id.String()),
		}}
	}
	resp, err := c.svc.CreateCertificate(ctx, req)
	if err != nil {
		return nil, err
	}
	return checkChain(resp.GetCertChain(), csr, id, c.roots)
}

// readToken reads a bearer token. gRPC metadata values must be printable
// ASCII, and a token with anything else in it is corrupt, not something to
// send.
func readToken(path string) (string, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return "", fmt.Errorf("%w: %v", ErrToken, err)
	}
	b = bytes.TrimSpace(b)
	if len(b) == 0 {
		return "", fmt.Errorf("%w: %s is empty", ErrToken, path)
	}
	for _, c := range b {
		if c <= ' ' || c > '~' {
			return "", fmt.Errorf("%w: %s holds a non-printable or space character", ErrToken, path)
		}
	}
	return string(b), nil
}

// checkChain parses istiod's reply. Its cert_chain is leaf first, root last
// (security/v1alpha1 ca.proto); older istiods put several PEM certificates
// in one element, so every element is split. Trailing self-signed
// certificates are trust anchors and are dropped from the returned chain:
// the mesh's anchors are the configured roots, never ones the reply brings.
func checkChain(pems []string, csr *x509.CertificateRequest, id identity.ID, roots *x509.CertPool) ([]*x509.Certificate, error) {
	var certs []*x509.Certificate
	for i, p := range pems {
		cs, err := parseCertsPEM([]byte(p))
		if err != nil {
			return nil, fmt.Errorf("%w: cert_chain[%d]: %v", ErrBadResponse, i, err)
		}
		certs = append(certs, cs...)
	}
	if len(certs) == 0 {
		return nil, fmt.Errorf("%w: empty cert_chain", ErrBadResponse)
	}
	leaf := certs[0]
	got, err := identity.FromCertificate(leaf)
	if err != nil {
		return nil, fmt.Errorf("%w: want leaf for %s: %v", ErrIdentityMismatch, id, err)
	}
	if got != id {
		return nil, fmt.Errorf("%w: asked for %s, CA issued %s", ErrIdentityMismatch, id, got)
	}
	if !publicKeyEqual(csr.PublicKey, leaf.PublicKey) {
		return nil, fmt.Errorf("%w: leaf key is not the CSR's key", ErrBadResponse)
	}
	if leaf.IsCA {
		return nil, fmt.Errorf("%w: leaf is a CA certificate", ErrBadResponse)
	}
	chain := certs
	for len(chain) > 1 && isSelfSigned(chain[len(chain)-1]) {
		chain = chain[:len(chain)-1]
	}
	if err := verifyLeaf(chain, roots); err != nil {
		return nil, err
	}
	return chain, nil
}

func isSelfSigned(c *x509.Certificate) bool {
	return bytes.Equal(c.RawIssuer, c.RawSubject) && c.CheckSignatureFrom(c) == nil
}

// verifyLeaf checks that chain[0] chains to roots and may be used as both
// HBONE server and client. Validity is checked at a time inside the leaf's
// own window so that clock skew with the CA is not reported as distrust;
// expiry is the certificate manager's business.
func verifyLeaf(chain []*x509.Certificate, roots *x509.CertPool) error {
	leaf := chain[0]
	inter := x509.NewCertPool()
	for _, c := range chain[1:] {
		inter.AddCert(c)
	}
	at := time.Now()
	if at.Before(leaf.NotBefore) {
		at = leaf.NotBefore
	}
	if at.After(leaf.NotAfter) {
		at = leaf.NotAfter
	}
	for _, usage := range []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth} {
		_, err := leaf.Verify(x509.VerifyOptions{
			Roots:         roots,
			Intermediates: inter,
			CurrentTime:   at,
			KeyUsages:     []x509.ExtKeyUsage{usage},
		})
		if err != nil {
			return fmt.Errorf("%w: %v", ErrUntrusted, err)
		}
	}
	return nil
}

// Reconnect is the channel backoff for istiod's gRPC connections (xDS and
// CA): reconnect within 15 s of istiod coming back, not gRPC's default
// 120 s ceiling.
var Reconnect = grpc.WithConnectParams(grpc.ConnectParams{Backoff: backoff.Config{
	BaseDelay: time.Second, Multiplier: 1.6, Jitter: 0.2, MaxDelay: 15 * time.Second,
}})

// ParseRoots parses the mesh root certificates (root-cert.pem): PEM
// certificates and nothing else, at least one.
func ParseRoots(rootPEM []byte) (*x509.CertPool, error) {
	certs, err := parseCertsPEM(rootPEM)
	if err != nil {
		return nil, fmt.Errorf("root pem: %w", err)
	}
	if len(certs) == 0 {
		return nil, errors.New("root pem: no certificates")
	}
	roots := x509.NewCertPool()
	for _, c := range certs {
		roots.AddCert(c)
	}
	return roots, nil
}

// DialIstiod returns a channel to istiod's TLS gRPC port (15012: xDS and
// the CA), which it does not dial yet: istiod's certificate is verified
// against roots for serverName (zero: the host of address; istiod's own
// is issued for istiod.istio-system.svc), creds, if not nil, are sent on
// every call, and the channel reconnects within 15 s (Reconnect).
func DialIstiod(address, serverName string, roots *x509.CertPool, creds *TokenCredentials) (*grpc.ClientConn, error) {
	if serverName == "" {
		host, _, err := net.SplitHostPort(address)
		if err != nil {
			return nil, fmt.Errorf("server name from address %q: %w", address, err)
		}
		serverName = host
	}
	opts := []grpc.DialOption{
		grpc.WithTransportCredentials(credentials.NewTLS(&tls.Config{RootCAs: roots, ServerName: serverName, MinVersion: tls.VersionTLS12})),
		Reconnect,
	}
	if creds != nil {
		opts = append(opts, grpc.WithPerRPCCredentials(creds))
	}
	return grpc.NewClient(address, opts...)
}

// TokenCredentials are what istiod authenticates a proxy by, on xDS and
// CA calls alike: the bearer token in File, read on every call because
// projected tokens rotate in place, and the "clusterid" header (istiod
// finds a request's token reviewer and node authorizer by it). They are
// gRPC per-call credentials and need TLS.
type TokenCredentials struct {
	// File holds the token (a service-account token with audience
	// "istio-ca"). Zero sends no authorization header, which istiod
	// refuses unless another authenticator applies.
	File string
	// ClusterID is the clusterid header. Zero means DefaultClusterID.
	ClusterID string
}

// GetRequestMetadata reads the token; an unreadable or corrupt one is an
// ErrToken.
func (t *TokenCredentials) GetRequestMetadata(context.Context, ...string) (map[string]string, error) {
	md := map[string]string{headerClusterID: cmp.Or(t.ClusterID, DefaultClusterID)}
	if t.File != "" {
		tok, err := readToken(t.File)
		if err != nil {
			return nil, err
		}
		md[headerAuthorization] = "Bearer " + tok
	}
	return md, nil
}

// RequireTransportSecurity is true: a token must not travel in clear.
func (*TokenCredentials) RequireTransportSecurity() bool { return true }
