package bpf

import (
	"bytes"
	"fmt"
	"path/filepath"
	"strings"
	"sync"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/btf"
)

// Reason is why the programs let a packet pass, assigned it or dropped it:
// a value of capture.c's enum reason, which keys the counters map.
type Reason uint32

// reasonNames are the stable names of the counters (amberctl, metrics),
// indexed by reason: enum reason's R_PASS_NOT_IP is "pass_not_ip". They
// are read from the BTF of the object this package embeds, so a reason
// added to capture.c needs no Go edit.
var reasonNames = sync.OnceValues(func() ([]string, error) {
	spec, err := btf.LoadSpecFromReader(bytes.NewReader(_CaptureBytes))
	if err != nil {
		return nil, fmt.Errorf("reason names: %w", err)
	}
	var e *btf.Enum
	if err := spec.TypeByName("reason", &e); err != nil {
		return nil, fmt.Errorf("reason names: enum reason: %w", err)
	}
	return namesOf(e)
})

// namesOf turns enum reason's values into counter names. The values must
// count up from 0, as the counters map's keys do; R_MAX, the map's size,
// may end them.
func namesOf(e *btf.Enum) ([]string, error) {
	var names []string
	for i, v := range e.Values {
		name, ok := strings.CutPrefix(v.Name, "R_")
		switch {
		case !ok:
			return nil, fmt.Errorf("reason names: %s lacks the R_ prefix", v.Name)
		case v.Value != uint64(i):
			return nil, fmt.Errorf("reason names: %s is %d, want %d: reasons count up from 0", v.Name, v.Value, i)
		case name == "MAX" && i != len(e.Values)-1:
			return nil, fmt.Errorf("reason names: R_MAX is not the last value")
		case name == "MAX":
			return names, nil
		}
		names = append(names, strings.ToLower(name))
	}
	return names, nil
}

func (r Reason) String() string {
	if names, err := reasonNames(); err == nil && int(r) < len(names) {
		return names[r]
	}
	return fmt.Sprintf("reason(%d)", uint32(r))
}

// Reasons lists every reason in counter order.
func Reasons() ([]Reason, error) {
	names, err := reasonNames()
	if err != nil {
		return nil, err
	}
	out := make([]Reason, len(names))
	for i := range out {
		out[i] = Reason(i)
	}
	return out, nil
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
	reasons, err := Reasons()
	if err != nil {
		return nil, err
	}
	out := make(Counters, len(reasons))
	var perCPU []uint64
	for _, r := range reasons {
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
