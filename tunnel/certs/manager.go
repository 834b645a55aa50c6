// Package certs keeps one workload certificate per local service account
// fresh and builds the HBONE mutual-TLS configurations that present them.
package certs

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	mrand "math/rand/v2"
	"sync"
	"sync/atomic"
	"time"

	"github.com/amber-mesh/amber/internal/logkey"
	"github.com/amber-mesh/amber/tunnel/ca"
	"github.com/amber-mesh/amber/tunnel/identity"
)

// DefaultTTL is the certificate lifetime asked for when Manager.TTL is zero;
// it is Istio's default workload certificate TTL.
const DefaultTTL = 24 * time.Hour

// Retry schedule after a failed issuance. The cap is Istio ztunnel's
// (CERT_REFRESH_FAILURE_RETRY_DELAY_MAX_INTERVAL, src/identity/manager.rs).
const (
	backoffInitial = 500 * time.Millisecond
	backoffMax     = 150 * time.Second
	// signTimeout bounds one CA round trip so that a hung CA turns into a
	// retry rather than a stuck identity.
	signTimeout = 30 * time.Second
)

// Errors returned (wrapped) by the Manager and its TLS configurations.
var (
	ErrClosed            = errors.New("certificate manager closed")
	ErrNoCA              = errors.New("certificate manager has no CA")
	ErrForgotten         = errors.New("identity forgotten while waiting for its certificate")
	ErrNoCertificate     = errors.New("no valid certificate")
	ErrBadIssue          = errors.New("CA returned an unusable certificate")
	ErrNoPeerCertificate = errors.New("peer presented no certificate")
	ErrUntrustedPeer     = errors.New("peer certificate does not chain to the mesh roots")
	ErrPeerIdentity      = errors.New("peer identity mismatch")
	ErrTrustDomain       = errors.New("peer is in another trust domain")
	ErrALPN              = errors.New(`peer did not negotiate ALPN "h2"`)
	ErrNotHandshaken     = errors.New("TLS handshake not complete")
)

// Clock is the Manager's source of time, replaceable in tests.
type Clock interface {
	Now() time.Time
	// AfterFunc calls f in its own goroutine after d.
	AfterFunc(d time.Duration, f func()) Timer
}

// Timer is a pending Clock.AfterFunc call.
type Timer interface {
	Stop() bool
}

type realClock struct{}

func (realClock) Now() time.Time                            { return time.Now() }
func (realClock) AfterFunc(d time.Duration, f func()) Timer { return time.AfterFunc(d, f) }

// Stats counts what the Manager did.
type Stats struct {
	// Issued counts certificates obtained from the CA.
	Issued uint64
	// IssueFailures counts failed or rejected issuances.
	IssueFailures uint64
	// PeersRejected counts TLS handshakes refused because of the peer's
	// certificate, identity, trust domain or ALPN.
	PeersRejected uint64
}

// Manager obtains and refreshes one certificate per workload identity. Keys
// are ECDSA P-256, generated locally and never leave the process. A
// certificate is refreshed at half its lifetime; when that fails the old one
// is kept until it expires while issuance is retried with exponential
// backoff and jitter. A certificate is never handed out past its NotAfter.
//
// Set the fields before first use. Close releases everything.
type Manager struct {
	// CA signs the certificates. Required: without it Get fails with
	// ErrNoCA.
	CA ca.Client
	// TTL is the lifetime asked of the CA. Zero means DefaultTTL.
	TTL time.Duration
	// Clock is the source of time. Nil means the system clock.
	Clock Clock
	// Logger receives background refresh failures. Nil means no logging.
	Logger *slog.Logger

	initOnce sync.Once
	ctx      context.Context // canceled by Close
	cancel   context.CancelFunc
	wg       sync.WaitGroup // issue goroutines

	issued, failures, rejected atomic.Uint64

	mu      sync.Mutex // guards the fields below and every entry's fields
	entries map[identity.ID]*entry
	closed  bool
}

// entry is the state of one identity. Its fields are guarded by Manager.mu.
type entry struct {
	id     identity.ID
	ctx    context.Context // canceled by Forget and Close
	cancel context.CancelFunc

	cur      *tls.Certificate // newest certificate, Leaf set; nil before the first success
	inflight chan struct{}    // non-nil while an issuance runs; closed when it ends
	lastErr  error            // error of the last issuance, nil after a success
	failures int              // consecutive failures, drives the backoff
	timer    Timer            // next refresh or retry
	timerGen uint64           // identifies timer; a stale callback sees another value
	gone     bool             // forgotten or closed
}

func (m *Manager) init() {
	m.initOnce.Do(func() {
		m.ctx, m.cancel = context.WithCancel(context.Background())
		m.entries = make(map[identity.ID]*entry)
	})
}

