package bpf

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"testing"
	"unsafe"

	"github.com/cilium/ebpf"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/amber-mesh/amber/internal/testutil"
	"github.com/amber-mesh/amber/test/privileged"
	"github.com/amber-mesh/amber/test/testbed"
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

// capturedNetns enters a new netns with the datapath loaded and n veths,
// the first of which is pod P's (podP, podP6), captured.
func capturedNetns(tb testing.TB, n int) (*Datapath, []int) {
	tb.Helper()
	enterNetns(tb)
	d := mustLoad(tb, Config{})
	idx := vethIfaces(tb, n)
	if err := d.Capture(idx[0], []netip.Addr{podP, podP6}); err != nil {
		tb.Fatal(err)
	}
	return d, idx
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

// roleToPod names the pod program's egress half in the tables.
const roleToPod Role = "to_pod"

func (d *Datapath) tcProgram(r Role) *ebpf.Program {
	switch r {
	case RolePod:
		return d.objs.AmberPod
	case roleToPod:
		return d.objs.AmberToPod
	case RoleUplink:
		return d.objs.AmberUplink
	}
	return nil
}

type runCase struct {
	name    string
	prog    Role // RolePod, RoleUplink or roleToPod
	ifindex int
	ingress int // __sk_buff.ingress_ifindex: 0 is a packet the node sent
	mark    uint32
	pkt     pkt
	want    uint32 // TC verdict
	reason  string // the one counter the packet moves
	// only, when set, is the one listener registered (both families) while
	// the case runs: under BPF_PROG_TEST_RUN every bpf_sk_assign fails, so
	// the listener a decision picked shows as drop_assign_failed, and any
	// other pick as drop_no_listener.
	only     *Listener
	wantMark uint32 // bits __sk_buff.mark must have after the run
	zeroMAC  bool   // the frame leaves with lo's all-zero destination MAC
	// out, when set, is the packet the frame must leave as: the same bytes
	// from the source MAC on but for the checksums, which must verify.
	out *pkt
}

func only(l Listener) *Listener { return &l }

// noListener, as a case's only listener, registers none.
const noListener Listener = -1

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
		binary.NativeEndian.PutUint32(ctx[36:], uint32(tc.ingress)) // __sk_buff.ingress_ifindex
		ctxOut := make([]byte, len(ctx))
		data := tc.pkt.bytes()
		out := make([]byte, len(data)+256)
		ret, err := d.tcProgram(tc.prog).Run(&ebpf.RunOptions{Data: data, DataOut: out, Context: ctx, ContextOut: ctxOut})
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
		if m := binary.NativeEndian.Uint32(ctxOut[8:]); m&tc.wantMark != tc.wantMark {
			t.Errorf("%s: mark %#x, want bits %#x", tc.name, m, tc.wantMark)
		}
		if tc.zeroMAC && !bytes.Equal(out[:6], make([]byte, 6)) {
			t.Errorf("%s: destination MAC %x, want lo's 000000000000", tc.name, out[:6])
		}
		if tc.out != nil {
			got, want := out[:len(data)], tc.out.bytes()
			if !checksumsValid(got) {
				t.Errorf("%s: checksums of the rewritten frame do not verify", tc.name)
			}
			setChecksums(got)
			if !bytes.Equal(got[6:], want[6:]) {
				t.Errorf("%s: frame left as\n%x\nwant\n%x", tc.name, got[6:], want[6:])
			}
		}
		got := map[string]uint64{}
		for k, v := range after {
			if v != before[k] {
				got[k] = v - before[k]
			}
		}
		// Every packet a TC program sees moves exactly one counter, by one.
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

// addLocal puts addrs on lo, so that the test's own sockets can use them.
func addLocal(tb testing.TB, addrs ...netip.Addr) {
	tb.Helper()
	lo, err := netlink.LinkByName("lo")
	if err != nil {
		tb.Fatal(err)
	}
	if err := netlink.LinkSetUp(lo); err != nil {
		tb.Fatal(err)
	}
	for _, a := range addrs {
		n := &netlink.Addr{IPNet: &net.IPNet{IP: a.AsSlice(), Mask: net.CIDRMask(a.BitLen(), a.BitLen())}}
		if a.Is6() {
			n.Flags = unix.IFA_F_NODAD
		}
		if err := netlink.AddrAdd(lo, n); err != nil {
			tb.Fatalf("add %s to lo: %v", a, err)
		}
	}
	// IPv6 installs an address's local route from a work queue.
	for _, a := range addrs {
		testutil.Eventually(tb, fmt.Sprintf("local route to %s", a), func() bool {
			rs, err := netlink.RouteGet(a.AsSlice())
			return err == nil && len(rs) > 0 && rs[0].Type == unix.RTN_LOCAL
		})
	}
}

// dialFrom connects from src to dst in the current netns with SO_MARK mark.
func dialFrom(tb testing.TB, src, dst netip.AddrPort, mark int) *net.TCPConn {
	tb.Helper()
	d := net.Dialer{LocalAddr: net.TCPAddrFromAddrPort(src), Control: func(_, _ string, c syscall.RawConn) error {
		var serr error
		err := c.Control(func(fd uintptr) { serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_MARK, mark) })
		return errors.Join(err, serr)
	}}
	d.SetMultipathTCP(false)
	c, err := d.Dial("tcp", dst.String())
	if err != nil {
		tb.Fatalf("dial %s from %s: %v", dst, src, err)
	}
	tb.Cleanup(func() { c.Close() })
	return c.(*net.TCPConn)
}

