package ca

import (
	"context"
	"crypto"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	pb "istio.io/api/security/v1alpha1"

	"github.com/amber-mesh/amber/tunnel/identity"
)

const istiodName = "istiod.istio-system.svc"

var ztunnelID = identity.ID{TrustDomain: "cluster.local", Namespace: "istio-system", ServiceAccount: "ztunnel"}

// seen is one request as istiod received it.
type seen struct {
	md  metadata.MD
	req *pb.IstioCertificateRequest
}

// fakeIstiod implements IstioCertificateService. By default it behaves like
// istiod: the SAN is the caller's identity unless ImpersonatedIdentity is
// set, and the reply is leaf then root.
type fakeIstiod struct {
	pb.UnimplementedIstioCertificateServiceServer
	ca     *Local
	caller identity.ID

	mu      sync.Mutex
	seen    []seen
	respond func(csr *x509.CertificateRequest, id identity.ID) (*pb.IstioCertificateResponse, error)
}

func (f *fakeIstiod) CreateCertificate(ctx context.Context, req *pb.IstioCertificateRequest) (*pb.IstioCertificateResponse, error) {
	md, _ := metadata.FromIncomingContext(ctx)
	f.mu.Lock()
	f.seen = append(f.seen, seen{md: md, req: req})
	respond := f.respond
	id := f.caller
	f.mu.Unlock()

	if s := req.GetMetadata().GetFields()[metaImpersonatedIdentity].GetStringValue(); s != "" {
		var err error
		if id, err = identity.Parse(s); err != nil {
			return nil, status.Error(codes.InvalidArgument, err.Error())
		}
	}
	block, _ := pem.Decode([]byte(req.Csr))
	if block == nil {
		return nil, status.Error(codes.InvalidArgument, "no csr")
	}
	csr, err := x509.ParseCertificateRequest(block.Bytes)
	if err != nil {
		return nil, status.Error(codes.InvalidArgument, err.Error())
	}
	if respond != nil {
		return respond(csr, id)
	}
	return f.sign(f.ca, csr.PublicKey, id, time.Duration(req.ValidityDuration)*time.Second), nil
}

func (f *fakeIstiod) sign(ca *Local, pub crypto.PublicKey, id identity.ID, ttl time.Duration) *pb.IstioCertificateResponse {
	leaf, err := ca.issue(pub, id, ttl)
	if err != nil {
		panic(err)
	}
	// istiod appends "\n" to each element (security/pkg/server/ca/server.go).
	return &pb.IstioCertificateResponse{CertChain: []string{
		string(EncodeChain([]*x509.Certificate{leaf})) + "\n",
		string(ca.RootPEM()) + "\n",
	}}
}

func (f *fakeIstiod) requests() []seen {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]seen(nil), f.seen...)
}

// mustServingCert issues istiod's TLS serving certificate from the local
// CA's root, as istiod's own certificate is issued from the mesh root.
func mustServingCert(tb testing.TB, l *Local) tls.Certificate {
	tb.Helper()
	key := mustKey(tb)
	serial, err := randomSerial()
	if err != nil {
		tb.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: serial,
		DNSNames:     []string{istiodName},
		IPAddresses:  []net.IP{net.IPv4(127, 0, 0, 1)},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, l.root, &key.PublicKey, l.key)
	if err != nil {
		tb.Fatal(err)
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}
}

// startIstiod serves fakeIstiod over TLS on a loopback port.
func startIstiod(tb testing.TB) (*fakeIstiod, string) {
	tb.Helper()
	l := mustLocal(tb, "cluster.local")
	f := &fakeIstiod{ca: l, caller: ztunnelID}
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		tb.Fatal(err)
	}
	srv := grpc.NewServer(grpc.Creds(credentials.NewTLS(&tls.Config{
		Certificates: []tls.Certificate{mustServingCert(tb, l)},
		MinVersion:   tls.VersionTLS12,
	})))
	pb.RegisterIstioCertificateServiceServer(srv, f)
	done := make(chan struct{})
	go func() {
		defer close(done)
		_ = srv.Serve(lis)
	}()
	tb.Cleanup(func() {
		srv.Stop()
		<-done
	})
	return f, lis.Addr().String()
}

type istioOpt func(*IstioConfig)

func mustIstio(tb testing.TB, f *fakeIstiod, addr string, opts ...istioOpt) *Istio {
	tb.Helper()
	cfg := IstioConfig{Address: addr, ServerName: istiodName, RootPEM: f.ca.RootPEM()}
	for _, o := range opts {
		o(&cfg)
	}
	c, err := NewIstio(cfg)
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { c.Close() })
	return c
}

