package e2e

import (
	"bytes"
	"context"
	"crypto/x509"
	"fmt"
	"net/netip"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/amber-mesh/amber/internal/testutil"
	"github.com/amber-mesh/amber/test/istiod"
	"github.com/amber-mesh/amber/test/testbed"
)

// TestPrivilegedIstiodMesh runs the two-node mesh with amber-ztunnel in
// istiod mode: workloads, policies and certificates come from a real
// istiod watching a real kube-apiserver, where the test creates the Pods
// and policies a user, a kubelet and the node agent would. Each subtest
// uses its own destination pod so that one's policies do not touch the
// others'.
func TestPrivilegedIstiodMesh(t *testing.T) {
	m := newIstiodMesh(t)
	sleep := m.addPod(t, m.n1, "sleep", true)
	notsleep := m.addPod(t, m.n1, "notsleep", true)
	productpage := m.addPod(t, m.n2, "productpage", true)
	reviews := m.addPod(t, m.n2, "reviews", false) // enrolled by a subtest
	ratings := m.addPod(t, m.n2, "ratings", true)
	details := m.addPod(t, m.n2, "details", true)
	echoPP := mustHoldingEcho(t, productpage, 9080)
	echoReviews := mustHoldingEcho(t, reviews, 9080)
	mustHoldingEcho(t, ratings, 9080)
	mustHoldingEcho(t, details, 9080)

	d := istiod.Start(t, m.cp, istiod.Options{BinDir: m.istiodBin})
	m.connect(t, d)
	uplink := mustCaptureUplink(t, m.n1.Node, m.dir)
	z1, z2 := m.startZtunnels(t)

	const secret = "amber-istiod-secret-payload-2c81"
	t.Run("HBONE with istiod certificates", func(t *testing.T) {
		for _, v6 := range []bool{false, true} {
			family, dst, src := "ipv4", productpage.IPv4, sleep.IPv4
			if v6 {
				family, dst, src = "ipv6", productpage.IPv6, sleep.IPv6
			}
			if err := roundTrip(sleep, netip.AddrPortFrom(dst, 9080), secret+"-"+family); err != nil {
				t.Fatalf("%s: sleep → productpage: %v", family, err)
			}
			if got := echoPP.lastPeer(t).Addr(); got != src {
				t.Errorf("%s: productpage saw source %s, want sleep's %s", family, got, src)
			}
			testutil.Eventually(t, family+" destination access log on n2", func() bool {
				return len(z2.accessLogs(map[string]string{
					"reporter": "destination", "protocol": "HBONE", "src.identity": sleepID,
					"dst.identity": productpageID, "dst.addr": dst.String(),
				})) > 0
			})
		}
		// Both reports carry the client principal istiod's certificate
		// proved, and mutual TLS.
		for _, z := range []*ztunnel{z1, z2} {
			reporter := map[*ztunnel]string{z1: "source", z2: "destination"}[z]
			want := map[string]string{
				"reporter": reporter, "connection_security_policy": "mutual_tls",
				"source_principal": sleepID, "destination_principal": productpageID,
				"source_workload": "sleep", "destination_workload": "productpage", "response_flags": "-",
			}
			testutil.Eventually(t, reporter+" metrics", func() bool {
				return z.metric(t, "istio_tcp_connections_closed_total", want) >= 2
			})
			if got := z.metric(t, "istio_tcp_received_bytes_total", want); got < float64(2*len(secret)) {
				t.Errorf("%s: istio_tcp_received_bytes_total = %v, want ≥ %d", reporter, got, 2*len(secret))
			}
			// No local CA in istiod mode: what a ztunnel holds, istiod issued.
			if got := z.metric(t, "amber_certificate_events_total", map[string]string{"event": "issued"}); got < 1 {
				t.Errorf("%s ztunnel: certificates issued = %v, want ≥ 1", reporter, got)
			}
		}
		// What productpage's HBONE listener presents: a certificate for
		// productpage's identity chaining to istiod's root.
		chain, err := peerChain(m.n1.Node, netip.AddrPortFrom(productpage.IPv4, 15008))
		if err != nil {
			t.Fatal(err)
		}
		roots, inter := x509.NewCertPool(), x509.NewCertPool()
		roots.AppendCertsFromPEM(d.RootPEM)
		for _, c := range chain[1:] {
			inter.AddCert(c)
		}
		if _, err := chain[0].Verify(x509.VerifyOptions{Roots: roots, Intermediates: inter, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}}); err != nil {
			t.Errorf("productpage's certificate does not chain to istiod's root: %v", err)
		}
		if len(chain[0].URIs) != 1 || chain[0].URIs[0].String() != productpageID {
			t.Errorf("productpage's certificate names %v, want %s", chain[0].URIs, productpageID)
		}
		t.Logf("productpage presents %s issued by %q, valid until %s", chain[0].URIs, chain[0].Issuer, chain[0].NotAfter.Format(time.RFC3339))
	})

	t.Run("HBONE only once annotated for redirection", func(t *testing.T) {
		// In an ambient namespace but not yet annotated (not yet captured
		// by a node agent): istiod sends it as plain TCP and sleep's
		// ztunnel passes the connection through.
		waitProtocol(t, z1, "reviews", "TCP")
		if err := roundTrip(sleep, netip.AddrPortFrom(reviews.IPv4, 9080), "before annotation"); err != nil {
			t.Fatalf("sleep → reviews before annotation: %v", err)
		}
		testutil.Eventually(t, "passthrough access log on n1", func() bool {
			return len(z1.accessLogs(map[string]string{
				"reporter": "source", "protocol": "TCP", "dst.workload": "reviews", "dst.addr": reviews.IPv4.String(),
			})) > 0
		})
		if got := z2.accessLogs(map[string]string{"dst.workload": "reviews"}); len(got) != 0 {
			t.Errorf("n2's ztunnel handled a connection to reviews before it was enrolled: %v", got)
		}
		echoReviews.lastPeer(t)

		m.enroll(t, m.n2, reviews)
		waitProtocol(t, z1, "reviews", "HBONE")
		if err := roundTrip(sleep, netip.AddrPortFrom(reviews.IPv4, 9080), "after annotation"); err != nil {
			t.Fatalf("sleep → reviews after annotation: %v", err)
		}
		if got := echoReviews.lastPeer(t).Addr(); got != sleep.IPv4 {
			t.Errorf("reviews saw source %s, want sleep's %s", got, sleep.IPv4)
		}
		testutil.Eventually(t, "HBONE access log for reviews on n2", func() bool {
			return len(z2.accessLogs(map[string]string{
				"reporter": "destination", "protocol": "HBONE", "src.identity": sleepID,
				"dst.identity": "spiffe://cluster.local/ns/default/sa/reviews",
			})) > 0
		})
	})

	t.Run("new policy closes disallowed live connections", func(t *testing.T) {
		addr := netip.AddrPortFrom(productpage.IPv4, 9080)
		fromSleep, fromNotsleep := mustHold(t, sleep, addr), mustHold(t, notsleep, addr)
		m.kubectlApply(t, `apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: productpage-viewer
  namespace: default
spec:
  selector:
    matchLabels:
      app: productpage
  action: ALLOW
  rules:
  - from:
    - source:
        principals: ["cluster.local/ns/default/sa/sleep"]
`)
		t.Cleanup(func() {
			m.deletePolicy(t, "productpage-viewer")
			waitPolicy(t, z2, "productpage-viewer", "productpage", false)
		})
		if err := fromNotsleep.closedWithin(30 * time.Second); err != nil {
			t.Fatalf("notsleep's connection after the ALLOW-sleep policy: %v", err)
		}
		testutil.Eventually(t, "revocation in n2's access log", func() bool {
			return len(z2.accessLogs(map[string]string{"src.identity": notsleepID, "error": "revoked by policy change"})) > 0
		})
		if err := fromSleep.echo("still allowed"); err != nil {
			t.Fatalf("sleep's connection after the policy: %v", err)
		}
		if err := roundTrip(notsleep, addr, "let me in"); err == nil {
			t.Error("a new connection from notsleep reached productpage")
		}
		if err := roundTrip(sleep, addr, "new from sleep"); err != nil {
			t.Errorf("a new connection from sleep: %v", err)
		}
		if got := z2.metric(t, "amber_proxy_refused_total", map[string]string{"reason": "authz_revoked"}); got < 1 {
			t.Errorf("amber_proxy_refused_total{reason=authz_revoked} = %v, want ≥ 1", got)
		}
	})

	t.Run("L7 policy without a waypoint fails closed", func(t *testing.T) {
		addr := netip.AddrPortFrom(ratings.IPv4, 9080)
		for _, p := range []*testbed.Pod{sleep, notsleep} {
			if err := roundTrip(p, addr, "no policy yet"); err != nil {
				t.Fatalf("%s → ratings before any policy: %v", p.Name, err)
			}
		}
		// ALLOW sleep, for some paths: the ztunnel cannot see paths, and
		// istiod drops the rule for it, so nothing is allowed (Istio:
		// "rules matching HTTP attributes are omitted").
		m.kubectlApply(t, `apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: ratings-l7-allow
  namespace: default
spec:
  selector:
    matchLabels:
      app: ratings
  action: ALLOW
  rules:
  - from:
    - source:
        principals: ["cluster.local/ns/default/sa/sleep"]
    to:
    - operation:
        paths: ["/ratings/*"]
`)
		dump := waitPolicy(t, z2, "ratings-l7-allow", "ratings", true)
		t.Logf("ratings-l7-allow as istiod sent it: %d rule groups", dump.policy("ratings-l7-allow"))
		if err := roundTrip(sleep, addr, "GET /ratings/1"); err == nil {
			t.Error("sleep reached ratings through an ALLOW policy whose only rule has L7 fields")
		}
		testutil.Eventually(t, "denial in n2's access log", func() bool {
			return len(z2.accessLogs(map[string]string{"src.identity": sleepID, "dst.workload": "ratings", "error": "denied by policy"})) > 0
		})
		m.deletePolicy(t, "ratings-l7-allow")
		waitPolicy(t, z2, "ratings-l7-allow", "ratings", false)

		// DENY notsleep, for POSTs only: enforced without the method, so
		// notsleep is denied everything and sleep is untouched.
		m.kubectlApply(t, `apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: ratings-l7-deny
  namespace: default
spec:
  selector:
    matchLabels:
      app: ratings
  action: DENY
  rules:
  - from:
    - source:
        principals: ["cluster.local/ns/default/sa/notsleep"]
    to:
    - operation:
        methods: ["POST"]
`)
		t.Cleanup(func() { m.deletePolicy(t, "ratings-l7-deny") })
		waitPolicy(t, z2, "ratings-l7-deny", "ratings", true)
		if err := roundTrip(notsleep, addr, "GET /ratings/1"); err == nil {
			t.Error("notsleep reached ratings through a DENY policy with an L7 rule")
		}
		if err := roundTrip(sleep, addr, "GET /ratings/1"); err != nil {
			t.Errorf("sleep → ratings under a DENY policy for notsleep: %v", err)
		}
	})

	t.Run("deleted workload is unreachable", func(t *testing.T) {
		addr := netip.AddrPortFrom(details.IPv4, 9080)
		live := mustHold(t, sleep, addr)
		m.deletePod(t, "details")
		waitProtocol(t, z1, "details", "")
		waitProtocol(t, z2, "details", "")
		// The destination ztunnel drops what it no longer serves.
		if err := live.closedWithin(10 * time.Second); err != nil {
			t.Errorf("open connection to the deleted workload: %v", err)
		}
		// A new connection is plain TCP to an address the mesh no longer
		// knows; the datapath on n2 still captures the (undeleted) pod
		// and its ztunnel refuses a destination it does not serve.
		if err := roundTrip(sleep, addr, "anyone there?"); err == nil {
			t.Fatal("sleep reached details after its Pod was deleted")
		}
		testutil.Eventually(t, "refusal in n2's access log", func() bool {
			return len(z2.accessLogs(map[string]string{"dst.addr": details.IPv4.String(), "error": "not a local workload"})) > 0
		})
	})

	t.Run("no plaintext on the uplink", func(t *testing.T) {
		raw, err := uplink.stop()
		if err != nil {
			t.Fatal(err)
		}
		if bytes.Contains(raw, []byte(secret)) {
			t.Error("application payload crossed the uplink in plaintext")
		}
		if !bytes.Contains(raw, []byte("before annotation")) {
			t.Error("the passthrough payload is not in the capture: is the capture working?")
		}
		text, err := m.n1.Command(context.Background(), "tcpdump", "-r", uplink.file, "-n", "tcp port 15008").Output()
		if err != nil {
			t.Fatalf("tcpdump -r: %v", err)
		}
		for _, p := range []netip.Addr{productpage.IPv4, productpage.IPv6} {
			if !strings.Contains(string(text), p.String()+".15008") {
				t.Errorf("no HBONE packets to %s:15008 on the uplink", p)
			}
		}
	})
}

