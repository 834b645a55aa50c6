package e2e

import (
	"bytes"
	"context"
	"crypto/rand"
	"fmt"
	"io"
	"net"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/amber-mesh/amber/internal/testutil"
	"github.com/amber-mesh/amber/test/meshbed"
	"github.com/amber-mesh/amber/test/testbed"
)

// kubeProxyNAT is a node's nftables ruleset that translates Service
// addresses (keys) to endpoints as kube-proxy's nftables mode does: DNAT in
// prerouting for pods, in output for the node's own connections. It also
// puts conntrack on every packet of the node, as on a real node.
func kubeProxyNAT(services map[netip.AddrPort]netip.AddrPort) string {
	rules := dnatRules(services, "")
	return fmt.Sprintf(`table inet amber-e2e-kube-proxy {
	chain prerouting {
		type nat hook prerouting priority -100; policy accept;
%s	}
	chain output {
		type nat hook output priority -100; policy accept;
%s	}
}
`, rules, rules)
}

// dnatRules are nftables rules translating each key to its value, each
// running stmt (if any) first.
func dnatRules(m map[netip.AddrPort]netip.AddrPort, stmt string) string {
	var rules strings.Builder
	for from, to := range m {
		fam := "ip"
		if from.Addr().Is6() {
			fam = "ip6"
		}
		fmt.Fprintf(&rules, "\t\t%s daddr %s tcp dport %d %sdnat %s to %s\n", fam, from.Addr(), from.Port(), stmt, fam, to)
	}
	return rules.String()
}

// addHostAddr puts a on the node's loopback: one more address of the node.
func addHostAddr(n *testbed.Node, a netip.Addr) error {
	return n.Do(func() error {
		lo, err := netlink.LinkByName("lo")
		if err != nil {
			return err
		}
		na := &netlink.Addr{IPNet: &net.IPNet{IP: a.AsSlice(), Mask: net.CIDRMask(a.BitLen(), a.BitLen())}}
		if a.Is6() {
			na.Flags = unix.IFA_F_NODAD
		}
		return netlink.AddrAdd(lo, na)
	})
}