func writeToken(tb testing.TB, path, tok string) {
	tb.Helper()
	if err := os.WriteFile(path, []byte(tok), 0o600); err != nil {
		tb.Fatal(err)
	}
}

func ctxTimeout(tb testing.TB) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	tb.Cleanup(cancel)
	return ctx
}

func TestIstioRequestShape(t *testing.T) {
	f, addr := startIstiod(t)
	tokenFile := filepath.Join(t.TempDir(), "istio-token")
	writeToken(t, tokenFile, "tok-1\n")
	c := mustIstio(t, f, addr, func(cfg *IstioConfig) {
		cfg.TokenFile = tokenFile
		cfg.ClusterID = "Kubernetes"
		cfg.ServerName = "" // derived from the address: 127.0.0.1 is in istiod's certificate
	})

	key := mustKey(t)
	csr := mustCSR(t, key, sleepID)
	chain, err := c.Sign(ctxTimeout(t), csr, sleepID, 90*time.Minute+time.Millisecond)
	if err != nil {
		t.Fatal(err)
	}
	if len(chain) != 1 {
		t.Fatalf("chain has %d certificates, want the leaf only (root dropped)", len(chain))
	}
	if got, _ := identity.FromCertificate(chain[0]); got != sleepID {
		t.Errorf("leaf identity %v", got)
	}
	if !publicKeyEqual(&key.PublicKey, chain[0].PublicKey) {
		t.Error("leaf key is not ours")
	}

	reqs := f.requests()
	if len(reqs) != 1 {
		t.Fatalf("istiod saw %d requests", len(reqs))
	}
	r := reqs[0]
	if got := r.md.Get("authorization"); len(got) != 1 || got[0] != "Bearer tok-1" {
		t.Errorf("authorization header %q, want [\"Bearer tok-1\"]", got)
	}
	if got := r.md.Get("clusterid"); len(got) != 1 || got[0] != "Kubernetes" {
		t.Errorf("clusterid header %q", got)
	}
	if r.req.Csr != string(csr) {
		t.Errorf("csr field %q, want the PEM we passed", r.req.Csr)
	}
	if r.req.ValidityDuration != 5401 {
		t.Errorf("validity_duration %d, want 5401 (seconds, rounded up)", r.req.ValidityDuration)
	}
	fields := r.req.GetMetadata().GetFields()
	if len(fields) != 1 || fields["ImpersonatedIdentity"].GetStringValue() != sleepID.String() {
		t.Errorf("metadata %v, want only ImpersonatedIdentity=%s", r.req.GetMetadata(), sleepID)
	}

	// The token is re-read on every call: projected tokens rotate in place.
	writeToken(t, tokenFile, "tok-2")
	if _, err := c.Sign(ctxTimeout(t), mustCSR(t, mustKey(t), sleepID), sleepID, time.Hour); err != nil {
		t.Fatal(err)
	}
	reqs = f.requests()
	if got := reqs[len(reqs)-1].md.Get("authorization"); len(got) != 1 || got[0] != "Bearer tok-2" {
		t.Errorf("after rotation authorization header %q, want Bearer tok-2", got)
	}
}

func TestIstioSelfIsNotImpersonated(t *testing.T) {
	f, addr := startIstiod(t)
	c := mustIstio(t, f, addr, func(cfg *IstioConfig) { cfg.Self = ztunnelID })

	if _, err := c.Sign(ctxTimeout(t), mustCSR(t, mustKey(t), ztunnelID), ztunnelID, time.Hour); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Sign(ctxTimeout(t), mustCSR(t, mustKey(t), sleepID), sleepID, time.Hour); err != nil {
		t.Fatal(err)
	}
	reqs := f.requests()
	if len(reqs) != 2 {
		t.Fatalf("istiod saw %d requests", len(reqs))
	}
	if reqs[0].req.Metadata != nil {
		t.Errorf("request for self carried metadata %v", reqs[0].req.Metadata)
	}
	if got := reqs[1].req.GetMetadata().GetFields()["ImpersonatedIdentity"].GetStringValue(); got != sleepID.String() {
		t.Errorf("request for another workload: ImpersonatedIdentity %q", got)
	}
	if got := reqs[0].md.Get("authorization"); len(got) != 0 {
		t.Errorf("authorization sent without a token file: %q", got)
	}
}

