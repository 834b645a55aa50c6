package e2e

import (
	"context"
	"fmt"
	"net/netip"
	"strings"
	"testing"

	"github.com/amber-mesh/amber/internal/testutil"
	"github.com/amber-mesh/amber/test/meshbed"
	"github.com/amber-mesh/amber/test/testbed"
)

// kubeProxyNodePorts is a node's nftables ruleset that translates the
// node's own address at a port (keys) to an endpoint, as kube-proxy's
// nftables mode does for a NodePort (also externalIPs and load-balancer
// IPs): DNAT in prerouting, marked 0x4000 for masquerade, and the
// masquerade in postrouting (externalTrafficPolicy Cluster).
func kubeProxyNodePorts(ports map[netip.AddrPort]netip.AddrPort) string {
	return fmt.Sprintf(`table inet amber-e2e-nodeports {
	chain prerouting {
		type nat hook prerouting priority -100; policy accept;
%s	}
	chain postrouting {
		type nat hook postrouting priority 100; policy accept;
		meta mark & 0x4000 == 0x4000 masquerade
	}
}
`, dnatRules(ports, "meta mark set meta mark | 0x4000 "))
}

// guardedOtherOnly is a mesh file's policies: the workloads labelled
// app=guarded admit only the identity "other", which no test pod has.
const guardedOtherOnly = `policies:
  - name: guarded-other-only
    selector:
      matchLabels: {app: guarded}
    action: ALLOW
    rules:
      - from:
          - source:
              principals: [cluster.local/ns/default/sa/other]
`

// podIP is p's address of one family.
func podIP(p *testbed.Pod, v6 bool) netip.Addr {
	if v6 {
		return p.IPv6
	}
	return p.IPv4
}

// mustTwoNodes is a testbed with nodes n1 and n2 and, on each, the pods
// named (in that order).
func mustTwoNodes(t *testing.T, pods1, pods2 []string) (n1, n2 *testbed.Node, pods map[string]*testbed.Pod) {
	t.Helper()
	n1, n2 = testbed.MustTwoNodes(t)
	pods = map[string]*testbed.Pod{}
	nodes := [2]*testbed.Node{n1, n2}
	for i, names := range [][]string{pods1, pods2} {
		for _, name := range names {
			var err error
			if pods[name], err = nodes[i].AddPod(name); err != nil {
				t.Fatal(err)
			}
		}
	}
	return n1, n2, pods
}

// mustNft loads an nftables ruleset into n.
func mustNft(tb testing.TB, n *testbed.Node, ruleset string) {
	tb.Helper()
	nft := n.Command(context.Background(), "nft", "-f", "-")
	nft.Stdin = strings.NewReader(ruleset)
	if out, err := nft.CombinedOutput(); err != nil {
		tb.Fatalf("nft: %v: %s\n%s", err, out, ruleset)
	}
}