// TestPrivilegedNodeLocalDestination: a captured pod reaches servers in its
// own node's namespace — on the node's address, and behind a Service
// address the node translates to one of its addresses, as the API server
// behind the `kubernetes` Service on a control-plane node — through the
// ztunnel, which presents the pod's own address as the source, as Istio's
// in-pod ztunnel does. Before the fix the server's SYN-ACK went out of the
// pod's veth to the pod and the connection hung. The node's own
// connections to pods and uncaptured pods stay untouched.
func TestPrivilegedNodeLocalDestination(t *testing.T) {
	bed := testbed.New(t)
	n1, err := bed.AddNode("n1")
	if err != nil {
		t.Fatal(err)
	}
	client, err1 := n1.AddPod("client") // captured
	plain, err2 := n1.AddPod("plain")   // not captured
	for _, err := range []error{err1, err2} {
		if err != nil {
			t.Fatal(err)
		}
	}
	// The API server's address on the node, the Service address kube-proxy
	// translates to it, and the rules that do so.
	api4, api6 := netip.MustParseAddr("198.18.1.1"), netip.MustParseAddr("2001:db8:101::1")
	vip4, vip6 := netip.AddrPortFrom(netip.MustParseAddr("198.18.100.1"), 443), netip.AddrPortFrom(netip.MustParseAddr("2001:db8:100::1"), 443)
	// A Service whose endpoint is a pod: the ztunnel's socket takes the
	// pod's (foreign) address, which the datapath finds through conntrack.
	web4, web6 := netip.AddrPortFrom(netip.MustParseAddr("198.18.100.2"), 80), netip.AddrPortFrom(netip.MustParseAddr("2001:db8:100::2"), 80)
	const hostPort, webPort = 7070, 9080
	for _, a := range []netip.Addr{api4, api6} {
		if err := addHostAddr(n1, a); err != nil {
			t.Fatal(err)
		}
	}
	nft := n1.Command(context.Background(), "nft", "-f", "-")
	nft.Stdin = strings.NewReader(kubeProxyNAT(map[netip.AddrPort]netip.AddrPort{
		vip4: netip.AddrPortFrom(api4, hostPort), vip6: netip.AddrPortFrom(api6, hostPort),
		web4: netip.AddrPortFrom(plain.IPv4, webPort), web6: netip.AddrPortFrom(plain.IPv6, webPort),
	}))
	if out, err := nft.CombinedOutput(); err != nil {
		t.Fatalf("nft: %v: %s", err, out)
	}

	node1 := meshbed.MustLoadDatapath(t, n1, "amber-e2e")
	node1.MustCapture(t, client)
	// istiod describes the endpoints of a Service without a selector (the
	// API server's) as workloads from its EndpointSlice: plain TCP, no
	// identity of the mesh.
	z := mustLocalMesh(t, meshbed.MeshYAML([]meshbed.Workload{
		{Name: "client", ServiceAccount: "client", Pod: client, HBONE: true},
	}, fmt.Sprintf(`  - name: kube-apiserver
    addresses: [%q, %q]
    node: %s
    protocol: TCP
    services: [{service: kubernetes}]
  - name: web
    addresses: [%q, %q]
    node: %s
    protocol: TCP
    services: [{service: web}]
services:
  - name: kubernetes
    addresses: [%q, %q]
    ports: [{port: 443, targetPort: %d}]
  - name: web
    addresses: [%q, %q]
    ports: [{port: 80, targetPort: %d}]
`, api4, api6, n1.Name, plain.IPv4, plain.IPv6, n1.Name, vip4.Addr(), vip6.Addr(), hostPort, web4.Addr(), web6.Addr(), webPort)), node1)[0]

	// A host-network server: every address of the node, both families.
	hostEcho := mustEcho(t, n1, hostPort)
	podEcho := mustEcho(t, client, 8080)
	podEchoHigh := mustEcho(t, client, 62000) // a port the ztunnel dials from
	webEcho := mustEcho(t, plain, webPort)

	for _, v6 := range []bool{false, true} {
		ip := func(p *testbed.Pod) netip.Addr {
			if v6 {
				return p.IPv6
			}
			return p.IPv4
		}
		nodeIP, vip, web := n1.IPv4, vip4, web4
		if v6 {
			nodeIP, vip, web = n1.IPv6, vip6, web6
		}
		family := map[bool]string{false: "ipv4", true: "ipv6"}[v6]
		nodeDst := netip.AddrPortFrom(nodeIP, hostPort)
		var unproxied []netip.AddrPort // sources of connections the ztunnel must not see

		t.Run(family+"/uncaptured pod to the node, not proxied", func(t *testing.T) {
			if err := roundTrip(plain, nodeDst, "plain "+family); err != nil {
				t.Fatal(err)
			}
			got := hostEcho.lastPeer(t)
			if got.Addr() != ip(plain) {
				t.Errorf("host server saw %s, want the pod's %s", got, ip(plain))
			}
			unproxied = append(unproxied, got)
		})
		t.Run(family+"/node to the captured pod, not captured", func(t *testing.T) {
			// A kubelet probe, and the same at a port of the ztunnel's
			// dial range, where the egress program looks for its sockets.
			for _, s := range []struct {
				port int
				echo *echoServer
			}{{8080, podEcho}, {62000, podEchoHigh}} {
				dst := netip.AddrPortFrom(ip(client), uint16(s.port))
				ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
				c, err := n1.Dial(ctx, "tcp", dst.String())
				cancel()
				if err != nil {
					t.Fatalf("node to %s: %v", dst, err)
				}
				src := netip.MustParseAddrPort(c.LocalAddr().String())
				if err := echoOver(c, "probe"); err != nil {
					t.Fatalf("node to %s: %v", dst, err)
				}
				if got := s.echo.lastPeer(t); got.Addr() != src.Addr().Unmap() {
					t.Errorf("pod server saw %s, want the node's %s", got, src)
				}
				unproxied = append(unproxied, netip.AddrPortFrom(src.Addr().Unmap(), src.Port()))
			}
		})
		t.Run(family+"/captured pod to the node's address", func(t *testing.T) {
			before := counters(t, node1)
			if err := roundTrip(client, nodeDst, "to the node "+family); err != nil {
				t.Fatal(err)
			}
			if got := hostEcho.lastPeer(t).Addr(); got != ip(client) {
				t.Errorf("host server saw %s, want the pod's %s (Istio's ztunnel presents the pod's address)", got, ip(client))
			}
			// Bulk both ways: the node's replies are segmentation-offload
			// super-packets when they are turned back.
			if err := bulkEcho(client, nodeDst, 4<<20); err != nil {
				t.Fatal(err)
			}
			hostEcho.lastPeer(t)
			testutil.Eventually(t, "the ztunnel's access-log line", func() bool {
				return len(z.accessLogs(map[string]string{"src.addr": ip(client).String(), "dst.addr": nodeDst.String(), "protocol": "TCP"})) > 0
			})
			if moved := counters(t, node1)["redirect_host_reply"] - before["redirect_host_reply"]; moved == 0 {
				t.Error("redirect_host_reply did not count the node's replies")
			}
			// The connections above were logged before this one, if at all.
			for _, src := range unproxied {
				for _, l := range z.accessLogs(map[string]string{"src.addr": src.String()}) {
					if l["src.addr"] == src.String() {
						t.Errorf("the ztunnel proxied a connection it must not see: %v", l)
					}
				}
			}
		})
		t.Run(family+"/captured pod to a Service translated to the node", func(t *testing.T) {
			if err := roundTrip(client, vip, "to kubernetes "+family); err != nil {
				t.Fatal(err)
			}
			if got := hostEcho.lastPeer(t).Addr(); got != ip(client) {
				t.Errorf("API server saw %s, want the pod's %s", got, ip(client))
			}
			testutil.Eventually(t, "the ztunnel's access-log line", func() bool {
				return len(z.accessLogs(map[string]string{"src.addr": ip(client).String(), "dst.addr": vip.String(), "dst.workload": "kube-apiserver"})) > 0
			})
		})
		t.Run(family+"/captured pod to a Service translated to a pod", func(t *testing.T) {
			// The pod's packets after the SYN still carry the Service
			// address at the veth; the socket lookup for them also meets
			// amber_lookup's listener, which must not hide the ztunnel's
			// socket under the translated address.
			if err := roundTrip(client, web, "to web "+family); err != nil {
				t.Fatal(err)
			}
			if got := webEcho.lastPeer(t).Addr(); got != ip(client) {
				t.Errorf("web saw %s, want the pod's %s", got, ip(client))
			}
		})
	}
}

