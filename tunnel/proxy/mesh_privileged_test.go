package proxy

import (
	"fmt"
	"io"
	"log/slog"
	"maps"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"syscall"
	"testing"

	"github.com/vishvananda/netlink"

	"github.com/amber-mesh/amber/internal/tcptest"
	"github.com/amber-mesh/amber/internal/testutil"
	"github.com/amber-mesh/amber/test/privileged"
	"github.com/amber-mesh/amber/tunnel/sockopt"
	"github.com/amber-mesh/amber/xds/state"
)

// This file runs a source and a destination ztunnel in one process: the
// outbound proxy of sleep's node carries connections over HBONE to the
// inbound proxy of productpage's, which relays them to an application.
// A CONNECT to a loopback address is refused (tunnelTarget), so the pods'
// addresses are on the loopback link of a network namespace of the
// test's own: the test runs itself again in a child process created in
// one (inOwnNetns), whose every thread — every socket the proxies open —
// is inside.

// inNetnsEnv marks the child process a test runs itself in.
const inNetnsEnv = "AMBER_PROXY_TEST_IN_NETNS"

// Addresses of the mesh's pods and its application.
var (
	meshSleepAddr = netip.MustParseAddr("10.0.0.3")
	meshAppAddr   = netip.MustParseAddrPort("10.0.0.2:9080")
)

// inOwnNetns reports whether the test runs in the network namespace of
// its own that the mesh needs. If not, it runs the test again in a child
// process in a new one, which ends with the process, reports the child's
// output and outcome, and returns false.
func inOwnNetns(t *testing.T) bool {
	if os.Getenv(inNetnsEnv) != "" {
		mustPodAddrs(t, meshAppAddr.Addr(), meshSleepAddr)
		return true
	}
	cmd := exec.CommandContext(t.Context(), os.Args[0], "-test.run=^"+t.Name()+"$", "-test.v", "-test.count=1")
	cmd.Env = append(os.Environ(), inNetnsEnv+"=1")
	cmd.SysProcAttr = &syscall.SysProcAttr{Cloneflags: syscall.CLONE_NEWNET}
	out, err := cmd.CombinedOutput()
	t.Logf("in a network namespace of its own:\n%s", out)
	if err != nil {
		t.Fatalf("child: %v", err)
	}
	return false
}

// mustPodAddrs brings lo up with addrs on it, in the test's own network
// namespace (created with it; no link module is needed).
func mustPodAddrs(t *testing.T, addrs ...netip.Addr) {
	t.Helper()
	lo, err := netlink.LinkByName("lo")
	if err == nil {
		err = netlink.LinkSetUp(lo)
	}
	if err != nil {
		t.Fatal(err)
	}
	for _, a := range addrs {
		addr, err := netlink.ParseAddr(a.String() + "/32")
		if err == nil {
			err = netlink.AddrAdd(lo, addr)
		}
		if err != nil {
			t.Fatal(err)
		}
	}
}

// mesh is a source and a destination ztunnel and an application.
type mesh struct {
	src, dst  *Proxy
	sleep, pp *state.Workload
	hboneAddr netip.AddrPort // the destination's HBONE listener
	capture   *net.TCPListener
}

// startMesh starts a mesh whose proxies log to srcLog and dstLog (nil:
// nowhere). The application echoes what it reads.
func startMesh(t *testing.T, srcLog, dstLog *lockedBuffer) *mesh {
	t.Helper()
	mgr := mustCerts(t)
	m := &mesh{sleep: wl("sleep", state.ProtocolHBONE, meshSleepAddr.String()), pp: wl("productpage", state.ProtocolHBONE, meshAppAddr.Addr().String())}
	m.pp.Node = "n2"
	store := state.NewStore()
	store.Update(func(tx *state.Txn) { tx.PutWorkload(m.sleep); tx.PutWorkload(m.pp) })
	hboneLn, err := net.Listen("tcp", netip.AddrPortFrom(meshAppAddr.Addr(), 0).String())
	if err != nil {
		t.Fatal(err)
	}
	m.hboneAddr = netip.MustParseAddrPort(hboneLn.Addr().String())
	newProxy := func(node string, logs *lockedBuffer) *Proxy {
		cfg := Config{
			Store: store, Certs: mgr, NodeName: node, HBONEPort: m.hboneAddr.Port(),
			Sockets: sockopt.Options{Mark: -1, NoTransparent: true},
		}
		if logs != nil {
			cfg.Logger = slog.New(slog.NewJSONHandler(logs, nil))
		}
		p, err := New(cfg)
		if err != nil {
			t.Fatal(err)
		}
		return p
	}
	m.src, m.dst = newProxy("n1", srcLog), newProxy("n2", dstLog)
	served := make(chan error, 1)
	go func() { served <- m.dst.ServeHBONE(hboneLn) }()
	t.Cleanup(func() {
		m.src.Close()
		m.dst.Close()
		<-served
	})

	appLn, err := net.Listen("tcp", meshAppAddr.String())
	if err != nil {
		t.Fatal(err)
	}
	tcptest.Serve(t, appLn, func(c net.Conn) {
		var b [1]byte
		for {
			n, err := c.Read(b[:])
			if err != nil {
				return
			}
			c.Write(b[:n])
		}
	})
	m.capture, err = net.ListenTCP("tcp", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.capture.Close() })
	return m
}

