package e2e

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/amber-mesh/amber/internal/testutil"
	"github.com/amber-mesh/amber/test/meshbed"
	"github.com/amber-mesh/amber/test/testbed"
	"github.com/amber-mesh/amber/tunnel/ca"
)

const (
	sleepID       = "spiffe://cluster.local/ns/default/sa/sleep"
	notsleepID    = "spiffe://cluster.local/ns/default/sa/notsleep"
	productpageID = "spiffe://cluster.local/ns/default/sa/productpage"
)

func meshYAML(sleep, notsleep, productpage, plain, reviews *testbed.Pod) string {
	addrs := func(p *testbed.Pod) string { return fmt.Sprintf("[%s, %q]", p.IPv4, p.IPv6.String()) }
	return fmt.Sprintf(`
workloads:
  - name: sleep
    serviceAccount: sleep
    addresses: %s
    node: %s
    protocol: HBONE
    labels: {app: sleep}
  - name: notsleep
    serviceAccount: notsleep
    addresses: %s
    node: %s
    protocol: HBONE
    labels: {app: notsleep}
  - name: productpage
    serviceAccount: productpage
    addresses: %s
    node: %s
    protocol: HBONE
    labels: {app: productpage}
  - name: plain
    addresses: %s
    node: %s
    protocol: TCP
  - name: reviews
    serviceAccount: reviews
    addresses: %s
    node: %s
    protocol: HBONE
policies:
  - name: productpage-viewer
    selector:
      matchLabels: {app: productpage}
    action: ALLOW
    rules:
      - from:
          - source:
              principals: [cluster.local/ns/default/sa/sleep]
`, addrs(sleep), sleep.Node.Name, addrs(notsleep), notsleep.Node.Name,
		addrs(productpage), productpage.Node.Name, addrs(plain), plain.Node.Name, addrs(reviews), reviews.Node.Name)
}

