package certs

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"errors"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/amber-mesh/amber/internal/testutil"
	"github.com/amber-mesh/amber/tunnel/ca"
	"github.com/amber-mesh/amber/tunnel/identity"
)

const td = "cluster.local"

var (
	sleep       = identity.ID{TrustDomain: td, Namespace: "default", ServiceAccount: "sleep"}
	productpage = identity.ID{TrustDomain: td, Namespace: "default", ServiceAccount: "productpage"}
	reviews     = identity.ID{TrustDomain: td, Namespace: "default", ServiceAccount: "reviews"}
)

var errInjected = errors.New("injected CA failure")

// mustLocal opens a local CA in dir (a fresh one when dir is "").
func mustLocal(tb testing.TB, dir, trustDomain string) *ca.Local {
	tb.Helper()
	if dir == "" {
		dir = filepath.Join(tb.TempDir(), "ca")
	}
	l, err := ca.OpenLocal(dir, trustDomain)
	if err != nil {
		tb.Fatal(err)
	}
	return l
}

func mustManager(tb testing.TB, m *Manager) *Manager {
	tb.Helper()
	tb.Cleanup(func() {
		if err := m.Close(); err != nil {
			tb.Error(err)
		}
	})
	return m
}

func testCtx(tb testing.TB) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	tb.Cleanup(cancel)
	return ctx
}

// flakyCA is the real local CA with a failure switch.
type flakyCA struct {
	ca.Client
	fail  atomic.Bool
	calls atomic.Int32
}

func (f *flakyCA) Sign(ctx context.Context, csr []byte, id identity.ID, ttl time.Duration) ([]*x509.Certificate, error) {
	f.calls.Add(1)
	if f.fail.Load() {
		return nil, errInjected
	}
	return f.Client.Sign(ctx, csr, id, ttl)
}

// gateCA is the real local CA that holds every request until released.
type gateCA struct {
	ca.Client
	calls   atomic.Int32
	entered chan struct{}
	release chan struct{}
}

func newGateCA(c ca.Client) *gateCA {
	return &gateCA{Client: c, entered: make(chan struct{}, 100), release: make(chan struct{})}
}

func (g *gateCA) Sign(ctx context.Context, csr []byte, id identity.ID, ttl time.Duration) ([]*x509.Certificate, error) {
	g.calls.Add(1)
	g.entered <- struct{}{}
	select {
	case <-g.release:
	case <-ctx.Done():
		return nil, ctx.Err()
	}
	return g.Client.Sign(ctx, csr, id, ttl)
}

func TestGetSharesOneRequest(t *testing.T) {
	local := mustLocal(t, "", td)
	g := newGateCA(local)
	m := mustManager(t, &Manager{CA: g})

	const n = 8
	type result struct {
		cert any
		err  error
	}
	results := make(chan result, n)
	for range n {
		go func() {
			c, err := m.Get(testCtx(t), sleep)
			results <- result{c, err}
		}()
	}
	<-g.entered
	select {
	case r := <-results:
		t.Fatalf("Get returned before the CA answered: %v", r)
	case <-time.After(50 * time.Millisecond):
	}
	close(g.release)
	var first any
	for range n {
		r := <-results
		if r.err != nil {
			t.Fatal(r.err)
		}
		if first == nil {
			first = r.cert
		} else if r.cert != first {
			t.Error("concurrent callers got different certificates")
		}
	}
	if c := g.calls.Load(); c != 1 {
		t.Errorf("CA called %d times, want 1", c)
	}

	cert, err := m.Get(testCtx(t), sleep)
	if err != nil {
		t.Fatal(err)
	}
	if got, _ := identity.FromCertificate(cert.Leaf); got != sleep {
		t.Errorf("leaf identity %v", got)
	}
	key, ok := cert.PrivateKey.(*ecdsa.PrivateKey)
	if !ok || key.Curve != elliptic.P256() {
		t.Errorf("private key %T, want ECDSA P-256", cert.PrivateKey)
	}
	if _, err := cert.Leaf.Verify(x509.VerifyOptions{Roots: m.Roots(), KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}); err != nil {
		t.Errorf("leaf does not verify: %v", err)
	}
	if got := m.Stats().Issued; got != 1 {
		t.Errorf("Stats().Issued = %d", got)
	}
}