// connect opens a connection from sleep's port 40000+i through both
// proxies to the application and exchanges a byte each way.
func (m *mesh) connect(t *testing.T, i int) *net.TCPConn {
	t.Helper()
	client, err := net.DialTCP("tcp", nil, m.capture.Addr().(*net.TCPAddr))
	if err != nil {
		t.Fatal(err)
	}
	down, err := acceptCaptured(m.capture)
	if err != nil {
		t.Fatal(err)
	}
	go m.src.outbound(down, netip.AddrPortFrom(meshSleepAddr, uint16(40000+i)), meshAppAddr, netip.AddrPort{})
	b := []byte{'x'}
	if _, err := client.Write(b); err != nil {
		t.Fatal(err)
	}
	if _, err := io.ReadFull(client, b); err != nil {
		t.Fatalf("connection %d: %v", i, err)
	}
	return client
}

// acceptCaptured accepts a connection for the source ztunnel, as its
// outbound listener does (TestPrivilegedIdleConnMemory counts its socket
// on that side).
func acceptCaptured(ln *net.TCPListener) (*net.TCPConn, error) { return ln.AcceptTCP() }

// TestPrivilegedRelayedReports: a connection relayed through both
// ztunnels is reported by each, in its access-log line and its metrics,
// with the fields and labels Istio's ztunnels report.
func TestPrivilegedRelayedReports(t *testing.T) {
	privileged.Require(t)
	if !inOwnNetns(t) {
		return
	}
	var srcLogs, dstLogs lockedBuffer
	m := startMesh(t, &srcLogs, &dstLogs)
	client := m.connect(t, 0)
	client.CloseWrite()
	if rest, err := io.ReadAll(client); err != nil || len(rest) != 0 {
		t.Fatalf("after the half-close read %q, %v; want EOF", rest, err)
	}
	client.Close()

	sleepID, ppID := workloadID(m.sleep).String(), workloadID(m.pp).String()
	for _, side := range []struct {
		name string
		logs *lockedBuffer
		p    *Proxy
		log  map[string]string
	}{
		{"source", &srcLogs, m.src, map[string]string{
			logKeyReporter: "source", logKeySrcAddr: "10.0.0.3:40000", logKeyDstAddr: meshAppAddr.String(),
			logKeyDstHBONE: m.hboneAddr.String(), logKeySrcWl: "sleep", logKeySrcNs: "default", logKeySrcID: sleepID,
			logKeyDstWl: "productpage", logKeyDstNs: "default", logKeyDstID: ppID, logKeyProtocol: protocolHBONE,
			logKeySent: "1", logKeyRecv: "1",
		}},
		{"destination", &dstLogs, m.dst, map[string]string{
			logKeyReporter: "destination", logKeySrcAddr: "10.0.0.3:40000", logKeyDstAddr: meshAppAddr.String(),
			logKeySrcWl: "sleep", logKeySrcNs: "default", logKeySrcID: sleepID,
			logKeyDstWl: "productpage", logKeyDstNs: "default", logKeyDstID: ppID, logKeyProtocol: protocolHBONE,
			logKeySent: "1", logKeyRecv: "1",
		}},
	} {
		var lines []map[string]any
		testutil.Eventually(t, "the "+side.name+" ztunnel's access-log line", func() bool {
			lines = side.logs.lines()
			return len(lines) > 0
		})
		line := lines[0]
		for k, want := range side.log {
			if got := fmt.Sprint(line[k]); got != want {
				t.Errorf("%s access log %s = %s, want %s", side.name, k, got, want)
			}
		}
		for _, k := range []string{logKeyError, logKeyDstSvc} {
			if v, ok := line[k]; ok {
				t.Errorf("%s access log %s = %v, want none", side.name, k, v)
			}
		}
		if _, ok := line[logKeyDstHBONE]; ok && side.name == "destination" {
			t.Errorf("destination access log has %s", logKeyDstHBONE)
		}
		if len(lines) != 1 {
			t.Errorf("%s access log: %d lines, want 1", side.name, len(lines))
		}

		want := map[string]string{
			"reporter": side.name, "source_workload": "sleep", "source_workload_namespace": "default",
			"source_principal": sleepID, "destination_workload": "productpage", "destination_workload_namespace": "default",
			"destination_principal": ppID, "destination_service": "unknown", "request_protocol": "tcp",
			"response_flags": "-", "connection_security_policy": "mutual_tls",
		}
		for name, v := range map[string]float64{
			"istio_tcp_connections_opened_total": 1, "istio_tcp_connections_closed_total": 1,
			"istio_tcp_received_bytes_total": 1, "istio_tcp_sent_bytes_total": 1,
		} {
			got := counters(t, side.p, name)
			if len(got) != 1 || !maps.Equal(got[0].labels, want) || got[0].value != v {
				t.Errorf("%s %s = %+v, want one series %v = %v", side.name, name, got, want, v)
			}
		}
	}
}

// counter is one series of a counter family.
type counter struct {
	labels map[string]string
	value  float64
}

// counters returns the series of p's counter family name.
func counters(t *testing.T, p *Proxy, name string) []counter {
	t.Helper()
	mfs, err := p.Metrics().Registry().Gather()
	if err != nil {
		t.Fatal(err)
	}
	var out []counter
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
		for _, m := range mf.GetMetric() {
			c := counter{labels: map[string]string{}, value: m.GetCounter().GetValue()}
			for _, l := range m.GetLabel() {
				c.labels[l.GetName()] = l.GetValue()
			}
			out = append(out, c)
		}
	}
	return out
}
