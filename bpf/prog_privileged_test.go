package bpf

import (
	"context"
	"encoding/binary"
	"fmt"
	"net"
	"net/netip"
	"syscall"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/amber-mesh/amber/test/privileged"
)

const (
	actOK   = 0 // TC_ACT_OK
	actShot = 2 // TC_ACT_SHOT
)

var (
	podP   = netip.MustParseAddr("198.19.1.2") // captured, veth A
	podP6  = netip.MustParseAddr("2001:db8:1::2")
	podQ   = netip.MustParseAddr("198.19.1.3") // captured, veth B
	podC   = netip.MustParseAddr("198.19.1.4") // not captured, veth C
	remote = netip.MustParseAddr("198.19.2.2") // a pod on another node
	rem6   = netip.MustParseAddr("2001:db8:2::2")
	ll6    = netip.MustParseAddr("fe80::1234")
)

// vethIfaces creates n veth pairs in the current namespace and returns the
// index of one end of each: prog.Run only accepts an ifindex that exists
// (this kernel has no dummy driver).
func vethIfaces(tb testing.TB, n int) []int {
	tb.Helper()
	var out []int
	for i := 0; i < n; i++ {
		v := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: fmt.Sprintf("veth%d", i)}, PeerName: fmt.Sprintf("peer%d", i)}
		if err := netlink.LinkAdd(v); err != nil {
			tb.Fatalf("add veth: %v", err)
		}
		l, err := netlink.LinkByName(v.Name)
		if err != nil {
			tb.Fatal(err)
		}
		out = append(out, l.Attrs().Index)
	}
	return out
}

// transparentListener is what the ztunnel registers: IP_TRANSPARENT, no
// MPTCP, dual stack.
func transparentListener(tb testing.TB, addr string) *net.TCPListener {
	tb.Helper()
	lc := net.ListenConfig{Control: func(_, _ string, c syscall.RawConn) error {
		var serr error
		err := c.Control(func(fd uintptr) {
			serr = unix.SetsockoptInt(int(fd), unix.SOL_IP, unix.IP_TRANSPARENT, 1)
			if serr == nil {
				serr = unix.SetsockoptInt(int(fd), unix.SOL_IPV6, unix.IPV6_TRANSPARENT, 1)
			}
		})
		if err != nil {
			return err
		}
		return serr
	}}
	lc.SetMultipathTCP(false)
	l, err := lc.Listen(context.Background(), "tcp", addr)
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { l.Close() })
	return l.(*net.TCPListener)
}

func registerAll(tb testing.TB, root string, l *net.TCPListener) *Listeners {
	tb.Helper()
	ls, err := OpenListeners(root)
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { ls.Close() })
	for _, f := range []Family{IPv4, IPv6} {
		for k := Outbound; k <= HBONE; k++ {
			if err := ls.Register(k, f, l); err != nil {
				tb.Fatal(err)
			}
		}
	}
	return ls
}

type runCase struct {
	name    string
	prog    Role
	ifindex int
	mark    uint32
	pkt     pkt
	want    uint32 // TC verdict
	reason  string // the one counter the packet moves
	// only, when set, is the one listener registered (both families) while
	// the case runs: under BPF_PROG_TEST_RUN every bpf_sk_assign fails, so
	// the listener a decision picked shows as drop_assign_failed, and any
	// other pick as drop_no_listener.
	only *Listener
}

func only(l Listener) *Listener { return &l }

// slots registers sock in the listener slots the cases ask for.
type slots struct {
	ls   *Listeners
	sock *net.TCPListener
}

func (s *slots) set(t *testing.T, l *Listener) {
	t.Helper()
	for _, f := range []Family{IPv4, IPv6} {
		for k := Outbound; k <= HBONE; k++ {
			var err error
			if l == nil || *l == k {
				err = s.ls.Register(k, f, s.sock)
			} else {
				err = s.ls.Unregister(k, f)
			}
			if err != nil {
				t.Fatal(err)
			}
		}
	}
}