func (m *Manager) clock() Clock {
	if m.Clock != nil {
		return m.Clock
	}
	return realClock{}
}

func (m *Manager) now() time.Time { return m.clock().Now() }

func (m *Manager) ttl() time.Duration {
	if m.TTL > 0 {
		return m.TTL
	}
	return DefaultTTL
}

func (m *Manager) logger() *slog.Logger {
	if m.Logger != nil {
		return m.Logger
	}
	return slog.New(slog.DiscardHandler)
}

// Stats returns a snapshot of the counters.
func (m *Manager) Stats() Stats {
	return Stats{Issued: m.issued.Load(), IssueFailures: m.failures.Load(), PeersRejected: m.rejected.Load()}
}

// Roots returns the mesh trust anchors peers are verified against.
func (m *Manager) Roots() *x509.CertPool {
	if m.CA == nil {
		return nil
	}
	return m.CA.Roots()
}

// Get returns the certificate for id. The first call for an identity starts
// its management and waits for the first issuance; concurrent callers wait
// for the same CA request. When there is no valid certificate and the last
// issuance failed, Get returns that failure at once instead of waiting for
// the next retry.
func (m *Manager) Get(ctx context.Context, id identity.ID) (*tls.Certificate, error) {
	if err := id.Validate(); err != nil {
		return nil, fmt.Errorf("get certificate: %w", err)
	}
	m.init()
	m.mu.Lock()
	e, err := m.entryLocked(id)
	if err != nil {
		m.mu.Unlock()
		return nil, fmt.Errorf("get certificate %s: %w", id, err)
	}
	for {
		if e.gone {
			closed := m.closed
			m.mu.Unlock()
			if closed {
				return nil, fmt.Errorf("get certificate %s: %w", id, ErrClosed)
			}
			return nil, fmt.Errorf("get certificate %s: %w", id, ErrForgotten)
		}
		if e.cur != nil && m.now().Before(e.cur.Leaf.NotAfter) {
			c := e.cur
			m.mu.Unlock()
			return c, nil
		}
		if e.inflight == nil {
			if e.lastErr != nil {
				err := e.lastErr
				m.mu.Unlock()
				return nil, fmt.Errorf("get certificate %s: %w: %w", id, ErrNoCertificate, err)
			}
			// Expired while no refresh ran (the timer is late, e.g. after
			// a suspend): issue now.
			m.startLocked(e)
		}
		done := e.inflight
		m.mu.Unlock()
		select {
		case <-done:
		case <-ctx.Done():
			return nil, fmt.Errorf("get certificate %s: %w", id, ctx.Err())
		case <-m.ctx.Done():
			return nil, fmt.Errorf("get certificate %s: %w", id, ErrClosed)
		}
		m.mu.Lock()
	}
}

// Prefetch starts managing id without waiting for its certificate.
func (m *Manager) Prefetch(id identity.ID) error {
	if err := id.Validate(); err != nil {
		return fmt.Errorf("prefetch certificate: %w", err)
	}
	m.init()
	m.mu.Lock()
	defer m.mu.Unlock()
	if _, err := m.entryLocked(id); err != nil {
		return fmt.Errorf("prefetch certificate %s: %w", id, err)
	}
	return nil
}

// Forget stops managing id: its pending issuance is canceled, its refresh
// is stopped and its certificate dropped. Callers waiting in Get for it
// fail with ErrForgotten.
func (m *Manager) Forget(id identity.ID) {
	m.init()
	m.mu.Lock()
	defer m.mu.Unlock()
	e := m.entries[id]
	if e == nil {
		return
	}
	delete(m.entries, id)
	m.dropLocked(e)
}

// Close stops all refreshes, cancels pending issuances, wakes callers
// waiting in Get and waits for the background work to end.
func (m *Manager) Close() error {
	m.init()
	m.mu.Lock()
	if m.closed {
		m.mu.Unlock()
		return nil
	}
	m.closed = true
	for _, e := range m.entries {
		m.dropLocked(e)
	}
	m.entries = nil
	m.mu.Unlock()
	m.cancel()
	m.wg.Wait()
	return nil
}

func (m *Manager) dropLocked(e *entry) {
	e.gone = true
	e.cur = nil
	m.stopTimerLocked(e)
	e.cancel()
}

// entryLocked returns id's entry, creating it and starting its first
// issuance if needed.
func (m *Manager) entryLocked(id identity.ID) (*entry, error) {
	if m.closed {
		return nil, ErrClosed
	}
	if m.CA == nil {
		return nil, ErrNoCA
	}
	if e := m.entries[id]; e != nil {
		return e, nil
	}
	e := &entry{id: id}
	e.ctx, e.cancel = context.WithCancel(m.ctx)
	m.entries[id] = e
	m.startLocked(e)
	return e, nil
}

