package bpf_test

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/netip"
	"testing"
	"time"

	"github.com/vishvananda/netlink"

	"github.com/amber-mesh/amber/bpf"
	"github.com/amber-mesh/amber/internal/tcptest"
	"github.com/amber-mesh/amber/internal/testutil"
	"github.com/amber-mesh/amber/test/meshbed"
	"github.com/amber-mesh/amber/test/privileged"
	"github.com/amber-mesh/amber/test/testbed"
	"github.com/amber-mesh/amber/test/tproxy"
)

// node is a testbed node running the datapath: programs on its uplink and
// on every pod veth, host routing in its namespace, pins of its own.
type node struct{ *meshbed.Node }

func mustDatapath(tb testing.TB, n *testbed.Node) *node {
	tb.Helper()
	return &node{meshbed.MustLoadDatapath(tb, n, "amber-test")}
}

func (nd *node) proxy(tb testing.TB, preserve bool) *tproxy.Proxy {
	tb.Helper()
	px, err := tproxy.Start(tproxy.Options{Do: nd.Do, PreserveSource: preserve})
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { px.Close() })
	if err := px.Register(nd.Root); err != nil {
		tb.Fatal(err)
	}
	return px
}

func (nd *node) counters(tb testing.TB) bpf.Counters {
	tb.Helper()
	c, err := nd.DP.Counters()
	if err != nil {
		tb.Fatal(err)
	}
	return c
}

// echoServer listens in a pod and echoes; it reports each peer address.
type echoServer struct {
	ln    net.Listener
	peers chan netip.AddrPort
}

func mustEcho(tb testing.TB, p *testbed.Pod, port int) *echoServer {
	tb.Helper()
	ln, err := p.Listen("tcp", fmt.Sprintf("[::]:%d", port))
	if err != nil {
		tb.Fatal(err)
	}
	s := &echoServer{ln: ln, peers: make(chan netip.AddrPort, 1024)}
	tcptest.Serve(tb, ln, func(c net.Conn) {
		ap := c.RemoteAddr().(*net.TCPAddr).AddrPort()
		s.peers <- netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
		io.Copy(c, c)
	})
	return s
}

// roundTrip dials from a pod (or node) and checks the echo.
func roundTrip(ctx context.Context, dial func(context.Context, string, string) (net.Conn, error), addr netip.AddrPort) error {
	ctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	c, err := dial(ctx, "tcp", addr.String())
	if err != nil {
		return err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(2 * time.Second))
	msg := []byte("hello " + addr.String())
	if _, err := c.Write(msg); err != nil {
		return err
	}
	buf := make([]byte, len(msg))
	if _, err := io.ReadFull(c, buf); err != nil {
		return err
	}
	if string(buf) != string(msg) {
		return fmt.Errorf("echo mismatch: %q", buf)
	}
	return nil
}

func lastEvent(tb testing.TB, px *tproxy.Proxy) tproxy.Event {
	tb.Helper()
	ev := px.Events()
	if len(ev) == 0 {
		tb.Fatal("proxy saw no connection")
	}
	return ev[len(ev)-1]
}

// waitEvents waits until the proxy has recorded n connections: a client's
// dial returns once the proxy accepted, before it dialed upstream.
func waitEvents(tb testing.TB, px *tproxy.Proxy, n int) {
	tb.Helper()
	testutil.Eventually(tb, fmt.Sprintf("%d connections at the proxy", n), func() bool { return len(px.Events()) >= n })
	if got := len(px.Events()); got != n {
		tb.Fatalf("proxy saw %d connections, want %d", got, n)
	}
}

func moved(before, after bpf.Counters, name string) uint64 {
	return after[name] - before[name]
}