func runTable(t *testing.T, d *Datapath, s *slots, cases []runCase) {
	t.Helper()
	for _, tc := range cases {
		prog, _ := d.program(tc.prog)
		if tc.only != nil {
			if s == nil {
				t.Fatalf("%s: no listener to register", tc.name)
			}
			s.set(t, tc.only)
		}
		before, err := d.Counters()
		if err != nil {
			t.Fatal(err)
		}
		ctx := make([]byte, 192)                                    // struct __sk_buff
		binary.NativeEndian.PutUint32(ctx[8:], tc.mark)             // __sk_buff.mark
		binary.NativeEndian.PutUint32(ctx[40:], uint32(tc.ifindex)) // __sk_buff.ifindex
		ret, err := prog.Run(&ebpf.RunOptions{Data: tc.pkt.bytes(), Context: ctx})
		if tc.only != nil {
			s.set(t, nil)
		}
		if err != nil {
			t.Fatalf("%s: run: %v", tc.name, err)
		}
		after, err := d.Counters()
		if err != nil {
			t.Fatal(err)
		}
		if ret != tc.want {
			t.Errorf("%s: verdict %d, want %d", tc.name, ret, tc.want)
		}
		got := map[string]uint64{}
		for k, v := range after {
			if v != before[k] {
				got[k] = v - before[k]
			}
		}
		// Every packet a program sees moves exactly one counter, by one.
		if got[tc.reason] != 1 || len(got) != 1 {
			t.Errorf("%s: counters moved %v, want only %s by 1", tc.name, got, tc.reason)
		}
	}
}

// Under BPF_PROG_TEST_RUN bpf_sk_assign answers -EOPNOTSUPP (it only works
// at real tc ingress), so a decision to assign shows as drop_assign_failed;
// the case's only listener tells which listener the decision picked. The
// netns tests cover the real assignment.
const assignFails = "drop_assign_failed"

