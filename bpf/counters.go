package bpf

import (
	"fmt"
	"path/filepath"

	"github.com/cilium/ebpf"
)

// Reason is why the programs let a packet pass, assigned it or dropped it.
type Reason uint32

// reasonNames are the stable names of the counters (amberctl, metrics).
// Indexed by the C enum reason; TestReasonNames keeps them complete.
var reasonNames = [...]string{
	captureReasonR_PASS_NOT_IP:         "pass_not_ip",
	captureReasonR_PASS_NOT_TCP:        "pass_not_tcp",
	captureReasonR_PASS_NOT_ENROLLED:   "pass_not_enrolled",
	captureReasonR_PASS_BYPASS_MARK:    "pass_bypass_mark",
	captureReasonR_PASS_HOST_SOCKET:    "pass_host_socket",
	captureReasonR_PASS_ESTABLISHED:    "pass_established",
	captureReasonR_PASS_MALFORMED:      "pass_malformed",
	captureReasonR_PASS_TUPLE_IN_USE:   "pass_tuple_in_use",
	captureReasonR_PASS_TO_POD:         "pass_to_pod",
	captureReasonR_ASSIGN_ESTABLISHED:  "assign_established",
	captureReasonR_ASSIGN_OUTBOUND:     "assign_outbound",
	captureReasonR_ASSIGN_INBOUND:      "assign_inbound",
	captureReasonR_ASSIGN_HBONE:        "assign_hbone",
	captureReasonR_REDIRECT_HOST_REPLY: "redirect_host_reply",
	captureReasonR_DROP_NO_LISTENER:    "drop_no_listener",
	captureReasonR_DROP_SPOOFED:        "drop_spoofed",
	captureReasonR_DROP_MALFORMED:      "drop_malformed",
	captureReasonR_DROP_FRAGMENT:       "drop_fragment",
	captureReasonR_DROP_ASSIGN_FAILED:  "drop_assign_failed",
}

func (r Reason) String() string {
	if int(r) < len(reasonNames) {
		return reasonNames[r]
	}
	return fmt.Sprintf("reason(%d)", uint32(r))
}

// Reasons lists every reason in counter order.
func Reasons() []Reason {
	out := make([]Reason, len(reasonNames))
	for i := range out {
		out[i] = Reason(i)
	}
	return out
}

// Counters maps a reason name to packets since the counters map was created.
type Counters map[string]uint64

// Counters sums the per-CPU counters.
func (d *Datapath) Counters() (Counters, error) {
	return readCounters(d.objs.AmberCounters)
}

// ReadCounters reads the counters pinned under root without loading
// anything (amberctl, the ztunnel's metrics).
func ReadCounters(root string) (Counters, error) {
	m, err := ebpf.LoadPinnedMap(filepath.Join(root, captureMapAmberCounters), nil)
	if err != nil {
		return nil, fmt.Errorf("open counters: %w", err)
	}
	defer m.Close()
	return readCounters(m)
}

func readCounters(m *ebpf.Map) (Counters, error) {
	out := make(Counters, len(reasonNames))
	var perCPU []uint64
	for _, r := range Reasons() {
		if err := m.Lookup(uint32(r), &perCPU); err != nil {
			return nil, fmt.Errorf("read counter %s: %w", r, err)
		}
		var sum uint64
		for _, v := range perCPU {
			sum += v
		}
		out[r.String()] = sum
	}
	return out, nil
}