// TestRotation walks one identity through a certificate's life on a fake
// clock: refresh at half life, CA outage with the old certificate kept,
// expiry, recovery.
func TestRotation(t *testing.T) {
	t0 := time.Now().Truncate(time.Second)
	clk := newFakeClock(t0)
	local := mustLocal(t, "", td)
	local.Now = clk.Now
	f := &flakyCA{Client: local}
	m := mustManager(t, &Manager{CA: f, TTL: time.Hour, Clock: clk})
	ctx := testCtx(t)
	settled := func() bool { return len(clk.pending()) == 1 }

	c1, err := m.Get(ctx, sleep)
	if err != nil {
		t.Fatal(err)
	}
	if got := c1.Leaf.NotAfter; !got.Equal(t0.Add(time.Hour)) {
		t.Fatalf("NotAfter %v, want now+TTL %v", got, t0.Add(time.Hour))
	}
	half := c1.Leaf.NotBefore.Add(c1.Leaf.NotAfter.Sub(c1.Leaf.NotBefore) / 2)
	testutil.Eventually(t, "refresh scheduled", settled)
	if p := clk.pending(); !p[0].Equal(half) {
		t.Fatalf("refresh scheduled at %v, want half life %v", p[0], half)
	}

	clk.Advance(half.Sub(t0) - time.Second)
	if c := f.calls.Load(); c != 1 {
		t.Fatalf("CA called %d times before half life", c)
	}
	if c, _ := m.Get(ctx, sleep); c != c1 {
		t.Fatal("certificate changed before half life")
	}
	clk.Advance(time.Second)
	testutil.Eventually(t, "refresh at half life", func() bool { return m.Stats().Issued == 2 && settled() })
	c2, err := m.Get(ctx, sleep)
	if err != nil {
		t.Fatal(err)
	}
	if c2 == c1 || c2.Leaf.SerialNumber.Cmp(c1.Leaf.SerialNumber) == 0 {
		t.Fatal("Get still returns the first certificate after refresh")
	}
	if c2.PrivateKey.(*ecdsa.PrivateKey).Equal(c1.PrivateKey) {
		t.Error("refresh reused the private key")
	}

	// The CA goes down: the refresh at c2's half life fails, and so do the
	// retries; c2 is served until it expires, never after.
	f.fail.Store(true)
	half2 := c2.Leaf.NotBefore.Add(c2.Leaf.NotAfter.Sub(c2.Leaf.NotBefore) / 2)
	clk.Advance(half2.Sub(clk.Now()))
	testutil.Eventually(t, "failed refresh", func() bool { return m.Stats().IssueFailures == 1 && settled() })
	for clk.Now().Before(c2.Leaf.NotAfter) {
		c, err := m.Get(ctx, sleep)
		if err != nil {
			t.Fatalf("at %v, before NotAfter %v: %v", clk.Now(), c2.Leaf.NotAfter, err)
		}
		if c != c2 {
			t.Fatalf("at %v: Get returned another certificate while the CA is down", clk.Now())
		}
		clk.Advance(min(time.Minute, c2.Leaf.NotAfter.Sub(clk.Now())))
		testutil.Eventually(t, "retry settled", settled)
	}
	if n := m.Stats().IssueFailures; n < 10 {
		t.Errorf("only %d retries in 30 minutes of outage", n)
	}
	_, err = m.Get(ctx, sleep)
	if !errors.Is(err, ErrNoCertificate) || !errors.Is(err, errInjected) {
		t.Fatalf("Get after expiry = %v, want ErrNoCertificate wrapping the CA error", err)
	}
	calls := f.calls.Load()
	if _, err := m.Get(ctx, sleep); err == nil || f.calls.Load() != calls {
		t.Fatalf("Get during backoff: err %v, CA calls %d -> %d; want error and no new call", err, calls, f.calls.Load())
	}

	// The CA recovers: the next retry (at most backoffMax away) succeeds.
	f.fail.Store(false)
	clk.Advance(backoffMax)
	testutil.Eventually(t, "recovery", func() bool { return m.Stats().Issued == 3 && settled() })
	c3, err := m.Get(ctx, sleep)
	if err != nil {
		t.Fatal(err)
	}
	if !clk.Now().Before(c3.Leaf.NotAfter) || c3 == c2 {
		t.Fatal("no fresh certificate after recovery")
	}
}