// TestPrivilegedServiceToCapturedPod: a client outside the mesh reaches a
// captured pod through an address the node translates — a Service
// address from an uncaptured pod on the same node, the node's address at
// a NodePort from another node — and the connection goes through the
// ztunnel like one addressed to the pod: the destination's access log
// reports it, its L4 policy is enforced, and the client, whose socket is
// connected to the Service address, gets its replies from there.
//
// Before the fix the ingress programs let such a SYN pass (its
// destination is no captured pod's), the node's DNAT translated it to the
// captured pod and forwarded it into the pod's veth, where nothing
// captured it: plaintext to the pod, no access log, no policy.
func TestPrivilegedServiceToCapturedPod(t *testing.T) {
	// open: captured, no policy; guarded: captured, admits only the
	// identity "other"; plain: not captured, outside the mesh; remote:
	// another node's pod, outside the mesh.
	n1, _, pods := mustTwoNodes(t, []string{"open", "guarded", "plain"}, []string{"remote"})
	open, guarded, plain, remote := pods["open"], pods["guarded"], pods["plain"], pods["remote"]
	const port = 9080
	type target struct {
		pod          *testbed.Pod
		vip4, vip6   netip.AddrPort // Service addresses
		node4, node6 netip.AddrPort // NodePorts on n1
	}
	targets := []target{
		{open, netip.MustParseAddrPort("198.18.100.1:80"), netip.MustParseAddrPort("[2001:db8:100::1]:80"),
			netip.AddrPortFrom(n1.IPv4, 30080), netip.AddrPortFrom(n1.IPv6, 30080)},
		{guarded, netip.MustParseAddrPort("198.18.100.2:80"), netip.MustParseAddrPort("[2001:db8:100::2]:80"),
			netip.AddrPortFrom(n1.IPv4, 30081), netip.AddrPortFrom(n1.IPv6, 30081)},
	}
	services, nodePorts := map[netip.AddrPort]netip.AddrPort{}, map[netip.AddrPort]netip.AddrPort{}
	for _, tg := range targets {
		services[tg.vip4], services[tg.vip6] = netip.AddrPortFrom(tg.pod.IPv4, port), netip.AddrPortFrom(tg.pod.IPv6, port)
		nodePorts[tg.node4], nodePorts[tg.node6] = netip.AddrPortFrom(tg.pod.IPv4, port), netip.AddrPortFrom(tg.pod.IPv6, port)
	}
	// A strict reverse-path filter, as some distributions set it: the
	// steered SYN comes in through lo with a source routed elsewhere.
	if out, err := n1.Command(context.Background(), "sysctl", "-w", "net.ipv4.conf.all.rp_filter=1").CombinedOutput(); err != nil {
		t.Fatalf("%v: %s", err, out)
	}
	mustNft(t, n1, kubeProxyNAT(services))
	mustNft(t, n1, kubeProxyNodePorts(nodePorts))

	node1 := meshbed.MustLoadDatapath(t, n1, "amber-e2e")
	node1.MustCapture(t, open)
	node1.MustCapture(t, guarded)
	z := mustLocalMesh(t, meshbed.MeshYAML([]meshbed.Workload{
		{Name: "open", ServiceAccount: "open", Pod: open, HBONE: true},
		{Name: "guarded", ServiceAccount: "guarded", Pod: guarded, HBONE: true, Labels: map[string]string{"app": "guarded"}},
	}, guardedOtherOnly), node1)[0]
	echoOpen := mustEcho(t, open, port)
	echoGuarded := mustEcho(t, guarded, port)

	for _, v6 := range []bool{false, true} {
		family := map[bool]string{false: "ipv4", true: "ipv6"}[v6]
		ip := func(p *testbed.Pod) netip.Addr { return podIP(p, v6) }
		via := func(tg target) map[string]netip.AddrPort {
			if v6 {
				return map[string]netip.AddrPort{"Service": tg.vip6, "NodePort": tg.node6}
			}
			return map[string]netip.AddrPort{"Service": tg.vip4, "NodePort": tg.node4}
		}
		// The source the ztunnel sees: the pod's own address through a
		// Service, the node's (masquerade) through a NodePort.
		for _, c := range []struct {
			kind   string
			client *testbed.Pod
			src    netip.Addr
		}{
			{"Service", plain, ip(plain)},
			{"NodePort", remote, map[bool]netip.Addr{false: n1.IPv4, true: n1.IPv6}[v6]},
		} {
			t.Run(fmt.Sprintf("%s/%s from %s through the ztunnel", family, c.kind, c.client.Name), func(t *testing.T) {
				before := counters(t, node1)
				addr := via(targets[0])[c.kind]
				// The round trip completing on a socket connected to
				// addr is the client seeing the Service address as its
				// peer: a reply from anywhere else would not match it.
				if err := roundTrip(c.client, addr, c.kind+" "+family); err != nil {
					t.Fatalf("%s → %s: %v", c.client.Name, addr, err)
				}
				if got := echoOpen.lastPeer(t).Addr(); got != c.src {
					t.Errorf("open saw source %s, want %s", got, c.src)
				}
				testutil.Eventually(t, "the destination's access-log line", func() bool {
					return len(z.accessLogs(map[string]string{
						"reporter": "destination", "protocol": "TCP", "dst.workload": "open",
						"dst.addr": netip.AddrPortFrom(ip(open), port).String(), "src.addr": c.src.String(),
					})) > 0
				})
				if moved := counters(t, node1)["redirect_escaped"] - before["redirect_escaped"]; moved == 0 {
					t.Error("redirect_escaped did not count the SYN")
				}
			})
			t.Run(fmt.Sprintf("%s/%s from %s refused by the destination's policy", family, c.kind, c.client.Name), func(t *testing.T) {
				addr := via(targets[1])[c.kind]
				if err := roundTrip(c.client, addr, "let me in"); err == nil {
					t.Fatalf("%s reached guarded through %s despite its ALLOW policy for another identity", c.client.Name, addr)
				}
				select {
				case p := <-echoGuarded.peers:
					t.Fatalf("guarded saw a connection from %s", p)
				default:
				}
				testutil.Eventually(t, "the denial in the access log", func() bool {
					return len(z.accessLogs(map[string]string{
						"reporter": "destination", "dst.workload": "guarded", "src.addr": c.src.String(), "error": "denied by policy",
					})) > 0
				})
			})
		}
	}
}

