package proxy

import (
	"context"
	"errors"
	"log/slog"
	"net/netip"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/amber-mesh/amber/internal/tcptest"
	"github.com/amber-mesh/amber/tunnel/authz"
	"github.com/amber-mesh/amber/tunnel/identity"
	"github.com/amber-mesh/amber/tunnel/relay"
	"github.com/amber-mesh/amber/tunnel/sockopt"
	"github.com/amber-mesh/amber/xds/state"
	"github.com/amber-mesh/amber/xds/workloadapi/security"
)

// TestRecheckListedPolicyNotYetKnown replays what istiod sends when an
// ALLOW policy is applied to a workload with live connections: first the
// workload naming the policy, then the policy. Only the connection the
// policy does not allow may be closed, and only once the policy is known.
func TestRecheckListedPolicyNotYetKnown(t *testing.T) {
	mgr := mustCerts(t)
	pp := wl("productpage", state.ProtocolHBONE, "10.0.0.2")
	store := state.NewStore()
	store.Update(func(tx *state.Txn) { tx.PutWorkload(pp) })
	p, err := New(Config{Store: store, Certs: mgr, NodeName: "n1"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.Close() })

	live := func(id, src string) *conn {
		down, _ := tcptest.Pair(t)
		up, _ := tcptest.Pair(t)
		peerID, err := identity.Parse(id)
		if err != nil {
			t.Fatal(err)
		}
		c := &conn{p: p, pair: relay.NewPair(down, up), record: record{
			src: netip.AddrPortFrom(netip.MustParseAddr(src), 40000), dst: netip.MustParseAddrPort("10.0.0.2:9080"),
			peer: &peer{id: peerID, streams: 1}, dstW: pp, start: now(), inbound: true, hbone: true, mtls: true,
		}}
		p.relay(c, store.Load().Generation(), false)
		return c
	}
	sleep := live("spiffe://cluster.local/ns/default/sa/sleep", "10.0.0.3")
	notsleep := live("spiffe://cluster.local/ns/default/sa/notsleep", "10.0.0.4")

	// The workload update names the policy first.
	listed := *pp
	listed.AuthorizationPolicies = []string{"default/allow-sleep"}
	store.Update(func(tx *state.Txn) { tx.PutWorkload(&listed) })
	p.recheck(store.Load())
	for name, tr := range map[string]*conn{"sleep": sleep, "notsleep": notsleep} {
		if err := tr.closeErr(); err != nil {
			t.Errorf("%s's connection closed before the policy it names arrived: %v", name, err)
		}
	}

	// Then the policy: it allows sleep only.
	allowSleep, err := state.NewAuthorization(&security.Authorization{
		Name: "allow-sleep", Namespace: "default", Scope: security.Scope_WORKLOAD_SELECTOR, Action: security.Action_ALLOW,
		Groups: []*security.Group{{Rules: []*security.Rules{{Matches: []*security.Match{{
			Principals: []*security.StringMatch{{MatchType: &security.StringMatch_Exact{Exact: "cluster.local/ns/default/sa/sleep"}}},
		}}}}}},
	})
	if err != nil {
		t.Fatal(err)
	}
	store.Update(func(tx *state.Txn) { tx.PutAuthorization(allowSleep) })
	p.recheck(store.Load())
	if err := sleep.closeErr(); err != nil {
		t.Errorf("sleep's connection closed under a policy allowing it: %v", err)
	}
	var de *DeniedError
	if err := notsleep.closeErr(); !errors.As(err, &de) || !de.Revoked {
		t.Errorf("notsleep's connection: %v, want revoked by the policy", err)
	}
	// A new connection while a listed policy is unknown is still refused.
	if d := store.Load().Policies().Evaluate(authz.Conn{
		SrcIdentity: "spiffe://cluster.local/ns/default/sa/sleep", SrcIP: netip.MustParseAddr("10.0.0.3"),
		DstIP: netip.MustParseAddr("10.0.0.2"), DstPort: 9080,
		DstWorkload: authz.Workload{Namespace: "default", Name: "productpage", Policies: []string{"default/not-yet"}},
	}); d.Allowed || d.Reason != authz.ReasonUnknownPolicy {
		t.Errorf("new connection to a workload naming an unknown policy: %v, want denied", d)
	}
}