func TestShortLifetimeDoesNotSpin(t *testing.T) {
	t0 := time.Now().Truncate(time.Second)
	clk := newFakeClock(t0)
	local := mustLocal(t, "", td)
	local.Now = clk.Now
	// The local CA backdates by a minute, so a 30 s certificate is past its
	// half life when it arrives.
	m := mustManager(t, &Manager{CA: local, TTL: 30 * time.Second, Clock: clk})
	if _, err := m.Get(testCtx(t), sleep); err != nil {
		t.Fatal(err)
	}
	testutil.Eventually(t, "refresh scheduled", func() bool { return len(clk.pending()) == 1 })
	if got, want := clk.pending()[0], t0.Add(15*time.Second); !got.Equal(want) {
		t.Errorf("refresh at %v, want half the remaining life, %v", got, want)
	}
}

func TestFirstIssuanceFailure(t *testing.T) {
	clk := newFakeClock(time.Now())
	local := mustLocal(t, "", td)
	f := &flakyCA{Client: local}
	f.fail.Store(true)
	m := mustManager(t, &Manager{CA: f, Clock: clk})

	_, err := m.Get(testCtx(t), sleep)
	if !errors.Is(err, errInjected) {
		t.Fatalf("Get = %v, want the CA error", err)
	}
	if !strings.Contains(err.Error(), sleep.String()) {
		t.Errorf("error %q does not name the identity", err)
	}
	testutil.Eventually(t, "retry scheduled", func() bool { return len(clk.pending()) == 1 })
	if d := clk.pending()[0].Sub(clk.Now()); d < backoffInitial/2 || d > backoffInitial*3/2 {
		t.Errorf("first retry in %v, want about %v", d, backoffInitial)
	}
	f.fail.Store(false)
	clk.Advance(backoffInitial * 2)
	testutil.Eventually(t, "retry", func() bool { return m.Stats().Issued == 1 })
	if _, err := m.Get(testCtx(t), sleep); err != nil {
		t.Fatal(err)
	}
}

func TestPrefetchAndForget(t *testing.T) {
	local := mustLocal(t, "", td)
	f := &flakyCA{Client: local}
	m := mustManager(t, &Manager{CA: f})

	if err := m.Prefetch(sleep); err != nil {
		t.Fatal(err)
	}
	testutil.Eventually(t, "prefetch", func() bool { return m.Stats().Issued == 1 })
	c1, err := m.Get(testCtx(t), sleep)
	if err != nil {
		t.Fatal(err)
	}
	if n := f.calls.Load(); n != 1 {
		t.Fatalf("CA called %d times", n)
	}
	m.Forget(sleep)
	c2, err := m.Get(testCtx(t), sleep)
	if err != nil {
		t.Fatal(err)
	}
	if c2 == c1 || f.calls.Load() != 2 {
		t.Error("Get after Forget did not issue a new certificate")
	}
	if err := m.Prefetch(identity.ID{TrustDomain: td}); err == nil {
		t.Error("Prefetch accepted an invalid identity")
	}
}

func TestForgetWhileIssuing(t *testing.T) {
	g := newGateCA(mustLocal(t, "", td))
	m := mustManager(t, &Manager{CA: g})
	errc := make(chan error, 1)
	go func() {
		_, err := m.Get(testCtx(t), sleep)
		errc <- err
	}()
	<-g.entered
	m.Forget(sleep)
	if err := <-errc; !errors.Is(err, ErrForgotten) {
		t.Fatalf("Get = %v, want ErrForgotten", err)
	}
}