// timeWait leaves the server side of a connection client -> server in
// TIME_WAIT, as the ztunnel's side is after it closed first.
func timeWait(tb testing.TB, client, server netip.AddrPort) {
	tb.Helper()
	ln, err := net.ListenTCP("tcp", net.TCPAddrFromAddrPort(server))
	if err != nil {
		tb.Fatal(err)
	}
	defer ln.Close()
	c := dialFrom(tb, client, server, 0)
	s, err := ln.Accept()
	if err != nil {
		tb.Fatal(err)
	}
	s.Close() // the server closes first
	if _, err := c.Read(make([]byte, 1)); err != io.EOF {
		tb.Fatalf("client read after server close: %v, want EOF", err)
	}
	c.Close()
	testutil.Eventually(tb, fmt.Sprintf("%s -> %s in TIME_WAIT", client, server), func() bool {
		st, err := testbed.TCPState(server, client)
		if err != nil {
			tb.Fatal(err)
		}
		return st == testbed.TCPTimeWait
	})
}

// TestPrivilegedProgRunTupleInUse checks the SYN of a 4-tuple the node
// holds a socket for: it is not assigned to a listener (the kernel would
// drop it as a duplicate of that socket) but routed to the local stack with
// the route mark, for the kernel's own lookup — with the listener still
// required, so that a missing ztunnel fails closed.
func TestPrivilegedProgRunTupleInUse(t *testing.T) {
	privileged.Require(t)
	d, idx := capturedNetns(t, 2)
	vethA, vethC := idx[0], idx[1]
	addLocal(t, podP, podP6, remote, rem6)
	ln := transparentListener(t, "[::]:0")
	sl := &slots{ls: registerAll(t, d.PinRoot(), ln), sock: ln}

	ap := netip.AddrPortFrom
	syn := func(src, dst netip.AddrPort) pkt {
		return pkt{src: src.Addr(), dst: dst.Addr(), proto: protoTCP, sport: src.Port(), dport: dst.Port(), syn: true}
	}
	out4, out6 := ap(podP, 40000), ap(podP6, 40000)
	timeWait(t, out4, ap(remote, 80))
	timeWait(t, out6, ap(rem6, 80))
	timeWait(t, ap(remote, 40001), ap(podP, 9080))
	timeWait(t, ap(rem6, 40002), ap(podP6, HBONEPort))
	// A live connection: a SYN on its 4-tuple (the client restarted).
	lln, err := net.ListenTCP("tcp", net.TCPAddrFromAddrPort(ap(remote, 81)))
	if err != nil {
		t.Fatal(err)
	}
	defer lln.Close()
	dialFrom(t, ap(podP, 40003), ap(remote, 81), 0)

	const mark = 0x40000 // hostnet.DefaultMark
	runTable(t, d, sl, []runCase{
		{name: "outbound SYN on a TIME_WAIT 4-tuple", prog: RolePod, ifindex: vethA, pkt: syn(out4, ap(remote, 80)), want: actOK, reason: "pass_tuple_in_use", only: only(Outbound), wantMark: mark},
		{name: "v6 outbound SYN on a TIME_WAIT 4-tuple", prog: RolePod, ifindex: vethA, pkt: syn(out6, ap(rem6, 80)), want: actOK, reason: "pass_tuple_in_use", only: only(Outbound), wantMark: mark},
		{name: "inbound SYN on a TIME_WAIT 4-tuple", prog: RoleUplink, ifindex: vethC, pkt: syn(ap(remote, 40001), ap(podP, 9080)), want: actOK, reason: "pass_tuple_in_use", only: only(Inbound), wantMark: mark},
		{name: "v6 HBONE SYN on a TIME_WAIT 4-tuple", prog: RoleUplink, ifindex: vethC, pkt: syn(ap(rem6, 40002), ap(podP6, HBONEPort)), want: actOK, reason: "pass_tuple_in_use", only: only(HBONE), wantMark: mark},
		{name: "SYN on a live connection's 4-tuple", prog: RolePod, ifindex: vethA, pkt: syn(ap(podP, 40003), ap(remote, 81)), want: actOK, reason: "pass_tuple_in_use", only: only(Outbound), wantMark: mark},
		{name: "SYN on a TIME_WAIT 4-tuple, no listener: fail closed", prog: RolePod, ifindex: vethA, pkt: syn(out4, ap(remote, 80)), want: actShot, reason: "drop_no_listener", only: only(noListener)},
		{name: "fresh 4-tuple still goes to the listener", prog: RolePod, ifindex: vethA, pkt: syn(ap(podP, 40004), ap(remote, 80)), want: actShot, reason: assignFails, only: only(Outbound)},
	})
}