// TestPrivilegedCapture runs real traffic between pods on two nodes through
// the capture programs and a transparent proxy standing in for the ztunnel.
func TestPrivilegedCapture(t *testing.T) {
	privileged.Require(t)
	ctx := context.Background()
	n1, n2 := testbed.MustTwoNodes(t)
	a, _ := n1.AddPod("a")   // captured
	a2, _ := n1.AddPod("a2") // captured, same node
	c, _ := n1.AddPod("c")   // not captured, same node
	b, err := n2.AddPod("b") // not captured, other node (no datapath there)
	if err != nil || a == nil || a2 == nil || c == nil {
		t.Fatalf("pods: %v", err)
	}
	node1 := mustDatapath(t, n1)
	node1.MustCapture(t, a)
	node1.MustCapture(t, a2)

	echoB := mustEcho(t, b, 8080)
	echoA := mustEcho(t, a, 8080)
	echoA2 := mustEcho(t, a2, 8080)

	t.Run("fail closed without listener", func(t *testing.T) {
		before := node1.counters(t)
		err := roundTrip(ctx, a.Dial, netip.AddrPortFrom(b.IPv4, 8080))
		if err == nil {
			t.Fatal("captured pod reached another pod with no ztunnel listener registered")
		}
		if len(echoB.peers) != 0 {
			t.Fatal("server saw a connection")
		}
		if moved(before, node1.counters(t), "drop_no_listener") == 0 {
			t.Error("drop_no_listener did not count")
		}
		// Inbound too: a plaintext client may not reach a captured pod.
		if err := roundTrip(ctx, c.Dial, netip.AddrPortFrom(a.IPv4, 8080)); err == nil {
			t.Fatal("uncaptured pod reached a captured pod with no listener")
		}
		if len(echoA.peers) != 0 {
			t.Fatal("captured server saw a plaintext connection")
		}
	})

	px := node1.proxy(t, true)

	for _, v6 := range []bool{false, true} {
		ip := func(p *testbed.Pod) netip.Addr {
			if v6 {
				return p.IPv6
			}
			return p.IPv4
		}
		fam := map[bool]string{false: "ipv4", true: "ipv6"}[v6]

		t.Run(fam+"/outbound to other node", func(t *testing.T) {
			dst := netip.AddrPortFrom(ip(b), 8080)
			if err := roundTrip(ctx, a.Dial, dst); err != nil {
				t.Fatal(err)
			}
			ev := lastEvent(t, px)
			if ev.Listener != bpf.Outbound || ev.OrigDst != dst || ev.Src.Addr() != ip(a) {
				t.Fatalf("proxy saw %+v, want outbound %s from %s", ev, dst, ip(a))
			}
			// Source preserved: the reply came back through the uplink's
			// established lookup to the proxy's socket.
			if peer := <-echoB.peers; peer.Addr() != ip(a) {
				t.Fatalf("server saw peer %s, want the client pod %s", peer, ip(a))
			}
		})
		t.Run(fam+"/outbound to same node", func(t *testing.T) {
			dst := netip.AddrPortFrom(ip(a2), 8080)
			if err := roundTrip(ctx, a.Dial, dst); err != nil {
				t.Fatal(err)
			}
			if ev := lastEvent(t, px); ev.Listener != bpf.Outbound || ev.OrigDst != dst {
				t.Fatalf("proxy saw %+v", ev)
			}
			<-echoA2.peers
		})
		t.Run(fam+"/inbound from uncaptured pod on same node", func(t *testing.T) {
			dst := netip.AddrPortFrom(ip(a), 8080)
			if err := roundTrip(ctx, c.Dial, dst); err != nil {
				t.Fatal(err)
			}
			if ev := lastEvent(t, px); ev.Listener != bpf.Inbound || ev.OrigDst != dst || ev.Src.Addr() != ip(c) {
				t.Fatalf("proxy saw %+v", ev)
			}
			<-echoA.peers
		})
		t.Run(fam+"/inbound from other node", func(t *testing.T) {
			dst := netip.AddrPortFrom(ip(a), 8080)
			if err := roundTrip(ctx, b.Dial, dst); err != nil {
				t.Fatal(err)
			}
			if ev := lastEvent(t, px); ev.Listener != bpf.Inbound || ev.OrigDst != dst || ev.Src.Addr() != ip(b) {
				t.Fatalf("proxy saw %+v", ev)
			}
			<-echoA.peers
		})
		t.Run(fam+"/hbone port from other node", func(t *testing.T) {
			dst := netip.AddrPortFrom(ip(a), bpf.HBONEPort)
			cctx, cancel := context.WithTimeout(ctx, 2*time.Second)
			defer cancel()
			conn, err := b.Dial(cctx, "tcp", dst.String())
			if err != nil {
				t.Fatal(err)
			}
			conn.Close()
			testutil.Eventually(t, "the hbone listener getting "+dst.String(), func() bool {
				ev := lastEvent(t, px)
				return ev.Listener == bpf.HBONE && ev.OrigDst == dst
			})
		})
		t.Run(fam+"/uncaptured traffic untouched", func(t *testing.T) {
			n := len(px.Events())
			dst := netip.AddrPortFrom(ip(b), 8080)
			if err := roundTrip(ctx, c.Dial, dst); err != nil {
				t.Fatal(err)
			}
			if peer := <-echoB.peers; peer.Addr() != ip(c) {
				t.Fatalf("peer %s", peer)
			}
			if len(px.Events()) != n {
				t.Fatal("proxy saw uncaptured traffic")
			}
		})
		t.Run(fam+"/host to captured pod not captured", func(t *testing.T) {
			// A kubelet probe: the node itself connects to the pod.
			n := len(px.Events())
			if err := roundTrip(ctx, n1.Dial, netip.AddrPortFrom(ip(a), 8080)); err != nil {
				t.Fatal(err)
			}
			<-echoA.peers
			if len(px.Events()) != n {
				t.Fatal("proxy saw host traffic")
			}
		})
	}

	t.Run("spoofed source dropped", func(t *testing.T) {
		before := node1.counters(t)
		// The captured pod claims another address: add it and bind to it.
		fake := netip.MustParseAddr("198.19.1.222")
		if err := a.Do(func() error { return addAddr("eth0", fake) }); err != nil {
			t.Fatal(err)
		}
		d := func(ctx context.Context, network, address string) (net.Conn, error) {
			var conn net.Conn
			err := a.Do(func() (err error) {
				dl := net.Dialer{LocalAddr: &net.TCPAddr{IP: fake.AsSlice()}}
				dl.SetMultipathTCP(false)
				conn, err = dl.DialContext(ctx, network, address)
				return err
			})
			return conn, err
		}
		if err := roundTrip(ctx, d, netip.AddrPortFrom(b.IPv4, 8080)); err == nil {
			t.Fatal("spoofed connection went through")
		}
		if moved(before, node1.counters(t), "drop_spoofed") == 0 {
			t.Error("drop_spoofed did not count")
		}
	})
}

func addAddr(dev string, a netip.Addr) error {
	l, err := netlink.LinkByName(dev)
	if err != nil {
		return err
	}
	return netlink.AddrAdd(l, &netlink.Addr{IPNet: &net.IPNet{IP: a.AsSlice(), Mask: net.CIDRMask(a.BitLen(), a.BitLen())}})
}