// TestPrivilegedUnknownServicePassthrough: a captured pod connects to a
// Service the mesh does not describe (no service in the ztunnel's state)
// that the node translates to an endpoint, on another node and on its
// own. The ztunnel passes it through to the endpoint the node translated
// the pod's connection to, from the pod's address. Before the fix it
// dialled the Service address, the node translated that dial again, and a
// remote endpoint's replies, from the endpoint's address, matched no
// ztunnel socket: the connection timed out.
func TestPrivilegedUnknownServicePassthrough(t *testing.T) {
	// client: captured; local: outside the mesh, same node; remote:
	// outside the mesh, another node.
	n1, _, pods := mustTwoNodes(t, []string{"client", "local"}, []string{"remote"})
	client, local, remote := pods["client"], pods["local"], pods["remote"]
	const port = 9080
	type svc struct {
		name       string
		pod        *testbed.Pod
		vip4, vip6 netip.AddrPort
	}
	svcs := []svc{
		{"remote endpoint", remote, netip.MustParseAddrPort("198.18.100.1:80"), netip.MustParseAddrPort("[2001:db8:100::1]:80")},
		{"local endpoint", local, netip.MustParseAddrPort("198.18.100.2:80"), netip.MustParseAddrPort("[2001:db8:100::2]:80")},
	}
	nat := map[netip.AddrPort]netip.AddrPort{}
	for _, s := range svcs {
		nat[s.vip4], nat[s.vip6] = netip.AddrPortFrom(s.pod.IPv4, port), netip.AddrPortFrom(s.pod.IPv6, port)
	}
	mustNft(t, n1, kubeProxyNAT(nat))
	node1 := meshbed.MustLoadDatapath(t, n1, "amber-e2e")
	node1.MustCapture(t, client)
	z := mustLocalMesh(t, meshbed.MeshYAML([]meshbed.Workload{
		{Name: "client", ServiceAccount: "client", Pod: client, HBONE: true},
	}, ""), node1)[0]
	echoes := map[*testbed.Pod]*echoServer{remote: mustEcho(t, remote, port), local: mustEcho(t, local, port)}

	for _, v6 := range []bool{false, true} {
		family := map[bool]string{false: "ipv4", true: "ipv6"}[v6]
		for _, s := range svcs {
			vip, src := s.vip4, client.IPv4
			if v6 {
				vip, src = s.vip6, client.IPv6
			}
			t.Run(family+"/"+s.name, func(t *testing.T) {
				if err := roundTrip(client, vip, s.name+" "+family); err != nil {
					t.Fatalf("client → %s: %v", vip, err)
				}
				if got := echoes[s.pod].lastPeer(t).Addr(); got != src {
					t.Errorf("%s saw source %s, want the client's %s", s.pod.Name, got, src)
				}
				testutil.Eventually(t, "the source's access-log line", func() bool {
					return len(z.accessLogs(map[string]string{
						"reporter": "source", "protocol": "TCP", "src.addr": src.String(), "dst.addr": vip.String(),
					})) > 0
				})
			})
		}
	}
}