// TestPrivilegedProgRunToPod checks the pod program's egress half: only
// the node's own packet to a captured pod, at a port the ztunnel dials
// from, that belongs to a ztunnel socket is redirected to lo's ingress
// (route mark, lo's MAC); everything else passes untouched.
func TestPrivilegedProgRunToPod(t *testing.T) {
	privileged.Require(t)
	d, idx := capturedNetns(t, 2)
	vethA, vethC := idx[0], idx[1]
	node, node6 := netip.MustParseAddr("198.18.0.1"), netip.MustParseAddr("2001:db8:ff::1")
	addLocal(t, podP, podP6, podC, node, node6)
	ap := netip.AddrPortFrom
	for _, a := range []netip.Addr{node, node6} {
		ln, err := net.ListenTCP("tcp", net.TCPAddrFromAddrPort(ap(a, 7000)))
		if err != nil {
			t.Fatal(err)
		}
		defer ln.Close()
	}
	// The ztunnel's dials from the pod's address (its mark), a host
	// socket's, and one from an uncaptured pod's.
	dialFrom(t, ap(podP, 62000), ap(node, 7000), BypassMark)
	dialFrom(t, ap(podP6, 62000), ap(node6, 7000), BypassMark)
	dialFrom(t, ap(podP, 62001), ap(node, 7000), 0)
	dialFrom(t, ap(podC, 62000), ap(node, 7000), BypassMark)

	reply := func(src netip.Addr, dst netip.AddrPort) pkt {
		return pkt{src: src, dst: dst.Addr(), proto: protoTCP, sport: 7000, dport: dst.Port(), syn: true, ack: true}
	}
	const (
		actRedirect = 7 // TC_ACT_REDIRECT
		mark        = 0x40000
	)
	uplink := vethC // any ingress interface: a forwarded packet
	runTable(t, d, nil, []runCase{
		{name: "node's reply to the ztunnel's dial from a captured pod", prog: roleToPod, ifindex: vethA, pkt: reply(node, ap(podP, 62000)), want: actRedirect, reason: "redirect_host_reply", wantMark: mark, zeroMAC: true},
		{name: "v6 node's reply to the ztunnel's dial", prog: roleToPod, ifindex: vethA, pkt: reply(node6, ap(podP6, 62000)), want: actRedirect, reason: "redirect_host_reply", wantMark: mark, zeroMAC: true},
		{name: "same packet forwarded, not the node's", prog: roleToPod, ifindex: vethA, ingress: uplink, pkt: reply(node, ap(podP, 62000)), want: actOK, reason: "pass_to_pod"},
		{name: "the ztunnel's own packet", prog: roleToPod, ifindex: vethA, mark: BypassMark, pkt: reply(node, ap(podP, 62000)), want: actOK, reason: "pass_to_pod"},
		{name: "a host socket's connection", prog: roleToPod, ifindex: vethA, pkt: reply(node, ap(podP, 62001)), want: actOK, reason: "pass_to_pod"},
		{name: "no socket (kubelet probe to a high port)", prog: roleToPod, ifindex: vethA, pkt: reply(node, ap(podP, 62002)), want: actOK, reason: "pass_to_pod"},
		{name: "below the ztunnel's dial ports (kubelet probe)", prog: roleToPod, ifindex: vethA, pkt: reply(node, ap(podP, 8080)), want: actOK, reason: "pass_to_pod"},
		{name: "uncaptured pod", prog: roleToPod, ifindex: vethC, pkt: reply(node, ap(podC, 62000)), want: actOK, reason: "pass_to_pod"},
		{name: "captured pod's address out of another veth", prog: roleToPod, ifindex: vethC, pkt: reply(node, ap(podP, 62000)), want: actOK, reason: "pass_to_pod"},
		{name: "UDP", prog: roleToPod, ifindex: vethA, pkt: pkt{src: node, dst: podP, proto: protoUDP, sport: 53, dport: 62000}, want: actOK, reason: "pass_to_pod"},
		{name: "ARP", prog: roleToPod, ifindex: vethA, pkt: pkt{arp: true}, want: actOK, reason: "pass_to_pod"},
	})
}