// TestIstioSelfOnly: a waypoint asks for its own identity with its own
// token, never impersonating; istiod takes the identity from the token.
// Asking for another identity fails before anything is sent.
func TestIstioSelfOnly(t *testing.T) {
	f, addr := startIstiod(t)
	waypointID := identity.ID{TrustDomain: "cluster.local", Namespace: "default", ServiceAccount: "waypoint"}
	f.caller = waypointID
	tokenFile := filepath.Join(t.TempDir(), "istio-token")
	writeToken(t, tokenFile, "waypoint-token")
	c := mustIstio(t, f, addr, func(cfg *IstioConfig) {
		cfg.Self, cfg.SelfOnly, cfg.TokenFile = waypointID, true, tokenFile
	})
	chain, err := c.Sign(ctxTimeout(t), mustCSR(t, mustKey(t), waypointID), waypointID, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	if got, _ := identity.FromCertificate(chain[0]); got != waypointID {
		t.Errorf("leaf identity %v", got)
	}
	if _, err := c.Sign(ctxTimeout(t), mustCSR(t, mustKey(t), sleepID), sleepID, time.Hour); !errors.Is(err, ErrIdentityMismatch) {
		t.Errorf("Sign for another identity = %v, want ErrIdentityMismatch", err)
	}
	reqs := f.requests()
	if len(reqs) != 1 {
		t.Fatalf("istiod saw %d requests, want 1", len(reqs))
	}
	if reqs[0].req.Metadata != nil {
		t.Errorf("request carried metadata %v", reqs[0].req.Metadata)
	}
	if got := reqs[0].md.Get("authorization"); len(got) != 1 || got[0] != "Bearer waypoint-token" {
		t.Errorf("authorization %q", got)
	}
	if got := reqs[0].md.Get("clusterid"); len(got) != 1 || got[0] != DefaultClusterID {
		t.Errorf("clusterid %q", got)
	}

	// An istiod that answers with another identity (the token's account
	// is not the one asked for) is refused.
	f.mu.Lock()
	f.caller = sleepID
	f.mu.Unlock()
	if _, err := c.Sign(ctxTimeout(t), mustCSR(t, mustKey(t), waypointID), waypointID, time.Hour); !errors.Is(err, ErrIdentityMismatch) {
		t.Errorf("Sign answered for another account = %v, want ErrIdentityMismatch", err)
	}
}

func TestIstioRejectsBadReplies(t *testing.T) {
	f, addr := startIstiod(t)
	c := mustIstio(t, f, addr)
	other := mustLocal(t, "cluster.local")

	for _, tc := range []struct {
		name    string
		respond func(csr *x509.CertificateRequest, id identity.ID) (*pb.IstioCertificateResponse, error)
		want    error
		code    codes.Code
		msg     []string
	}{
		{
			name: "wrong identity",
			respond: func(csr *x509.CertificateRequest, _ identity.ID) (*pb.IstioCertificateResponse, error) {
				return f.sign(f.ca, csr.PublicKey, otherID, time.Hour), nil
			},
			want: ErrIdentityMismatch,
			msg:  []string{sleepID.String(), otherID.String()},
		},
		{
			name: "garbage pem",
			respond: func(*x509.CertificateRequest, identity.ID) (*pb.IstioCertificateResponse, error) {
				return &pb.IstioCertificateResponse{CertChain: []string{"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"}}, nil
			},
			want: ErrBadResponse,
		},
		{
			name: "text around pem",
			respond: func(csr *x509.CertificateRequest, id identity.ID) (*pb.IstioCertificateResponse, error) {
				r := f.sign(f.ca, csr.PublicKey, id, time.Hour)
				r.CertChain[0] = "junk\n" + r.CertChain[0]
				return r, nil
			},
			want: ErrBadResponse,
		},
		{
			name: "empty chain",
			respond: func(*x509.CertificateRequest, identity.ID) (*pb.IstioCertificateResponse, error) {
				return &pb.IstioCertificateResponse{}, nil
			},
			want: ErrBadResponse,
		},
		{
			name: "another key",
			respond: func(_ *x509.CertificateRequest, id identity.ID) (*pb.IstioCertificateResponse, error) {
				return f.sign(f.ca, &mustKey(t).PublicKey, id, time.Hour), nil
			},
			want: ErrBadResponse,
		},
		{
			name: "untrusted issuer",
			respond: func(csr *x509.CertificateRequest, id identity.ID) (*pb.IstioCertificateResponse, error) {
				return f.sign(other, csr.PublicKey, id, time.Hour), nil
			},
			want: ErrUntrusted,
		},
		{
			name: "server error",
			respond: func(*x509.CertificateRequest, identity.ID) (*pb.IstioCertificateResponse, error) {
				return nil, status.Error(codes.Unauthenticated, "request authenticate failure")
			},
			code: codes.Unauthenticated,
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f.mu.Lock()
			f.respond = tc.respond
			f.mu.Unlock()
			chain, err := c.Sign(ctxTimeout(t), mustCSR(t, mustKey(t), sleepID), sleepID, time.Hour)
			if err == nil {
				t.Fatalf("Sign accepted the reply: %d certs", len(chain))
			}
			if chain != nil {
				t.Error("chain returned with an error")
			}
			if tc.want != nil && !errors.Is(err, tc.want) {
				t.Errorf("Sign error %v, want %v", err, tc.want)
			}
			if tc.code != codes.OK && status.Code(err) != tc.code {
				t.Errorf("Sign error %v, want gRPC code %v", err, tc.code)
			}
			for _, m := range tc.msg {
				if !strings.Contains(err.Error(), m) {
					t.Errorf("error %q does not mention %s", err, m)
				}
			}
		})
	}
}