func (m *Manager) startLocked(e *entry) {
	m.stopTimerLocked(e)
	done := make(chan struct{})
	e.inflight = done
	m.wg.Add(1)
	go m.issue(e, done)
}

func (m *Manager) stopTimerLocked(e *entry) {
	if e.timer != nil {
		e.timer.Stop()
		e.timer = nil
	}
	e.timerGen++
}

func (m *Manager) scheduleLocked(e *entry, d time.Duration) {
	m.stopTimerLocked(e)
	gen := e.timerGen
	e.timer = m.clock().AfterFunc(max(d, 0), func() { m.refresh(e, gen) })
}

// refresh is the timer callback: it starts an issuance unless the timer was
// superseded, the entry dropped, or an issuance is already running.
func (m *Manager) refresh(e *entry, gen uint64) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.closed || e.gone || e.timerGen != gen || e.inflight != nil {
		return
	}
	e.timer = nil
	m.startLocked(e)
}

// issue runs one issuance for e and records its outcome.
func (m *Manager) issue(e *entry, done chan struct{}) {
	defer m.wg.Done()
	cert, err := m.obtain(e.ctx, e.id)

	m.mu.Lock()
	defer m.mu.Unlock()
	e.inflight = nil
	close(done)
	if e.gone {
		return
	}
	if err != nil {
		m.failures.Add(1)
		e.failures++
		e.lastErr = err
		d := backoff(e.failures)
		m.scheduleLocked(e, d)
		attrs := []any{logkey.Identity, e.id.String(), logkey.Error, err, logkey.RetryIn, d}
		if e.cur != nil {
			attrs = append(attrs, logkey.NotAfter, e.cur.Leaf.NotAfter)
		}
		m.logger().Warn("certificate issuance failed", attrs...)
		return
	}
	m.issued.Add(1)
	e.cur, e.lastErr, e.failures = cert, nil, 0
	leaf := cert.Leaf
	// Refresh at half lifetime, as Istio does (SECRET_GRACE_PERIOD_RATIO
	// 0.5): time enough for many retries before expiry. A certificate whose
	// half life is already over (backdated further than half its TTL, or
	// a CA clock behind ours) is refreshed at half its remaining life
	// instead, so that a short TTL cannot make the manager spin on the CA.
	now := m.now()
	at := leaf.NotBefore.Add(leaf.NotAfter.Sub(leaf.NotBefore) / 2)
	if !at.After(now) {
		at = now.Add(leaf.NotAfter.Sub(now) / 2)
	}
	m.scheduleLocked(e, at.Sub(now))
	m.logger().Debug("certificate issued", logkey.Identity, e.id.String(), logkey.NotAfter, leaf.NotAfter)
}

// obtain generates a key and has the CA certify it for id. The reply is
// checked again here: serving a certificate for another identity or key
// would let this workload impersonate another one.
func (m *Manager) obtain(ctx context.Context, id identity.ID) (*tls.Certificate, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("issue %s: generate key: %w", id, err)
	}
	csr, err := ca.CreateCSR(key, id)
	if err != nil {
		return nil, fmt.Errorf("issue %s: %w", id, err)
	}
	ctx, cancel := context.WithTimeout(ctx, signTimeout)
	defer cancel()
	chain, err := m.CA.Sign(ctx, csr, id, m.ttl())
	if err != nil {
		return nil, fmt.Errorf("issue %s: %w", id, err)
	}
	if len(chain) == 0 {
		return nil, fmt.Errorf("issue %s: %w: empty chain", id, ErrBadIssue)
	}
	leaf := chain[0]
	got, err := identity.FromCertificate(leaf)
	if err != nil {
		return nil, fmt.Errorf("issue %s: %w: %w", id, ErrBadIssue, err)
	}
	if got != id {
		return nil, fmt.Errorf("issue %s: %w: leaf is for %s", id, ErrBadIssue, got)
	}
	if !key.PublicKey.Equal(leaf.PublicKey) {
		return nil, fmt.Errorf("issue %s: %w: leaf holds another key", id, ErrBadIssue)
	}
	if now := m.now(); !now.Before(leaf.NotAfter) {
		return nil, fmt.Errorf("issue %s: %w: expired at %v (now %v)", id, ErrBadIssue, leaf.NotAfter, now)
	}
	der := make([][]byte, len(chain))
	for i, c := range chain {
		der[i] = c.Raw
	}
	return &tls.Certificate{Certificate: der, PrivateKey: key, Leaf: leaf}, nil
}

// backoff returns the delay before retry number n (n >= 1): exponential
// from backoffInitial, ±50% jitter so that identities (and nodes) that
// failed together do not retry together, capped at backoffMax.
func backoff(n int) time.Duration {
	d := backoffInitial
	for i := 1; i < n && d < backoffMax; i++ {
		d *= 2
	}
	d = d/2 + mrand.N(d)
	return min(d, backoffMax)
}