// TestPrivilegedMesh runs two nodes, each with the datapath and a real
// amber-ztunnel in local mode, and checks Istio ambient's getting-started
// story: mTLS between enrolled pods across nodes, an L4 policy admitting
// only sleep, passthrough to a pod outside the mesh, preserved source
// addresses, and what the access log and metrics say.
func TestPrivilegedMesh(t *testing.T) {
	n1, n2 := testbed.MustTwoNodes(t)
	sleep, err1 := n1.AddPod("sleep")
	notsleep, err2 := n1.AddPod("notsleep")
	productpage, err3 := n2.AddPod("productpage")
	plain, err4 := n2.AddPod("plain")
	reviews, err5 := n1.AddPod("reviews") // enrolled, same node as the clients
	for _, err := range []error{err1, err2, err3, err4, err5} {
		if err != nil {
			t.Fatal(err)
		}
	}
	node1, node2 := meshbed.MustLoadDatapath(t, n1, "amber-e2e"), meshbed.MustLoadDatapath(t, n2, "amber-e2e")
	node1.MustCapture(t, sleep)
	node1.MustCapture(t, notsleep)
	node1.MustCapture(t, reviews)
	node2.MustCapture(t, productpage)

	dir := t.TempDir()
	caDir := filepath.Join(dir, "ca")
	// Create the CA once so that both ztunnels load the same root.
	if _, err := ca.OpenLocal(caDir, "cluster.local"); err != nil {
		t.Fatal(err)
	}
	meshFile := filepath.Join(dir, "mesh.yaml")
	if err := os.WriteFile(meshFile, []byte(meshYAML(sleep, notsleep, productpage, plain, reviews)), 0o644); err != nil {
		t.Fatal(err)
	}

	echoPP := mustEcho(t, productpage, 9080)
	echoPlain := mustEcho(t, plain, 9080)
	echoReviews := mustEcho(t, reviews, 9080)

	// Capture n1's uplink for the whole test.
	pcap := filepath.Join(dir, "uplink.pcap")
	dump := n1.Command(context.Background(), "tcpdump", "--immediate-mode", "-Z", "root", "-i", n1.Uplink, "-U", "-n", "-s", "0", "-w", pcap, "tcp")
	var dumpLog syncBuffer
	dump.Stderr = &dumpLog
	if err := dump.Start(); err != nil {
		t.Fatalf("tcpdump: %v", err)
	}
	dumpDone := make(chan error, 1)
	go func() { dumpDone <- dump.Wait() }()
	stopDump := func() {
		if dump.ProcessState != nil {
			return
		}
		dump.Process.Signal(syscall.SIGINT)
		select {
		case <-dumpDone:
		case <-time.After(5 * time.Second):
			dump.Process.Kill()
			<-dumpDone
		}
	}
	t.Cleanup(stopDump)
	testutil.Eventually(t, "tcpdump to listen", func() bool { return strings.Contains(dumpLog.String(), "listening on") })

	z1 := mustZtunnel(t, node1, meshFile, caDir)
	z2 := mustZtunnel(t, node2, meshFile, caDir)

	const secret = "amber-e2e-secret-payload-7f3c9a"
	for _, v6 := range []bool{false, true} {
		ip := func(p *testbed.Pod) netip.Addr {
			if v6 {
				return p.IPv6
			}
			return p.IPv4
		}
		family := map[bool]string{false: "ipv4", true: "ipv6"}[v6]

		t.Run(family+"/sleep to productpage over HBONE", func(t *testing.T) {
			if err := roundTrip(sleep, netip.AddrPortFrom(ip(productpage), 9080), secret+"-"+family); err != nil {
				t.Fatalf("sleep → productpage: %v", err)
			}
			if got := echoPP.lastPeer(t).Addr(); got != ip(sleep) {
				t.Errorf("productpage saw source %s, want sleep's %s (source not preserved)", got, ip(sleep))
			}
		})

		t.Run(family+"/notsleep refused by policy", func(t *testing.T) {
			err := roundTrip(notsleep, netip.AddrPortFrom(ip(productpage), 9080), "let me in")
			if err == nil {
				t.Fatal("notsleep reached productpage despite the ALLOW policy for sleep only")
			}
			select {
			case p := <-echoPP.peers:
				t.Fatalf("productpage saw a connection from %s", p)
			default:
			}
			testutil.Eventually(t, "denial in the access log", func() bool {
				return len(z2.accessLogs(map[string]string{
					"src.identity": notsleepID, "dst.addr": ip(productpage).String(), "error": "denied by policy",
				})) > 0
			})
		})

		t.Run(family+"/sleep to reviews on the same node", func(t *testing.T) {
			if err := roundTrip(sleep, netip.AddrPortFrom(ip(reviews), 9080), "same node "+family); err != nil {
				t.Fatalf("sleep → reviews: %v", err)
			}
			if got := echoReviews.lastPeer(t).Addr(); got != ip(sleep) {
				t.Errorf("reviews saw source %s, want sleep's %s", got, ip(sleep))
			}
			// The same ztunnel reports both ends, as two ztunnels would.
			testutil.Eventually(t, "destination access log on n1", func() bool {
				return len(z1.accessLogs(map[string]string{
					"reporter": "destination", "protocol": "HBONE", "src.identity": sleepID,
					"dst.identity": "spiffe://cluster.local/ns/default/sa/reviews", "dst.addr": ip(reviews).String(),
				})) > 0
			})
		})

		t.Run(family+"/passthrough to a pod outside the mesh", func(t *testing.T) {
			if err := roundTrip(sleep, netip.AddrPortFrom(ip(plain), 9080), "plain "+family); err != nil {
				t.Fatalf("sleep → plain: %v", err)
			}
			if got := echoPlain.lastPeer(t).Addr(); got != ip(sleep) {
				t.Errorf("plain saw source %s, want sleep's %s", got, ip(sleep))
			}
		})
	}

	t.Run("metrics", func(t *testing.T) {
		mtls := map[string]string{
			"connection_security_policy": "mutual_tls",
			"source_principal":           sleepID,
			"destination_principal":      productpageID,
			"source_workload":            "sleep",
			"destination_workload":       "productpage",
			"request_protocol":           "tcp",
		}
		for _, z := range []*ztunnel{z1, z2} {
			reporter := map[*ztunnel]string{z1: "source", z2: "destination"}[z]
			want := map[string]string{"reporter": reporter, "response_flags": "-"}
			for k, v := range mtls {
				want[k] = v
			}
			testutil.Eventually(t, reporter+" metrics", func() bool {
				return z.metric(t, "istio_tcp_connections_closed_total", want) >= 2
			})
			if got := z.metric(t, "istio_tcp_connections_opened_total", want); got < 2 {
				t.Errorf("%s: istio_tcp_connections_opened_total = %v, want ≥ 2", reporter, got)
			}
			if got := z.metric(t, "istio_tcp_received_bytes_total", want); got < float64(2*len(secret)) {
				t.Errorf("%s: istio_tcp_received_bytes_total = %v, want ≥ %d", reporter, got, 2*len(secret))
			}
		}
		denied := map[string]string{"reporter": "destination", "source_principal": notsleepID, "response_flags": "DENY"}
		if got := z2.metric(t, "istio_tcp_connections_opened_total", denied); got < 2 {
			t.Errorf("denied connections opened = %v, want ≥ 2", got)
		}
		if got := z2.metric(t, "amber_proxy_refused_total", map[string]string{"reason": "authz_denied"}); got < 2 {
			t.Errorf("amber_proxy_refused_total{reason=authz_denied} = %v, want ≥ 2", got)
		}
		plainWant := map[string]string{"reporter": "source", "destination_workload": "plain", "connection_security_policy": "none"}
		if got := z1.metric(t, "istio_tcp_connections_opened_total", plainWant); got < 2 {
			t.Errorf("passthrough connections opened = %v, want ≥ 2", got)
		}
		if got := z1.metric(t, "amber_capture_packets_total", map[string]string{"reason": "assign_outbound"}); got < 6 {
			t.Errorf("amber_capture_packets_total{reason=assign_outbound} = %v, want ≥ 6", got)
		}
	})

	t.Run("admin", func(t *testing.T) {
		// Admin listens on 127.0.0.1 in the node: ask from inside it.
		out, err := z2.ConfigDump()
		if err != nil {
			t.Fatal(err)
		}
		for _, want := range []string{productpageID, "productpage-viewer", `"not_after"`} {
			if !strings.Contains(out, want) {
				t.Errorf("config_dump lacks %q:\n%s", want, out)
			}
		}
		out, err = z2.Admin("/debug/pprof/goroutine?debug=1")
		if err != nil {
			t.Fatal(err)
		}
		if !strings.Contains(out, "goroutine profile:") {
			t.Errorf("/debug/pprof/goroutine is not a goroutine profile:\n%.300s", out)
		}
	})

	t.Run("client reset is not a connection error", func(t *testing.T) {
		// A client may end a connection with RST once its exchange is
		// done (SO_LINGER 0): both ztunnels log it as a complete
		// connection, at INFO and without an error, as Istio's ztunnel
		// does.
		c := echoConn(t, sleep, netip.AddrPortFrom(productpage.IPv4, 9080), "reset")
		src := c.LocalAddr().String()
		c.(*net.TCPConn).SetLinger(0)
		c.Close()
		echoPP.lastPeer(t)
		for _, z := range []*ztunnel{z1, z2} {
			var lines []map[string]any
			testutil.Eventually(t, "access log of the reset connection", func() bool {
				lines = z.accessLogs(map[string]string{"src.addr": src, "dst.addr": productpage.IPv4.String()})
				return len(lines) > 0
			})
			if l := lines[0]; l["level"] != "INFO" || l["error"] != nil {
				t.Errorf("%s logged the client's reset as level %v, error %v; want INFO and no error", l["reporter"], l["level"], l["error"])
			}
		}
	})

	t.Run("policy change closes live connection", func(t *testing.T) {
		c := echoConn(t, sleep, netip.AddrPortFrom(productpage.IPv4, 9080), "ping")
		defer c.Close()
		c.SetDeadline(time.Now().Add(8 * time.Second))
		buf := make([]byte, 4)
		mesh := strings.Replace(meshYAML(sleep, notsleep, productpage, plain, reviews), "sa/sleep]", "sa/notsleep]", 1)
		if err := os.WriteFile(meshFile, []byte(mesh), 0o644); err != nil {
			t.Fatal(err)
		}
		// The local xDS server polls the file every second; the ztunnel
		// then re-checks live connections and closes this one.
		if _, err := io.ReadFull(c, buf); err == nil || errors.Is(err, os.ErrDeadlineExceeded) {
			t.Fatalf("connection not closed after the policy change: %v", err)
		}
		testutil.Eventually(t, "revocation in the access log", func() bool {
			return len(z2.accessLogs(map[string]string{"src.identity": sleepID, "error": "revoked by policy change"})) > 0
		})
	})

	t.Run("wire", func(t *testing.T) {
		stopDump()
		raw, err := os.ReadFile(pcap)
		if err != nil {
			t.Fatal(err)
		}
		if bytes.Contains(raw, []byte(secret)) {
			t.Error("application payload crossed the uplink in plaintext")
		}
		t.Logf("pcap %d bytes; tcpdump: %s", len(raw), dumpLog.String())
		text, err := n1.Command(context.Background(), "tcpdump", "-r", pcap, "-n", "tcp port 15008").Output()
		if err != nil {
			t.Fatalf("tcpdump -r: %v", err)
		}
		for _, p := range []netip.Addr{productpage.IPv4, productpage.IPv6} {
			if !strings.Contains(string(text), p.String()+".15008") {
				t.Errorf("no HBONE packets to %s:15008 on the uplink", p)
			}
		}
		if !bytes.Contains(raw, []byte("plain ipv4")) {
			t.Error("passthrough payload not seen on the uplink: is the capture working?")
		}
	})
}