func TestClose(t *testing.T) {
	g := newGateCA(mustLocal(t, "", td))
	m := &Manager{CA: g}
	errc := make(chan error, 1)
	go func() {
		_, err := m.Get(context.Background(), sleep)
		errc <- err
	}()
	<-g.entered
	if err := m.Close(); err != nil {
		t.Fatal(err)
	}
	if err := <-errc; !errors.Is(err, ErrClosed) {
		t.Fatalf("pending Get = %v, want ErrClosed", err)
	}
	if _, err := m.Get(testCtx(t), sleep); !errors.Is(err, ErrClosed) {
		t.Errorf("Get after Close = %v", err)
	}
	if err := m.Prefetch(sleep); !errors.Is(err, ErrClosed) {
		t.Errorf("Prefetch after Close = %v", err)
	}
	if err := m.Close(); err != nil {
		t.Errorf("second Close = %v", err)
	}
}

func TestGetContextCanceled(t *testing.T) {
	g := newGateCA(mustLocal(t, "", td))
	m := mustManager(t, &Manager{CA: g})
	ctx, cancel := context.WithCancel(context.Background())
	errc := make(chan error, 1)
	go func() {
		_, err := m.Get(ctx, sleep)
		errc <- err
	}()
	<-g.entered
	cancel()
	if err := <-errc; !errors.Is(err, context.Canceled) {
		t.Fatalf("Get = %v, want context.Canceled", err)
	}
}

func TestZeroManager(t *testing.T) {
	var m Manager
	if _, err := m.Get(testCtx(t), sleep); !errors.Is(err, ErrNoCA) {
		t.Errorf("Get = %v, want ErrNoCA", err)
	}
	if err := m.Close(); err != nil {
		t.Error(err)
	}
}

// liarCA answers every request with a certificate for its own identity and
// a key of its own, whatever was asked.
type liarCA struct {
	*ca.Local
	id identity.ID
}

func (l *liarCA) Sign(ctx context.Context, _ []byte, _ identity.ID, ttl time.Duration) ([]*x509.Certificate, error) {
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	csr, err := ca.CreateCSR(k, l.id)
	if err != nil {
		return nil, err
	}
	return l.Local.Sign(ctx, csr, l.id, ttl)
}

func TestRejectsWrongIssue(t *testing.T) {
	local := mustLocal(t, "", td)
	for _, tc := range []struct {
		name string
		ca   *liarCA
		msg  string
	}{
		{"other identity", &liarCA{Local: local, id: productpage}, productpage.String()},
		{"other key", &liarCA{Local: local, id: sleep}, "another key"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			m := mustManager(t, &Manager{CA: tc.ca})
			_, err := m.Get(testCtx(t), sleep)
			if !errors.Is(err, ErrBadIssue) {
				t.Fatalf("Get = %v, want ErrBadIssue", err)
			}
			if !strings.Contains(err.Error(), tc.msg) {
				t.Errorf("error %q does not mention %q", err, tc.msg)
			}
			if m.Stats().IssueFailures != 1 {
				t.Errorf("IssueFailures = %d", m.Stats().IssueFailures)
			}
		})
	}
}

func TestBackoff(t *testing.T) {
	prev := time.Duration(0)
	for n := 1; n <= 20; n++ {
		base := min(backoffInitial<<(n-1), backoffMax)
		if n > 12 {
			base = backoffMax
		}
		lo, hi := base/2, min(base*3/2, backoffMax)
		for range 50 {
			if d := backoff(n); d < lo || d > hi {
				t.Fatalf("backoff(%d) = %v, want in [%v, %v]", n, d, lo, hi)
			}
		}
		if hi < prev {
			t.Fatalf("backoff bound shrinks at %d", n)
		}
		prev = hi
	}
}