func TestPrivilegedProgRunPod(t *testing.T) {
	privileged.Require(t)
	enterNetns(t)
	d := mustLoad(t, Config{})
	idx := vethIfaces(t, 3)
	vethA, vethB, vethC := idx[0], idx[1], idx[2]
	if err := d.Capture(vethA, []netip.Addr{podP, podP6}); err != nil {
		t.Fatal(err)
	}
	if err := d.Capture(vethB, []netip.Addr{podQ}); err != nil {
		t.Fatal(err)
	}

	syn := func(src, dst netip.Addr, dport uint16) pkt {
		return pkt{src: src, dst: dst, proto: protoTCP, sport: 40000, dport: dport, syn: true}
	}
	noListener := []runCase{
		{name: "captured SYN, no listener: fail closed", prog: RolePod, ifindex: vethA, pkt: syn(podP, remote, 80), want: actShot, reason: "drop_no_listener"},
		{name: "v6 captured SYN, no listener", prog: RolePod, ifindex: vethA, pkt: syn(podP6, rem6, 80), want: actShot, reason: "drop_no_listener"},
		{name: "inbound to captured, no listener", prog: RolePod, ifindex: vethC, pkt: syn(podC, podP, 8080), want: actShot, reason: "drop_no_listener"},
		{name: "uplink to captured, no listener", prog: RoleUplink, ifindex: vethC, pkt: syn(remote, podP, 8080), want: actShot, reason: "drop_no_listener"},
		{name: "uncaptured to uncaptured, no listener needed", prog: RolePod, ifindex: vethC, pkt: syn(podC, remote, 80), want: actOK, reason: "pass_not_enrolled"},
	}
	runTable(t, d, nil, noListener) // not t.Run: subtests run on other threads, outside this netns

	ln := transparentListener(t, "[::]:0")
	sl := &slots{ls: registerAll(t, d.PinRoot(), ln), sock: ln}

	frag := syn(podP, remote, 80)
	frag.moreFrags = true
	laterFrag := syn(podP, remote, 80)
	laterFrag.fragOff = 3
	fragC := syn(podC, remote, 80)
	fragC.moreFrags = true
	trunc := syn(podP, remote, 80)
	trunc.truncate = 4
	truncC := syn(podC, remote, 80)
	truncC.truncate = 4
	opts := syn(podP, remote, 80)
	opts.ipv4Opts = 3
	hop := syn(podP6, rem6, 80)
	hop.v6Ext = []int{0, 60}
	tooMany := syn(podP6, rem6, 80)
	tooMany.v6Ext = []int{0, 60, 60, 60, 60}
	frag6 := syn(podP6, rem6, 80)
	frag6.moreFrags = true
	badVer := syn(podP, remote, 80)
	badVer.badVersion = true
	ack := syn(podP, remote, 80)
	ack.syn, ack.ack = false, true
	synack := syn(podP, remote, 80)
	synack.ack = true

	cases := []runCase{
		{name: "ARP", prog: RolePod, ifindex: vethA, pkt: pkt{arp: true}, want: actOK, reason: "pass_not_ip"},
		{name: "UDP from captured (DNS) passes", prog: RolePod, ifindex: vethA, pkt: pkt{src: podP, dst: remote, proto: protoUDP, sport: 5353, dport: 53}, want: actOK, reason: "pass_not_tcp"},
		{name: "ICMP from captured passes", prog: RolePod, ifindex: vethA, pkt: pkt{src: podP, dst: remote, proto: protoICMP}, want: actOK, reason: "pass_not_tcp"},
		{name: "ICMPv6 NDP from link-local passes", prog: RolePod, ifindex: vethA, pkt: pkt{src: ll6, dst: netip.MustParseAddr("ff02::1:ff00:1"), proto: protoICMPv6}, want: actOK, reason: "pass_not_tcp"},
		{name: "TCP from link-local on captured veth is spoofed", prog: RolePod, ifindex: vethA, pkt: syn(ll6, netip.MustParseAddr("fe80::1"), 22), want: actShot, reason: "drop_spoofed"},
		{name: "captured SYN -> outbound", prog: RolePod, ifindex: vethA, pkt: syn(podP, remote, 80), want: actShot, reason: assignFails, only: only(Outbound)},
		{name: "captured SYN to captured pod -> outbound", prog: RolePod, ifindex: vethA, pkt: syn(podP, podQ, 8080), want: actShot, reason: assignFails, only: only(Outbound)},
		{name: "captured SYN to :15008 -> outbound", prog: RolePod, ifindex: vethA, pkt: syn(podP, remote, 15008), want: actShot, reason: assignFails, only: only(Outbound)},
		{name: "v6 captured SYN -> outbound", prog: RolePod, ifindex: vethA, pkt: syn(podP6, rem6, 80), want: actShot, reason: assignFails, only: only(Outbound)},
		{name: "IPv4 options", prog: RolePod, ifindex: vethA, pkt: opts, want: actShot, reason: assignFails, only: only(Outbound)},
		{name: "IPv6 hop-by-hop + dstopts", prog: RolePod, ifindex: vethA, pkt: hop, want: actShot, reason: assignFails, only: only(Outbound)},
		{name: "IPv6 too many extension headers", prog: RolePod, ifindex: vethA, pkt: tooMany, want: actShot, reason: "drop_malformed"},
		{name: "spoofed source on captured veth", prog: RolePod, ifindex: vethA, pkt: syn(netip.MustParseAddr("198.19.1.99"), remote, 80), want: actShot, reason: "drop_spoofed"},
		{name: "spoofed UDP on captured veth", prog: RolePod, ifindex: vethA, pkt: pkt{src: netip.MustParseAddr("198.19.1.99"), dst: remote, proto: protoUDP}, want: actShot, reason: "drop_spoofed"},
		{name: "captured pod's IP from another veth", prog: RolePod, ifindex: vethC, pkt: syn(podP, remote, 80), want: actShot, reason: "drop_spoofed"},
		{name: "captured pod's IP from another captured veth", prog: RolePod, ifindex: vethB, pkt: syn(podP, remote, 80), want: actShot, reason: "drop_spoofed"},
		{name: "uncaptured -> captured -> inbound", prog: RolePod, ifindex: vethC, pkt: syn(podC, podP, 8080), want: actShot, reason: assignFails, only: only(Inbound)},
		{name: "uncaptured -> captured:15008 -> hbone", prog: RolePod, ifindex: vethC, pkt: syn(podC, podP, 15008), want: actShot, reason: assignFails, only: only(HBONE)},
		{name: "uncaptured -> remote passes", prog: RolePod, ifindex: vethC, pkt: syn(podC, remote, 80), want: actOK, reason: "pass_not_enrolled"},
		{name: "bypass mark passes", prog: RolePod, ifindex: vethC, mark: BypassMark, pkt: syn(podC, podP, 8080), want: actOK, reason: "pass_bypass_mark"},
		{name: "bypass mark under mask", prog: RolePod, ifindex: vethC, mark: 0x7000 | BypassMark, pkt: syn(podC, podP, 8080), want: actOK, reason: "pass_bypass_mark"},
		{name: "other mark is captured", prog: RolePod, ifindex: vethC, mark: 0x538, pkt: syn(podC, podP, 8080), want: actShot, reason: assignFails, only: only(Inbound)},
		{name: "ACK from captured without socket passes", prog: RolePod, ifindex: vethA, pkt: ack, want: actOK, reason: "pass_established"},
		{name: "SYN-ACK is not a new connection", prog: RolePod, ifindex: vethA, pkt: synack, want: actOK, reason: "pass_established"},
		{name: "first fragment from captured", prog: RolePod, ifindex: vethA, pkt: frag, want: actShot, reason: "drop_fragment"},
		{name: "later fragment from captured", prog: RolePod, ifindex: vethA, pkt: laterFrag, want: actShot, reason: "drop_fragment"},
		{name: "IPv6 fragment from captured", prog: RolePod, ifindex: vethA, pkt: frag6, want: actShot, reason: "drop_fragment"},
		{name: "fragment uncaptured -> remote passes", prog: RolePod, ifindex: vethC, pkt: fragC, want: actOK, reason: "pass_not_enrolled"},
		{name: "truncated TCP from captured", prog: RolePod, ifindex: vethA, pkt: trunc, want: actShot, reason: "drop_malformed"},
		{name: "truncated TCP uncaptured -> remote passes", prog: RolePod, ifindex: vethC, pkt: truncC, want: actOK, reason: "pass_malformed"},
		{name: "bad IP version on captured veth", prog: RolePod, ifindex: vethA, pkt: badVer, want: actShot, reason: "drop_malformed"},

		{name: "uplink: remote -> captured", prog: RoleUplink, ifindex: vethC, pkt: syn(remote, podP, 9080), want: actShot, reason: assignFails, only: only(Inbound)},
		{name: "uplink: remote -> captured:15008", prog: RoleUplink, ifindex: vethC, pkt: syn(remote, podP, 15008), want: actShot, reason: assignFails, only: only(HBONE)},
		{name: "uplink: v6 remote -> captured:15008", prog: RoleUplink, ifindex: vethC, pkt: syn(rem6, podP6, 15008), want: actShot, reason: assignFails, only: only(HBONE)},
		{name: "uplink: remote -> uncaptured passes", prog: RoleUplink, ifindex: vethC, pkt: syn(remote, podC, 80), want: actOK, reason: "pass_not_enrolled"},
		{name: "uplink: captured pod's IP arriving from outside", prog: RoleUplink, ifindex: vethC, pkt: syn(podP, podQ, 80), want: actShot, reason: "drop_spoofed"},
		{name: "uplink: UDP passes", prog: RoleUplink, ifindex: vethC, pkt: pkt{src: remote, dst: podP, proto: protoUDP}, want: actOK, reason: "pass_not_tcp"},
		{name: "uplink: fragment to captured", prog: RoleUplink, ifindex: vethC, pkt: func() pkt { p := syn(remote, podP, 80); p.moreFrags = true; return p }(), want: actShot, reason: "drop_fragment"},
		{name: "uplink: truncated TCP to captured", prog: RoleUplink, ifindex: vethC, pkt: func() pkt { p := syn(remote, podP, 80); p.truncate = 4; return p }(), want: actShot, reason: "drop_malformed"},
	}
	runTable(t, d, sl, cases)

	// Release: the pod's traffic is no longer captured and its addresses
	// are free.
	if err := d.Release(vethA, []netip.Addr{podP, podP6}); err != nil {
		t.Fatal(err)
	}
	runTable(t, d, sl, []runCase{
		{name: "released pod passes", prog: RolePod, ifindex: vethA, pkt: syn(podP, remote, 80), want: actOK, reason: "pass_not_enrolled"},
		{name: "released pod's IP on another veth passes", prog: RolePod, ifindex: vethC, pkt: syn(podP, remote, 80), want: actOK, reason: "pass_not_enrolled"},
	})
}

