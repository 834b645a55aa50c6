package bpf

import (
	"encoding/binary"
	"net/netip"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"

	"github.com/amber-mesh/amber/test/privileged"
)

// BenchmarkProg reports the in-kernel cost of the pod program per packet
// kind, next to an empty tc program run the same way (the baseline), as
// ns/pkt and as a ratio. Run with: make bench-datapath.
func BenchmarkProg(b *testing.B) {
	privileged.Require(b)
	enterNetns(b)
	d := mustLoad(b, Config{})
	idx := vethIfaces(b, 2)
	if err := d.Capture(idx[0], []netip.Addr{podP, podP6}); err != nil {
		b.Fatal(err)
	}
	registerAll(b, d.PinRoot(), transparentListener(b, "[::]:0"))

	empty, err := ebpf.NewProgram(&ebpf.ProgramSpec{
		Type:         ebpf.SchedCLS,
		License:      "GPL",
		Instructions: asm.Instructions{asm.Mov.Imm(asm.R0, 0), asm.Return()},
	})
	if err != nil {
		b.Fatal(err)
	}
	defer empty.Close()

	syn := pkt{src: podP, dst: remote, proto: protoTCP, sport: 40000, dport: 80, syn: true}
	ack := syn
	ack.syn, ack.ack = false, true
	ackUncaptured := ack
	ackUncaptured.src = podC
	udp := pkt{src: podP, dst: remote, proto: protoUDP, sport: 5353, dport: 53}
	syn6 := pkt{src: podP6, dst: rem6, proto: protoTCP, sport: 40000, dport: 80, syn: true}

	// Each measurement is one BPF_PROG_TEST_RUN of many repetitions with
	// the veth's ifindex in the context; the syscall's own cost is spread
	// over the repetitions and is the same for the empty program.
	run := func(p *ebpf.Program, data []byte, ifindex int) float64 {
		ctx := make([]byte, 192)
		binary.NativeEndian.PutUint32(ctx[40:], uint32(ifindex))
		const repeat = 200000
		start := time.Now()
		if _, err := p.Run(&ebpf.RunOptions{Data: data, Context: ctx, Repeat: repeat}); err != nil {
			b.Fatal(err)
		}
		return float64(time.Since(start).Nanoseconds()) / repeat
	}
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		base := run(empty, ack.bytes(), idx[0])
		b.ReportMetric(base, "ns/pkt-empty-prog")
		for _, c := range []struct {
			name string
			p    pkt
		}{
			{"syn-captured", syn},
			{"syn6-captured", syn6},
			{"ack-captured", ack},
			{"ack-uncaptured", ackUncaptured},
			{"udp", udp},
		} {
			ns := run(d.objs.AmberPod, c.p.bytes(), idx[0])
			b.ReportMetric(ns, "ns/pkt-"+c.name)
			b.ReportMetric(ns/base, "x-empty-"+c.name)
		}
	}
}
