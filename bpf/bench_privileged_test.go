package bpf

import (
	"encoding/binary"
	"net"
	"net/netip"
	"testing"
	"time"

	"github.com/cilium/ebpf"

	"github.com/amber-mesh/amber/test/privileged"
)

// BenchmarkProg reports the in-kernel cost of the pod program (both
// halves) per packet kind, next to an empty tc program run the same way
// (the baseline), as ns/pkt and as a ratio. The node's sk_lookup program is
// attached, as on a node: the pod program's socket lookups fall back to
// listener lookups, which run it. Run with: make bench-datapath.
func BenchmarkProg(b *testing.B) {
	privileged.Require(b)
	d, idx := capturedNetns(b, 2)
	registerAll(b, d.PinRoot(), transparentListener(b, "[::]:0"))
	if err := d.Attach(0, RoleNode); err != nil {
		b.Fatal(err)
	}
	// The ztunnel's dial from the captured pod to a server on the node.
	node := netip.MustParseAddr("198.18.0.1")
	addLocal(b, podP, node)
	ln, err := net.ListenTCP("tcp", net.TCPAddrFromAddrPort(netip.AddrPortFrom(node, 7000)))
	if err != nil {
		b.Fatal(err)
	}
	defer ln.Close()
	dialFrom(b, netip.AddrPortFrom(podP, 62000), netip.AddrPortFrom(node, 7000), BypassMark)

	empty := emptyTC(b)

	syn := pkt{src: podP, dst: remote, proto: protoTCP, sport: 40000, dport: 80, syn: true}
	ack := syn
	ack.syn, ack.ack = false, true
	ackUncaptured := ack
	ackUncaptured.src = podC
	udp := pkt{src: podP, dst: remote, proto: protoUDP, sport: 5353, dport: 53}
	syn6 := pkt{src: podP6, dst: rem6, proto: protoTCP, sport: 40000, dport: 80, syn: true}
	toPod := pkt{src: remote, dst: podP, proto: protoTCP, sport: 80, dport: 40000, ack: true}
	synToPod := pkt{src: remote, dst: podC, proto: protoTCP, sport: 40000, dport: 80, syn: true}
	// A SYN that escaped capture, untracked: conntrack is looked up and
	// misses, the frame is redirected unchanged (with a translation, the
	// first repetition would rewrite the frame in place and the others
	// see it untranslated).
	escaped := pkt{src: remote, dst: podP, proto: protoTCP, sport: 40000, dport: 80, syn: true}
	probe := pkt{src: node, dst: podP, proto: protoTCP, sport: 40000, dport: 8080, ack: true}
	probeHigh := probe
	probeHigh.dport = 62001
	reply := pkt{src: node, dst: podP, proto: protoTCP, sport: 7000, dport: 62000, ack: true}

	// Each measurement is one BPF_PROG_TEST_RUN of many repetitions with
	// the veth's ifindex (and, for a forwarded packet, an ingress
	// interface) in the context; the syscall's own cost is spread over the
	// repetitions and is the same for the empty program.
	run := func(p *ebpf.Program, data []byte, ifindex, ingress int) float64 {
		ctx := make([]byte, 192)
		binary.NativeEndian.PutUint32(ctx[40:], uint32(ifindex))
		binary.NativeEndian.PutUint32(ctx[36:], uint32(ingress))
		const repeat = 200000
		start := time.Now()
		if _, err := p.Run(&ebpf.RunOptions{Data: data, Context: ctx, Repeat: repeat}); err != nil {
			b.Fatal(err)
		}
		return float64(time.Since(start).Nanoseconds()) / repeat
	}
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		base := run(empty, ack.bytes(), idx[0], 0)
		b.ReportMetric(base, "ns/pkt-empty-prog")
		captured, uncaptured := idx[0], idx[1]
		for _, c := range []struct {
			name    string
			prog    *ebpf.Program
			p       pkt
			ifindex int
			ingress int
		}{
			{"syn-captured", d.objs.AmberPod, syn, captured, 0},
			{"syn6-captured", d.objs.AmberPod, syn6, captured, 0},
			{"ack-captured", d.objs.AmberPod, ack, captured, 0},
			{"ack-uncaptured", d.objs.AmberPod, ackUncaptured, uncaptured, 0},
			{"udp", d.objs.AmberPod, udp, captured, 0},
			// amber_to_pod: forwarded (a packet of a connection, a SYN
			// to an uncaptured pod, a SYN that escaped capture), the
			// node's own (a probe, one at a port of the ztunnel's dial
			// range), a reply to the ztunnel.
			{"to-pod-forwarded", d.objs.AmberToPod, toPod, captured, uncaptured},
			{"to-pod-forwarded-syn", d.objs.AmberToPod, synToPod, uncaptured, captured},
			{"to-pod-escaped-syn", d.objs.AmberToPod, escaped, captured, uncaptured},
			{"to-pod-probe", d.objs.AmberToPod, probe, captured, 0},
			{"to-pod-probe-dialport", d.objs.AmberToPod, probeHigh, captured, 0},
			{"to-pod-host-reply", d.objs.AmberToPod, reply, captured, 0},
		} {
			ns := run(c.prog, c.p.bytes(), c.ifindex, c.ingress)
			b.ReportMetric(ns, "ns/pkt-"+c.name)
			b.ReportMetric(ns/base, "x-empty-"+c.name)
		}
	}
}