// TestPrivilegedProgRunEstablished checks the socket lookup: packets of a
// connection the ztunnel owns (its mark) are taken, a host socket's are
// left to routing.
func TestPrivilegedProgRunEstablished(t *testing.T) {
	privileged.Require(t)
	enterNetns(t)
	d := mustLoad(t, Config{})
	idx := vethIfaces(t, 1)
	if err := netlink.LinkSetUp(&netlink.Device{LinkAttrs: netlink.LinkAttrs{Name: "lo"}}); err != nil {
		t.Fatal(err)
	}

	conn := func(mark int) (server, client netip.AddrPort) {
		ln, err := net.Listen("tcp4", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { ln.Close() })
		dl := net.Dialer{Control: func(_, _ string, c syscall.RawConn) error {
			return c.Control(func(fd uintptr) { unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_MARK, mark) })
		}}
		c, err := dl.Dial("tcp4", ln.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		return netip.MustParseAddrPort(ln.Addr().String()), netip.MustParseAddrPort(c.LocalAddr().String())
	}
	reply := func(server, client netip.AddrPort) pkt {
		return pkt{src: server.Addr(), dst: client.Addr(), proto: protoTCP, sport: server.Port(), dport: client.Port(), ack: true}
	}
	zs, zc := conn(BypassMark)
	hs, hc := conn(0)
	runTable(t, d, nil, []runCase{
		{name: "reply to a ztunnel socket is assigned", prog: RoleUplink, ifindex: idx[0], pkt: reply(zs, zc), want: actShot, reason: assignFails},
		{name: "reply to a host socket passes", prog: RoleUplink, ifindex: idx[0], pkt: reply(hs, hc), want: actOK, reason: "pass_host_socket"},
	})
}

func TestReasonNames(t *testing.T) {
	if len(reasonNames) != int(captureReasonR_MAX) {
		t.Fatalf("%d reason names for %d reasons", len(reasonNames), captureReasonR_MAX)
	}
	for i, n := range reasonNames {
		if n == "" {
			t.Errorf("reason %d has no name", i)
		}
	}
}