// TestPrivilegedIstiodRestart stops istiod under live traffic and starts
// a new one: the ztunnels keep their connections and last good state
// while it is gone, reconnect to the new instance (behind the same
// address, as behind istiod's Service), and take policy and certificates
// from it.
func TestPrivilegedIstiodRestart(t *testing.T) {
	m := newIstiodMesh(t)
	sleep := m.addPod(t, m.n1, "sleep", true)
	productpage := m.addPod(t, m.n2, "productpage", true)
	mustHoldingEcho(t, productpage, 9080)
	addr := netip.AddrPortFrom(productpage.IPv4, 9080)

	var z1, z2 *ztunnel
	var live *held
	var firstPid int
	t.Cleanup(func() {
		if live != nil {
			live.Close()
		}
	})
	// The first istiod lives as long as this subtest: its cleanup stops
	// it (SIGTERM), with the ztunnels and the connection still up.
	if !t.Run("first istiod", func(t *testing.T) {
		d := istiod.Start(t, m.cp, istiod.Options{BinDir: m.istiodBin})
		firstPid = d.Pid()
		m.connect(t, d)
		z1, z2 = m.startZtunnels(t)
		if err := roundTrip(sleep, addr, "with istiod"); err != nil {
			t.Fatalf("sleep → productpage: %v", err)
		}
		var err error
		if live, err = hold(sleep, addr); err != nil {
			t.Fatal(err)
		}
	}) {
		return
	}
	if err := syscall.Kill(firstPid, 0); err != syscall.ESRCH {
		t.Fatalf("first istiod (pid %d) still running: %v", firstPid, err)
	}
	for _, f := range m.fwd {
		f.SetTarget("") // no endpoint while istiod is away
	}

	t.Run("istiod gone", func(t *testing.T) {
		for _, z := range []*ztunnel{z1, z2} {
			testutil.EventuallyNil(t, z.Node.Name+" to see istiod gone", func() error {
				d, err := z.configDump()
				if err != nil {
					return err
				}
				if d.XDS.Connected {
					return fmt.Errorf("xds still connected")
				}
				return nil
			})
		}
		if err := live.echo("during the outage"); err != nil {
			t.Errorf("open connection while istiod is gone: %v", err)
		}
		if err := roundTrip(sleep, addr, "new during the outage"); err != nil {
			t.Errorf("new connection while istiod is gone: %v", err)
		}
		// Over IPv6 the pool has no HBONE connection yet: a new mutual-TLS
		// handshake with the certificates held from before.
		if err := roundTrip(sleep, netip.AddrPortFrom(productpage.IPv6, 9080), "new handshake during the outage"); err != nil {
			t.Errorf("new IPv6 connection while istiod is gone: %v", err)
		}
		for _, z := range []*ztunnel{z1, z2} {
			if code, _, err := z.Get(15021, "/healthz/ready"); err != nil || code != 200 {
				t.Errorf("%s not ready while istiod is gone: %d %v", z.Node.Name, code, err)
			}
		}
	})

	d := istiod.Start(t, m.cp, istiod.Options{BinDir: m.istiodBin})
	m.connect(t, d)

	t.Run("second istiod", func(t *testing.T) {
		issued := z2.metric(t, "amber_certificate_events_total", map[string]string{"event": "issued"})
		start := time.Now()
		for _, z := range []*ztunnel{z1, z2} {
			// gRPC backs off up to ~10 s between attempts after a few
			// failures; the xDS client up to 15 s.
			testutil.EventuallyNil(t, z.Node.Name+" to reconnect", func() error {
				d, err := z.configDump()
				if err != nil {
					return err
				}
				if !d.XDS.Connected || d.XDS.Connects < 2 {
					return fmt.Errorf("xds connected=%v connects=%d", d.XDS.Connected, d.XDS.Connects)
				}
				return nil
			})
		}
		t.Logf("both ztunnels reconnected %v after the new istiod was ready", time.Since(start).Round(time.Millisecond))
		if err := live.echo("after the restart"); err != nil {
			t.Fatalf("open connection after istiod came back: %v", err)
		}

		// Certificates: a workload that appears now needs a new one.
		ratings := m.addPod(t, m.n2, "ratings", true)
		mustHoldingEcho(t, ratings, 9080)
		waitProtocol(t, z1, "ratings", "HBONE")
		if err := roundTrip(sleep, netip.AddrPortFrom(ratings.IPv4, 9080), "new workload"); err != nil {
			t.Fatalf("sleep → ratings (created after the restart): %v", err)
		}
		if got := z2.metric(t, "amber_certificate_events_total", map[string]string{"event": "issued"}); got <= issued {
			t.Errorf("n2's ztunnel certificates issued %v → %v: none from the new istiod", issued, got)
		}
		testutil.Eventually(t, "HBONE access log for ratings on n2", func() bool {
			return len(z2.accessLogs(map[string]string{
				"reporter": "destination", "protocol": "HBONE", "src.identity": sleepID,
				"dst.identity": "spiffe://cluster.local/ns/default/sa/ratings",
			})) > 0
		})

		// Config updates: a policy against sleep closes the connection
		// that has lived through both istiods.
		m.kubectlApply(t, `apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: deny-sleep
  namespace: default
spec:
  selector:
    matchLabels:
      app: productpage
  action: DENY
  rules:
  - from:
    - source:
        principals: ["cluster.local/ns/default/sa/sleep"]
`)
		if err := live.closedWithin(30 * time.Second); err != nil {
			t.Fatalf("connection after a DENY policy from the new istiod: %v", err)
		}
		if err := roundTrip(sleep, addr, "denied"); err == nil {
			t.Error("a new connection from sleep reached productpage despite the DENY policy")
		}
	})
}