// TestPolicyChangeBeforeTracking publishes a DENY after an inbound
// connection was authorized and before it is tracked, and lets the
// re-check of live connections finish before the connection is tracked:
// the connection is still closed, not left open against the new policy.
func TestPolicyChangeBeforeTracking(t *testing.T) {
	rechecked := make(chan uint64, 16)
	t.Cleanup(func() { testHookAuthorized, testHookRechecked = nil, nil })
	testHookRechecked = func(gen uint64) { rechecked <- gen }
	var logs lockedBuffer
	p, store, _ := startInboundProxy(t, &logs)
	denyAll, err := state.NewAuthorization(&security.Authorization{
		Name: "deny-all", Namespace: "default", Scope: security.Scope_NAMESPACE, Action: security.Action_DENY,
		Groups: []*security.Group{{}},
	})
	if err != nil {
		t.Fatal(err)
	}
	testHookAuthorized = func() {
		store.Update(func(tx *state.Txn) { tx.PutAuthorization(denyAll) })
		gen := store.Load().Generation()
		for g := range rechecked {
			if g >= gen {
				return
			}
		}
	}

	client, down, ln := tcptest.Conn(t, netip.MustParseAddr("127.0.0.3"), netip.MustParseAddr("127.0.0.2"))
	handled := make(chan struct{})
	go func() {
		defer close(handled)
		p.handleInbound(down)
	}()
	up, err := ln.AcceptTCP() // the proxy's upstream connection
	if err != nil {
		t.Fatal(err)
	}
	defer up.Close()
	client.SetReadDeadline(time.Now().Add(5 * time.Second))
	if n, err := client.Read(make([]byte, 1)); err == nil || errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("connection denied while it was set up: read %d, %v; want it closed", n, err)
	}
	<-handled
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := p.Drain(ctx); err != nil { // the relay ended and was reported
		t.Fatal(err)
	}
	if n := p.Stats().AuthzRevoked.Load(); n != 1 {
		t.Errorf("AuthzRevoked = %d, want 1", n)
	}
	lines := logs.lines()
	if len(lines) != 1 {
		t.Fatalf("access log: %v, want one line", lines)
	}
	if e, _ := lines[0][logKeyError].(string); !strings.Contains(e, "revoked by policy change: denied by default/deny-all") {
		t.Errorf("access log error = %q", e)
	}
}

// startInboundProxy returns a proxy for a store holding productpage at
// 127.0.0.2 (on this node) and sleep at 127.0.0.3, logging to logs.
func startInboundProxy(t *testing.T, logs *lockedBuffer) (*Proxy, *state.Store, *state.Workload) {
	t.Helper()
	mgr := mustCerts(t)
	pp := wl("productpage", state.ProtocolHBONE, "127.0.0.2")
	store := state.NewStore()
	store.Update(func(tx *state.Txn) {
		tx.PutWorkload(pp)
		tx.PutWorkload(wl("sleep", state.ProtocolHBONE, "127.0.0.3"))
	})
	p, err := New(Config{
		Store: store, Certs: mgr, NodeName: "n1",
		Logger:  slog.New(slog.NewJSONHandler(logs, nil)),
		Sockets: sockopt.Options{Mark: -1, NoTransparent: true},
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.Close() })
	return p, store, pp
}

// TestRejectedPolicyRefuses: a connection to a workload in the namespace
// of a policy the xDS client rejected is refused by its stand-in, counted
// apart from other policy refusals, and the access log names the policy.
func TestRejectedPolicyRefuses(t *testing.T) {
	var logs lockedBuffer
	p, store, _ := startInboundProxy(t, &logs)
	store.Update(func(tx *state.Txn) {
		tx.RejectAuthorization(state.RejectedAuthorization("default/broken", nil, "decode: unexpected EOF"))
	})
	client, down, _ := tcptest.Conn(t, netip.MustParseAddr("127.0.0.3"), netip.MustParseAddr("127.0.0.2"))
	p.handleInbound(down)
	client.SetReadDeadline(time.Now().Add(5 * time.Second))
	if n, err := client.Read(make([]byte, 1)); err == nil {
		t.Fatalf("read %d bytes through a connection the policy refuses", n)
	}
	if got, denied := p.Stats().AuthzRejectedPolicy.Load(), p.Stats().AuthzDenied.Load(); got != 1 || denied != 0 {
		t.Errorf("AuthzRejectedPolicy = %d, AuthzDenied = %d; want 1 and 0", got, denied)
	}
	lines := logs.lines()
	if len(lines) != 1 {
		t.Fatalf("access log: %v, want one line", lines)
	}
	if e, _ := lines[0][logKeyError].(string); !strings.Contains(e, "denied by rejected policy default/broken") {
		t.Errorf("access log error = %q", e)
	}
}