// skLookupCtx is struct bpf_sk_lookup as BPF_PROG_TEST_RUN takes it: the
// kernel fills in no interface (ingress_ifindex must be 0), so the
// outbound decision is covered by the netns tests.
type skLookupCtx struct {
	Cookie     uint64
	Family     uint32
	Protocol   uint32
	RemoteIP4  [4]byte
	RemoteIP6  [16]byte
	RemotePort uint16 // network byte order
	_          uint16
	LocalIP4   [4]byte
	LocalIP6   [16]byte
	LocalPort  uint32
	Ifindex    uint32
	_          uint32
}

// TestPrivilegedProgRunLookup runs amber_lookup as the kernel's listener
// lookup would: a captured pod's inbound and HBONE connections get the
// ztunnel's listeners, a missing one fails closed, anything else is left to
// the listening hash.
func TestPrivilegedProgRunLookup(t *testing.T) {
	privileged.Require(t)
	d, _ := capturedNetns(t, 1)
	ls, err := OpenListeners(d.PinRoot())
	if err != nil {
		t.Fatal(err)
	}
	defer ls.Close()
	cookies := map[Listener]uint64{}
	for k := Outbound; k <= HBONE; k++ {
		l := transparentListener(t, "[::]:0")
		for _, f := range []Family{IPv4, IPv6} {
			if err := ls.Register(k, f, l); err != nil {
				t.Fatal(err)
			}
		}
		rc, _ := l.SyscallConn()
		rc.Control(func(fd uintptr) { cookies[k], err = unix.GetsockoptUint64(int(fd), unix.SOL_SOCKET, unix.SO_COOKIE) })
		if err != nil {
			t.Fatal(err)
		}
	}
	const (
		skDrop = 0
		skPass = 1
	)
	run := func(proto uint32, src, dst netip.AddrPort) (uint32, uint64) {
		t.Helper()
		c := skLookupCtx{Family: unix.AF_INET, Protocol: proto, LocalPort: uint32(dst.Port())}
		binary.BigEndian.PutUint16((*[2]byte)(unsafe.Pointer(&c.RemotePort))[:], src.Port())
		if dst.Addr().Is6() {
			c.Family = unix.AF_INET6
			c.RemoteIP6, c.LocalIP6 = src.Addr().As16(), dst.Addr().As16()
		} else {
			c.RemoteIP4, c.LocalIP4 = src.Addr().As4(), dst.Addr().As4()
		}
		var out skLookupCtx
		ret, err := d.objs.AmberLookup.Run(&ebpf.RunOptions{Context: c, ContextOut: &out})
		if err != nil {
			t.Fatal(err)
		}
		return ret, out.Cookie
	}
	ap := netip.AddrPortFrom
	for _, tc := range []struct {
		name     string
		proto    uint32
		src, dst netip.AddrPort
		want     uint32
		listener Listener // -1: none selected
	}{
		{"to a captured pod -> inbound", unix.IPPROTO_TCP, ap(remote, 40000), ap(podP, 8080), skPass, Inbound},
		{"to a captured pod's :15008 -> hbone", unix.IPPROTO_TCP, ap(remote, 40000), ap(podP, HBONEPort), skPass, HBONE},
		{"v6 to a captured pod -> inbound", unix.IPPROTO_TCP, ap(rem6, 40000), ap(podP6, 8080), skPass, Inbound},
		{"v6 to a captured pod's :15008 -> hbone", unix.IPPROTO_TCP, ap(rem6, 40000), ap(podP6, HBONEPort), skPass, HBONE},
		{"to an uncaptured pod: left to the listening hash", unix.IPPROTO_TCP, ap(remote, 40000), ap(podC, 8080), skPass, noListener},
		{"from a captured pod, not on its veth (the ztunnel's own dial)", unix.IPPROTO_TCP, ap(podP, 62000), ap(remote, 6443), skPass, noListener},
		{"UDP to a captured pod", unix.IPPROTO_UDP, ap(remote, 40000), ap(podP, 53), skPass, noListener},
	} {
		ret, cookie := run(tc.proto, tc.src, tc.dst)
		if ret != tc.want || (tc.listener == noListener) != (cookie == 0) || tc.listener != noListener && cookie != cookies[tc.listener] {
			t.Errorf("%s: verdict %d, socket cookie %d; want verdict %d and the %s listener (cookies %v)", tc.name, ret, cookie, tc.want, tc.listener, cookies)
		}
	}
	if err := ls.Unregister(Inbound, IPv4); err != nil {
		t.Fatal(err)
	}
	if ret, cookie := run(unix.IPPROTO_TCP, ap(remote, 40000), ap(podP, 8080)); ret != skDrop || cookie != 0 {
		t.Errorf("to a captured pod with no inbound listener: verdict %d, cookie %d; want SK_DROP (fail closed, never a host listener)", ret, cookie)
	}
}