// TestPrivilegedPassthroughToCapturedPod: a captured pod's connection that
// the ztunnel passes through as plain TCP — to a destination the mesh does
// not describe (yet: the new pod istiod has not pushed, the moments after
// a ztunnel restart), directly or behind a Service it does not know —
// whose destination is a pod this node captures meets that pod's inbound
// checks, as a plaintext client's connection does: refused while the
// destination is unknown, its policy enforced when it is described as a
// plain-TCP workload (captured before istiod has seen the capture). Before
// the fix the ztunnel dialled the pod itself, its own dial passed the
// datapath (bypass mark) and the pod was reached in plaintext past its
// policy.
func TestPrivilegedPassthroughToCapturedPod(t *testing.T) {
	// client: captured; unknown: captured, not in the mesh file; guarded:
	// captured, described as a plain-TCP workload whose policy admits only
	// the identity "other".
	// open: captured, a plain-TCP workload without a policy.
	n1, _, pods := mustTwoNodes(t, []string{"client", "unknown", "guarded", "open"}, nil)
	client, unknown, guarded, open := pods["client"], pods["unknown"], pods["guarded"], pods["open"]
	const port = 9080
	vip4, vip6 := netip.MustParseAddrPort("198.18.100.1:80"), netip.MustParseAddrPort("[2001:db8:100::1]:80")
	mustNft(t, n1, kubeProxyNAT(map[netip.AddrPort]netip.AddrPort{
		vip4: netip.AddrPortFrom(unknown.IPv4, port), vip6: netip.AddrPortFrom(unknown.IPv6, port),
	}))
	node1 := meshbed.MustLoadDatapath(t, n1, "amber-e2e")
	for _, p := range []*testbed.Pod{client, unknown, guarded, open} {
		node1.MustCapture(t, p)
	}
	z := mustLocalMesh(t, meshbed.MeshYAML([]meshbed.Workload{
		{Name: "client", ServiceAccount: "client", Pod: client, HBONE: true},
		{Name: "guarded", ServiceAccount: "guarded", Pod: guarded, Labels: map[string]string{"app": "guarded"}},
		{Name: "open", ServiceAccount: "open", Pod: open},
	}, guardedOtherOnly), node1)[0]
	echoUnknown := mustEcho(t, unknown, port)
	echoGuarded := mustEcho(t, guarded, port)
	echoOpen := mustEcho(t, open, port)

	for _, v6 := range []bool{false, true} {
		family := map[bool]string{false: "ipv4", true: "ipv6"}[v6]
		ip := func(p *testbed.Pod) netip.Addr { return podIP(p, v6) }
		vip := map[bool]netip.AddrPort{false: vip4, true: vip6}[v6]
		for _, c := range []struct {
			name string
			dst  netip.AddrPort
			echo *echoServer
			log  map[string]string
		}{
			{"an undescribed pod", netip.AddrPortFrom(ip(unknown), port), echoUnknown,
				map[string]string{"dst.addr": netip.AddrPortFrom(ip(unknown), port).String(), "error": "not a local workload"}},
			{"an undescribed pod behind an unknown Service", vip, echoUnknown,
				map[string]string{"dst.addr": netip.AddrPortFrom(ip(unknown), port).String(), "error": "not a local workload"}},
			{"a plain-TCP workload's policy", netip.AddrPortFrom(ip(guarded), port), echoGuarded,
				map[string]string{"dst.workload": "guarded", "error": "denied by policy"}},
		} {
			t.Run(family+"/"+c.name, func(t *testing.T) {
				if err := roundTrip(client, c.dst, "let me in"); err == nil {
					t.Fatalf("client reached %s in plaintext past its inbound checks", c.dst)
				}
				select {
				case p := <-c.echo.peers:
					t.Fatalf("the destination saw a connection from %s", p)
				default:
				}
				want := map[string]string{"reporter": "destination", "src.addr": ip(client).String()}
				for k, v := range c.log {
					want[k] = v
				}
				testutil.Eventually(t, "the destination's refusal in the access log", func() bool { return len(z.accessLogs(want)) > 0 })
			})
		}
		t.Run(family+"/a plain-TCP workload without a policy, through its inbound checks", func(t *testing.T) {
			dst := netip.AddrPortFrom(ip(open), port)
			if err := roundTrip(client, dst, "plain "+family); err != nil {
				t.Fatal(err)
			}
			if got := echoOpen.lastPeer(t).Addr(); got != ip(client) {
				t.Errorf("open saw source %s, want the client's %s", got, ip(client))
			}
			testutil.Eventually(t, "both ends in the access log", func() bool {
				return len(z.accessLogs(map[string]string{"reporter": "source", "src.addr": ip(client).String(), "dst.addr": dst.String()})) > 0 &&
					len(z.accessLogs(map[string]string{"reporter": "destination", "src.addr": ip(client).String(), "dst.addr": dst.String(), "dst.workload": "open"})) > 0
			})
		})
	}
}