func counters(tb testing.TB, nd *meshbed.Node) map[string]uint64 {
	tb.Helper()
	c, err := nd.DP.Counters()
	if err != nil {
		tb.Fatal(err)
	}
	return c
}

// bulkEcho sends n random bytes from p to an echo server at dst while
// reading them back, and compares.
func bulkEcho(p *testbed.Pod, dst netip.AddrPort, n int) error {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, err := p.Dial(ctx, "tcp", dst.String())
	if err != nil {
		return err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(20 * time.Second))
	want := make([]byte, n)
	rand.Read(want)
	werr := make(chan error, 1)
	go func() {
		_, err := c.Write(want)
		werr <- err
	}()
	got := make([]byte, n)
	if _, err := io.ReadFull(c, got); err != nil {
		return fmt.Errorf("read back %d bytes: %w", n, err)
	}
	if err := <-werr; err != nil {
		return fmt.Errorf("write %d bytes: %w", n, err)
	}
	if !bytes.Equal(got, want) {
		return fmt.Errorf("%d bytes came back different", n)
	}
	return nil
}

// echoOver sends msg on c and expects it back, then closes c.
func echoOver(c net.Conn, msg string) error {
	defer c.Close()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := c.Write([]byte(msg)); err != nil {
		return err
	}
	buf := make([]byte, len(msg))
	if _, err := io.ReadFull(c, buf); err != nil {
		return err
	}
	if string(buf) != msg {
		return fmt.Errorf("echo %q, want %q", buf, msg)
	}
	return nil
}