// nft loads an nftables ruleset into the calling thread's network
// namespace (the test's, see enterNetns).
func nft(tb testing.TB, ruleset string) {
	tb.Helper()
	cmd := exec.Command("nsenter", fmt.Sprintf("--net=/proc/%d/task/%d/ns/net", os.Getpid(), unix.Gettid()), "nft", "-f", "-")
	cmd.Stdin = strings.NewReader(ruleset)
	if out, err := cmd.CombinedOutput(); err != nil {
		tb.Fatalf("nft: %v: %s", err, out)
	}
}

// TestPrivilegedProgRunEscaped checks the pod program's egress half on
// forwarded packets: a SYN to a captured pod on its veth escaped capture
// at ingress (the node translated its destination), and is turned back to
// lo's ingress with the addresses it had before the translation, which
// conntrack holds — with valid checksums — or dropped when it cannot be;
// everything else passes. The connections the conntrack entries come from
// are the test's own, through nftables NAT in output (DNAT, and SNAT as a
// NodePort's masquerade does), as kube-proxy translates a pod's.
func TestPrivilegedProgRunEscaped(t *testing.T) {
	privileged.Require(t)
	d, idx := capturedNetns(t, 2)
	vethA, vethC := idx[0], idx[1]
	ap := netip.AddrPortFrom
	vip1, vip2, vip6 := ap(netip.MustParseAddr("198.18.100.1"), 80), ap(netip.MustParseAddr("198.18.100.2"), 80), ap(netip.MustParseAddr("2001:db8:100::1"), 80)
	masq := netip.MustParseAddr("198.19.3.3")
	addLocal(t, podP, podP6, remote, rem6, masq, vip1.Addr(), vip2.Addr(), vip6.Addr())
	nft(t, fmt.Sprintf(`table inet amber-test {
	chain output {
		type nat hook output priority -100; policy accept;
		ip daddr %[1]s tcp dport 80 dnat ip to %[4]s:9080
		ip daddr %[2]s tcp dport 80 dnat ip to %[4]s:9080
		ip6 daddr %[3]s tcp dport 80 dnat ip6 to [%[5]s]:9080
	}
	chain postrouting {
		type nat hook postrouting priority 100; policy accept;
		ct original ip daddr %[2]s snat ip to %[6]s
	}
}
`, vip1.Addr(), vip2.Addr(), vip6.Addr(), podP, podP6, masq))
	// The server's sockets: an uncaptured pod's would be in its own
	// namespace, here they are host sockets.
	accepted := map[netip.AddrPort]netip.AddrPort{} // client's address → the server's peer
	for _, c := range []struct{ client, vip netip.AddrPort }{
		{ap(remote, 40100), vip1}, {ap(remote, 40101), vip2}, {ap(rem6, 40100), vip6},
	} {
		ln, err := net.ListenTCP("tcp", net.TCPAddrFromAddrPort(ap(map[bool]netip.Addr{false: podP, true: podP6}[c.vip.Addr().Is6()], 9080)))
		if err != nil {
			t.Fatal(err)
		}
		dialFrom(t, c.client, c.vip, 0)
		s, err := ln.AcceptTCP()
		ln.Close()
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { s.Close() })
		peer := netip.MustParseAddrPort(s.RemoteAddr().String())
		accepted[c.client] = ap(peer.Addr().Unmap(), peer.Port())
	}
	snat := accepted[ap(remote, 40101)]
	if snat.Addr() != masq {
		t.Fatalf("the server saw %s, want the masquerade address %s", snat, masq)
	}

	ln := transparentListener(t, "[::]:0")
	sl := &slots{ls: registerAll(t, d.PinRoot(), ln), sock: ln}
	pk := func(src, dst netip.AddrPort, syn, ack bool) *pkt {
		return &pkt{src: src.Addr(), dst: dst.Addr(), proto: protoTCP, sport: src.Port(), dport: dst.Port(), syn: syn, ack: ack}
	}
	synTo := func(src, dst netip.AddrPort) pkt { return *pk(src, dst, true, false) }
	ep, ep6 := ap(podP, 9080), ap(podP6, 9080)
	frag := synTo(ap(remote, 40300), ap(podP, 9080))
	frag.moreFrags = true
	trunc := synTo(ap(remote, 40300), ap(podP, 9080))
	trunc.truncate = 4
	hop := synTo(ap(rem6, 40300), ep6)
	hop.v6Ext = []int{0}
	const (
		actRedirect = 7 // TC_ACT_REDIRECT
		mark        = 0x40000
		lo          = 1
	)
	fwd := vethC // the interface a forwarded packet came in on
	runTable(t, d, sl, []runCase{
		{name: "DNATed SYN: back to the Service address", prog: roleToPod, ifindex: vethA, ingress: fwd, pkt: synTo(ap(remote, 40100), ep), want: actRedirect, reason: "redirect_escaped", only: only(Inbound), wantMark: mark, zeroMAC: true, out: pk(ap(remote, 40100), vip1, true, false)},
		{name: "v6 DNATed SYN: back to the Service address", prog: roleToPod, ifindex: vethA, ingress: fwd, pkt: synTo(ap(rem6, 40100), ep6), want: actRedirect, reason: "redirect_escaped", only: only(Inbound), wantMark: mark, zeroMAC: true, out: pk(ap(rem6, 40100), vip6, true, false)},
		{name: "masqueraded SYN: back to the client and the Service address", prog: roleToPod, ifindex: vethA, ingress: fwd, pkt: synTo(snat, ep), want: actRedirect, reason: "redirect_escaped", only: only(Inbound), wantMark: mark, zeroMAC: true, out: pk(ap(remote, 40101), vip2, true, false)},
		{name: "untranslated SYN (an interface without the ingress program)", prog: roleToPod, ifindex: vethA, ingress: fwd, pkt: synTo(ap(remote, 40200), ep), want: actRedirect, reason: "redirect_escaped", only: only(Inbound), wantMark: mark, zeroMAC: true, out: pk(ap(remote, 40200), ep, true, false)},
		{name: "SYN to :15008 goes to the HBONE listener", prog: roleToPod, ifindex: vethA, ingress: fwd, pkt: synTo(ap(remote, 40200), ap(podP, HBONEPort)), want: actRedirect, reason: "redirect_escaped", only: only(HBONE), wantMark: mark, zeroMAC: true},
		{name: "SYN to :15008 without the HBONE listener: fail closed", prog: roleToPod, ifindex: vethA, ingress: fwd, pkt: synTo(ap(remote, 40200), ap(podP, HBONEPort)), want: actShot, reason: "drop_no_listener", only: only(Inbound)},
		{name: "no inbound listener: fail closed", prog: roleToPod, ifindex: vethA, ingress: fwd, pkt: synTo(ap(remote, 40100), ep), want: actShot, reason: "drop_no_listener", only: only(noListener)},
		{name: "came in through lo: steered once, not delivered", prog: roleToPod, ifindex: vethA, ingress: lo, pkt: synTo(ap(remote, 40100), ep), want: actShot, reason: "drop_escaped"},
		{name: "v6 SYN behind a hop-by-hop header", prog: roleToPod, ifindex: vethA, ingress: fwd, pkt: hop, want: actRedirect, reason: "redirect_escaped", only: only(Inbound), wantMark: mark, zeroMAC: true},
		{name: "fragment to a captured pod", prog: roleToPod, ifindex: vethA, ingress: fwd, pkt: frag, want: actShot, reason: "drop_fragment"},
		{name: "truncated TCP to a captured pod", prog: roleToPod, ifindex: vethA, ingress: fwd, pkt: trunc, want: actShot, reason: "drop_malformed"},
		{name: "forwarded ACK passes", prog: roleToPod, ifindex: vethA, ingress: fwd, pkt: *pk(ap(remote, 40100), ep, false, true), want: actOK, reason: "pass_to_pod"},
		{name: "forwarded SYN-ACK passes", prog: roleToPod, ifindex: vethA, ingress: fwd, pkt: *pk(ap(remote, 40100), ep, true, true), want: actOK, reason: "pass_to_pod"},
		{name: "SYN to an uncaptured pod passes", prog: roleToPod, ifindex: vethC, ingress: vethA, pkt: synTo(ap(remote, 40100), ap(podC, 9080)), want: actOK, reason: "pass_to_pod"},
		{name: "captured pod's address out of another veth passes", prog: roleToPod, ifindex: vethC, ingress: fwd, pkt: synTo(ap(remote, 40100), ep), want: actOK, reason: "pass_to_pod"},
		{name: "forwarded UDP passes", prog: roleToPod, ifindex: vethA, ingress: fwd, pkt: pkt{src: remote, dst: podP, proto: protoUDP, sport: 53, dport: 9080}, want: actOK, reason: "pass_to_pod"},
		// The ingress half: a packet of the masqueraded connection, still
		// addressed to the Service, is looked up under the translated
		// source and destination (this socket is not the ztunnel's).
		{name: "masqueraded connection's packet found under both translated addresses", prog: RoleUplink, ifindex: vethC, pkt: *pk(ap(remote, 40101), vip2, false, true), want: actOK, reason: "pass_host_socket"},
	})
}
