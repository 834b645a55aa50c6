package e2e

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
	"golang.org/x/sys/unix"

	"github.com/amber-mesh/amber/internal/testutil"
	"github.com/amber-mesh/amber/test/meshbed"
	"github.com/amber-mesh/amber/test/testbed"
	"github.com/amber-mesh/amber/tunnel/ca"
	"github.com/amber-mesh/amber/tunnel/certs"
	"github.com/amber-mesh/amber/tunnel/identity"
)

// boundsBed is what the tests of this file attack: two nodes with the
// datapath; on n1 the captured client sleep, the plain (uncaptured) TCP
// workload plain and mallory, an uncaptured pod the mesh does not know —
// anyone who can route to a pod; on n2 the captured productpage.
type boundsBed struct {
	n1, n2                             *testbed.Node
	node1, node2                       *meshbed.Node
	sleep, plain, mallory, productpage *testbed.Pod
	caDir, meshFile                    string
}

func newBoundsBed(t *testing.T) *boundsBed {
	t.Helper()
	b := &boundsBed{}
	b.n1, b.n2 = testbed.MustTwoNodes(t)
	var err error
	for _, p := range []struct {
		n   *testbed.Node
		pod **testbed.Pod
		nm  string
	}{{b.n1, &b.sleep, "sleep"}, {b.n1, &b.plain, "plain"}, {b.n1, &b.mallory, "mallory"}, {b.n2, &b.productpage, "productpage"}} {
		if *p.pod, err = p.n.AddPod(p.nm); err != nil {
			t.Fatal(err)
		}
	}
	b.node1, b.node2 = meshbed.MustLoadDatapath(t, b.n1, "amber-e2e"), meshbed.MustLoadDatapath(t, b.n2, "amber-e2e")
	b.node1.MustCapture(t, b.sleep)
	b.node2.MustCapture(t, b.productpage)
	dir := t.TempDir()
	b.caDir = filepath.Join(dir, "ca")
	if _, err := ca.OpenLocal(b.caDir, "cluster.local"); err != nil {
		t.Fatal(err)
	}
	b.meshFile = filepath.Join(dir, "mesh.yaml")
	mesh := meshbed.MeshYAML([]meshbed.Workload{
		{Name: "sleep", ServiceAccount: "sleep", Pod: b.sleep, HBONE: true},
		{Name: "productpage", ServiceAccount: "productpage", Pod: b.productpage, HBONE: true},
		{Name: "plain", Pod: b.plain},
	}, "")
	if err := os.WriteFile(b.meshFile, []byte(mesh), 0o644); err != nil {
		t.Fatal(err)
	}
	return b
}

// logLines returns the ztunnel's log lines (JSON) whose message contains
// msg and whose attributes include want.
func (z *ztunnel) logLines(msg string, want map[string]string) []string {
	var out []string
	for _, line := range strings.Split(z.log.String(), "\n") {
		if !strings.Contains(line, msg) {
			continue
		}
		ok := true
		for k, v := range want {
			if !strings.Contains(line, fmt.Sprintf("%q:%q", k, v)) {
				ok = false
			}
		}
		if ok {
			out = append(out, line)
		}
	}
	return out
}

// TestPrivilegedListenersOnlyThroughCapture: the outbound and inbound
// listeners serve what the datapath captured and nothing else. From the
// network they cannot be reached at all (they listen on loopback), and a
// connection made to them on the node itself is reset at once — not held
// for the 5 s a new pod's workload is waited for and logged as a failure.
func TestPrivilegedListenersOnlyThroughCapture(t *testing.T) {
	b := newBoundsBed(t)
	z1 := mustZtunnel(t, b.node1, b.meshFile, b.caDir)
	mustEcho(t, b.plain, 9080)
	mustEcho(t, b.sleep, 9080)

	for _, port := range []uint16{15001, 15006} {
		for _, a := range []netip.Addr{b.n1.IPv4, b.n1.IPv6} {
			dst := netip.AddrPortFrom(a, port)
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
			c, err := b.n2.Dial(ctx, "tcp", dst.String())
			cancel()
			if err == nil {
				c.Close()
				t.Errorf("node n2 connected to %s: the listener is reachable from the network", dst)
			} else if !errors.Is(err, syscall.ECONNREFUSED) {
				t.Errorf("dial %s from n2: %v, want connection refused", dst, err)
			}
		}
		for _, a := range []netip.Addr{netip.IPv6Loopback(), netip.MustParseAddr("127.0.0.1")} {
			dst := netip.AddrPortFrom(a, port)
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
			c, err := b.n1.Dial(ctx, "tcp", dst.String())
			cancel()
			if err == nil {
				c.SetReadDeadline(time.Now().Add(2 * time.Second))
				_, err = c.Read(make([]byte, 1))
				c.Close()
			}
			if !errors.Is(err, syscall.ECONNRESET) {
				t.Errorf("%s from the node itself: %v, want reset at once", dst, err)
			}
		}
	}
	if got := z1.metric(t, "amber_proxy_refused_total", map[string]string{"reason": "not_captured"}); got != 4 {
		t.Errorf("amber_proxy_refused_total{reason=not_captured} = %v, want 4", got)
	}
	// Captured connections still reach both listeners, in both families.
	for _, v6 := range []bool{false, true} {
		ip := func(p *testbed.Pod) netip.Addr {
			if v6 {
				return p.IPv6
			}
			return p.IPv4
		}
		if err := roundTrip(b.sleep, netip.AddrPortFrom(ip(b.plain), 9080), "outbound"); err != nil {
			t.Errorf("sleep → plain through 15001: %v", err)
		}
		if err := roundTrip(b.mallory, netip.AddrPortFrom(ip(b.sleep), 9080), "inbound"); err != nil {
			t.Errorf("mallory → sleep through 15006: %v", err)
		}
	}
	if lines := z1.logLines("connection complete", map[string]string{"level": "WARN"}); len(lines) != 0 {
		t.Errorf("warnings in the access log:\n%s", strings.Join(lines, "\n"))
	}
}