func TestIstioConcatenatedChain(t *testing.T) {
	f, addr := startIstiod(t)
	c := mustIstio(t, f, addr)
	f.respond = func(csr *x509.CertificateRequest, id identity.ID) (*pb.IstioCertificateResponse, error) {
		r := f.sign(f.ca, csr.PublicKey, id, time.Hour)
		return &pb.IstioCertificateResponse{CertChain: []string{r.CertChain[0] + r.CertChain[1]}}, nil
	}
	chain, err := c.Sign(ctxTimeout(t), mustCSR(t, mustKey(t), sleepID), sleepID, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	if len(chain) != 1 {
		t.Errorf("chain has %d certificates, want 1", len(chain))
	}
}

func TestIstioFailsBeforeSending(t *testing.T) {
	f, addr := startIstiod(t)
	dir := t.TempDir()
	empty := filepath.Join(dir, "empty")
	writeToken(t, empty, "\n")
	spaced := filepath.Join(dir, "spaced")
	writeToken(t, spaced, "a b")

	for _, tc := range []struct {
		name string
		opt  istioOpt
		id   identity.ID
		csr  identity.ID
		want error
	}{
		{"missing token", func(c *IstioConfig) { c.TokenFile = filepath.Join(dir, "nope") }, sleepID, sleepID, ErrToken},
		{"empty token", func(c *IstioConfig) { c.TokenFile = empty }, sleepID, sleepID, ErrToken},
		{"token with space", func(c *IstioConfig) { c.TokenFile = spaced }, sleepID, sleepID, ErrToken},
		{"csr for another identity", func(*IstioConfig) {}, sleepID, otherID, ErrIdentityMismatch},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := mustIstio(t, f, addr, tc.opt)
			if _, err := c.Sign(ctxTimeout(t), mustCSR(t, mustKey(t), tc.csr), tc.id, time.Hour); !errors.Is(err, tc.want) {
				t.Fatalf("Sign = %v, want %v", err, tc.want)
			}
		})
	}
	if n := len(f.requests()); n != 0 {
		t.Errorf("istiod saw %d requests", n)
	}
}

func TestIstioVerifiesServer(t *testing.T) {
	f, addr := startIstiod(t)
	other := mustLocal(t, "cluster.local")
	c := mustIstio(t, f, addr, func(cfg *IstioConfig) { cfg.RootPEM = other.RootPEM() })
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	if _, err := c.Sign(ctx, mustCSR(t, mustKey(t), sleepID), sleepID, time.Hour); err == nil {
		t.Fatal("Sign succeeded against an istiod with an untrusted certificate")
	}
	if n := len(f.requests()); n != 0 {
		t.Errorf("istiod saw %d requests", n)
	}
}

func TestNewIstioValidates(t *testing.T) {
	l := mustLocal(t, "td")
	for name, cfg := range map[string]IstioConfig{
		"no address":   {RootPEM: l.RootPEM()},
		"no roots":     {Address: "istiod:15012"},
		"bad roots":    {Address: "istiod:15012", RootPEM: []byte("junk")},
		"no port":      {Address: "istiod", RootPEM: l.RootPEM()},
		"invalid self": {Address: "istiod:15012", RootPEM: l.RootPEM(), Self: identity.ID{TrustDomain: "td"}},
		"self only":    {Address: "istiod:15012", RootPEM: l.RootPEM(), SelfOnly: true},
	} {
		if c, err := NewIstio(cfg); err == nil {
			c.Close()
			t.Errorf("%s: NewIstio accepted %+v", name, cfg)
		}
	}
}