// TestPrivilegedOutOfDescriptors lowers a running ztunnel's descriptor
// limit and connects until it runs out: the ztunnel keeps running, leaves
// the connection it cannot accept waiting in the kernel's queue (never
// half-served, never let through), logs one warning for the burst, counts
// it, and serves the waiting connection and new ones once descriptors are
// free again.
func TestPrivilegedOutOfDescriptors(t *testing.T) {
	b := newBoundsBed(t)
	z1 := mustZtunnel(t, b.node1, b.meshFile, b.caDir)
	mustZtunnel(t, b.node2, b.meshFile, b.caDir)
	mustHoldingEcho(t, b.productpage, 9080)
	dst := netip.AddrPortFrom(b.productpage.IPv4, 9080)

	// Over HBONE every connection after the first costs the source
	// ztunnel exactly one descriptor, its accepted socket (the tunnel
	// shares the pool's connection; an idle one waits in the parker).
	pid := z1.Cmd.Process.Pid
	ents, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	if err != nil {
		t.Fatal(err)
	}
	lim := uint64(len(ents) + 4)
	if err := unix.Prlimit(pid, unix.RLIMIT_NOFILE, &unix.Rlimit{Cur: lim, Max: lim}, nil); err != nil {
		t.Fatal(err)
	}

	var served []*held
	var queued *held
	var queuedEcho chan error
	for i := 0; queued == nil; i++ {
		if i == 20 {
			t.Fatalf("%d connections served with %d descriptors: the limit did not take", i, lim)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		c, err := b.sleep.Dial(ctx, "tcp", dst.String())
		cancel()
		if err != nil {
			// The kernel completes the handshake as long as a listener
			// is registered, whatever the ztunnel does with it.
			if exited, xerr := z1.Exited(); exited {
				t.Fatalf("ztunnel exited out of descriptors (%v): %v\n%s", xerr, err, z1.log)
			}
			t.Fatal(err)
		}
		h := &held{Conn: c, name: fmt.Sprintf("connection %d", i)}
		t.Cleanup(func() { h.Close() })
		echoed := make(chan error, 1)
		go func() { echoed <- h.echo("x") }()
		var res error
		done := false
		testutil.Eventually(t, "an echo or a failed accept", func() bool {
			select {
			case res = <-echoed:
				done = true
				return true
			default:
			}
			if exited, err := z1.Exited(); exited {
				t.Fatalf("ztunnel exited out of descriptors: %v\n%s", err, z1.log)
			}
			return len(z1.logLines("accept failed", map[string]string{"listener": "outbound"})) > 0
		})
		switch {
		case !done:
			queued, queuedEcho = h, echoed
		case res != nil:
			if exited, xerr := z1.Exited(); exited {
				t.Fatalf("ztunnel exited out of descriptors (%v); %s: %v\n%s", xerr, h.name, res, z1.log)
			}
			t.Fatalf("%s: %v", h.name, res)
		default:
			served = append(served, h)
		}
	}
	if len(served) == 0 {
		t.Fatal("no connection was served before the ztunnel ran out")
	}
	select {
	case err := <-queuedEcho:
		t.Fatalf("the connection the ztunnel could not accept got %v", err)
	default:
	}
	// Free a descriptor: the waiting connection is accepted and served.
	served[0].Close()
	select {
	case err := <-queuedEcho:
		if err != nil {
			t.Fatalf("waiting connection after a descriptor was freed: %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("waiting connection not served after a descriptor was freed")
	}
	for _, h := range served[1:] {
		h.Close()
	}
	queued.Close()
	if err := roundTrip(b.sleep, dst, "after"); err != nil {
		t.Fatalf("new connection after the shortage: %v", err)
	}
	if exited, err := z1.Exited(); exited {
		t.Fatalf("ztunnel exited: %v", err)
	}
	if got := z1.metric(t, "amber_accept_errors_total", map[string]string{"listener": "outbound", "errno": "EMFILE"}); got < 1 {
		t.Errorf("amber_accept_errors_total{listener=outbound,errno=EMFILE} = %v, want ≥ 1", got)
	}
	if lines := z1.logLines("accept failed", nil); len(lines) != 1 || !strings.Contains(lines[0], `"level":"WARN"`) {
		t.Errorf("accept failures logged as %d lines, want one warning:\n%s", len(lines), strings.Join(lines, "\n"))
	}
}

// floodRSSBound is the most the flood below may add to the destination
// ztunnel's resident memory (README, "Security bounds"): one source holds
// at most 256 connections in their handshake (≈ 6 KiB each while silent),
// the rest are reset at accept.
const floodRSSBound = 24 << 20

// TestPrivilegedHandshakeFlood: an uncaptured pod opens 20 000 TCP
// connections to a captured pod's HBONE port and never says anything,
// keeping the latest 12 000 open (the test process may hold 20 000
// descriptors in all). The destination ztunnel's memory stays bounded,
// the excess is reset and counted, and a client elsewhere still gets its
// tunnel within a second while the flood goes on.
func TestPrivilegedHandshakeFlood(t *testing.T) {
	b := newBoundsBed(t)
	mustZtunnel(t, b.node1, b.meshFile, b.caDir)
	z2 := mustZtunnel(t, b.node2, b.meshFile, b.caDir)
	mustEcho(t, b.productpage, 9080)
	base, err := z2.RSS()
	if err != nil {
		t.Fatal(err)
	}

	const total, keep, workers = 20000, 12000, 8
	target := netip.AddrPortFrom(b.productpage.IPv4, 15008).String()
	var (
		mu     sync.Mutex
		conns  []net.Conn
		opened atomic.Int64
		peak   atomic.Int64
		wg     sync.WaitGroup
	)
	peak.Store(base)
	t.Cleanup(func() {
		mu.Lock()
		defer mu.Unlock()
		for _, c := range conns {
			c.Close()
		}
	})
	legit := make(chan error, 1)
	dialErrs := make(chan error, workers)
	for range workers {
		wg.Go(func() {
			for {
				i := opened.Add(1)
				if i > total {
					return
				}
				ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
				c, err := b.mallory.Dial(ctx, "tcp", target)
				cancel()
				if err != nil && !errors.Is(err, syscall.ECONNRESET) {
					dialErrs <- fmt.Errorf("flood connection %d: %w", i, err)
					return
				}
				if c != nil {
					mu.Lock()
					conns = append(conns, c)
					if len(conns) > keep {
						conns[0].Close()
						conns = conns[1:]
					}
					mu.Unlock()
				}
				if i%500 == 0 {
					if rss, err := z2.RSS(); err == nil && rss > peak.Load() {
						peak.Store(rss)
					}
				}
				if i == total/2 {
					go func() {
						start := time.Now()
						err := roundTripWithin(b.sleep, netip.AddrPortFrom(b.productpage.IPv4, 9080), "legit", time.Second)
						if err != nil {
							err = fmt.Errorf("after %v: %w", time.Since(start).Round(time.Millisecond), err)
						}
						legit <- err
					}()
				}
			}
		})
	}
	wg.Wait()
	close(dialErrs)
	for err := range dialErrs {
		t.Fatal(err)
	}
	if rss, err := z2.RSS(); err == nil && rss > peak.Load() {
		peak.Store(rss)
	}
	if err := <-legit; err != nil {
		t.Errorf("legitimate CONNECT during the flood: %v", err)
	}
	grown := peak.Load() - base
	t.Logf("ztunnel RSS %d MiB before the flood, %d MiB at its peak", base>>20, peak.Load()>>20)
	if grown > floodRSSBound {
		t.Errorf("ztunnel RSS grew by %d MiB during the flood, bound %d MiB", grown>>20, floodRSSBound>>20)
	}
	if got := z2.metric(t, "amber_hbone_events_total", map[string]string{"event": "handshakes_refused_per_source"}); got < total/2 {
		t.Errorf("amber_hbone_events_total{event=handshakes_refused_per_source} = %v, want most of the %d", got, total)
	}
	if exited, err := z2.Exited(); exited {
		t.Fatalf("ztunnel exited: %v", err)
	}
}

// TestPrivilegedCancelledConnect: a peer with a mesh identity opens
// CONNECT streams and resets each at once (the rapid-reset shape). They
// are reported as cancelled by their client (response flag DC, INFO), not
// as upstream failures: no upstream_errors, no CONNECT flag, no warning.
func TestPrivilegedCancelledConnect(t *testing.T) {
	b := newBoundsBed(t)
	z2 := mustZtunnel(t, b.node2, b.meshFile, b.caDir)
	mustEcho(t, b.productpage, 9080)
	local, err := ca.OpenLocal(b.caDir, "cluster.local")
	if err != nil {
		t.Fatal(err)
	}
	mgr := &certs.Manager{CA: local}
	t.Cleanup(func() { mgr.Close() })
	src, _ := identity.Parse(sleepID)
	dst, _ := identity.Parse(productpageID)

	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	nc, err := b.mallory.Dial(ctx, "tcp", netip.AddrPortFrom(b.productpage.IPv4, 15008).String())
	if err != nil {
		t.Fatal(err)
	}
	tc := tls.Client(nc, mgr.ClientConfig(src, dst))
	defer tc.Close()
	tc.SetDeadline(time.Now().Add(10 * time.Second))
	if err := tc.HandshakeContext(ctx); err != nil {
		t.Fatal(err)
	}
	fr := http2.NewFramer(tc, tc)
	fr.ReadMetaHeaders = hpack.NewDecoder(4096, nil)
	io.WriteString(tc, http2.ClientPreface)
	fr.WriteSettings()
	var hbuf bytes.Buffer
	enc := hpack.NewEncoder(&hbuf)
	enc.WriteField(hpack.HeaderField{Name: ":method", Value: "CONNECT"})
	enc.WriteField(hpack.HeaderField{Name: ":authority", Value: netip.AddrPortFrom(b.productpage.IPv4, 9080).String()})
	// Fewer than the server's stream and reset budgets: every stream is
	// handled, none refused.
	const streams = 100
	for id := uint32(1); id < 2*streams; id += 2 {
		if err := fr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: hbuf.Bytes(), EndHeaders: true}); err != nil {
			t.Fatal(err)
		}
		if err := fr.WriteRSTStream(id, http2.ErrCodeCancel); err != nil {
			t.Fatal(err)
		}
	}
	// One line per stream, whatever its end: cancelled before the
	// upstream connection, or just after.
	from := map[string]string{"src.addr": b.mallory.IPv4.String()}
	testutil.Eventually(t, "an access-log line per stream", func() bool { return len(z2.accessLogs(from)) == streams })
	cancelled, loud := 0, 0
	for _, l := range z2.accessLogs(from) {
		if l["level"] != "INFO" {
			if loud++; loud == 1 {
				t.Errorf("a stream its client reset logged at %v: %v", l["level"], l)
			}
		}
		if e, _ := l["error"].(string); strings.Contains(e, "cancelled") {
			cancelled++
		}
	}
	if loud > 0 {
		t.Errorf("%d of %d streams logged above INFO", loud, streams)
	}
	if cancelled == 0 {
		t.Error("no stream was reported cancelled by its client")
	}
	if got := z2.metric(t, "amber_proxy_refused_total", map[string]string{"reason": "upstream_errors"}); got != 0 {
		t.Errorf("amber_proxy_refused_total{reason=upstream_errors} = %v after client resets, want 0", got)
	}
	if got := z2.metric(t, "istio_tcp_connections_opened_total", map[string]string{"response_flags": "CONNECT"}); got > 0 {
		t.Errorf("istio_tcp_connections_opened_total{response_flags=CONNECT} = %v after client resets, want none", got)
	}
	dc := z2.metric(t, "istio_tcp_connections_opened_total", map[string]string{"response_flags": "DC", "source_principal": sleepID})
	if int(dc) != cancelled {
		t.Errorf("istio_tcp_connections_opened_total{response_flags=DC} = %v, want the %d cancelled streams", dc, cancelled)
	}
	if got := z2.metric(t, "amber_proxy_refused_total", map[string]string{"reason": "client_cancelled"}); int(got) != cancelled {
		t.Errorf("amber_proxy_refused_total{reason=client_cancelled} = %v, want %d", got, cancelled)
	}
}
