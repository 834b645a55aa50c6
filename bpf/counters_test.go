package bpf

import (
	"fmt"
	"regexp"
	"slices"
	"testing"

	"github.com/cilium/ebpf/btf"
)

// The counter names come from the embedded object's BTF: one per value
// of enum reason, in its order, spelled as amberctl, the metrics and the
// docs spell them.
func TestReasonNames(t *testing.T) {
	reasons, err := Reasons()
	if err != nil {
		t.Fatal(err)
	}
	if len(reasons) != int(captureReasonR_MAX) {
		t.Fatalf("%d reasons, enum reason has %d", len(reasons), captureReasonR_MAX)
	}
	word := regexp.MustCompile(`^(pass|assign|redirect|drop)_[a-z0-9_]+$`)
	seen := map[string]bool{}
	for _, r := range reasons {
		n := r.String()
		if !word.MatchString(n) || seen[n] {
			t.Errorf("reason %d: name %q", uint32(r), n)
		}
		seen[n] = true
	}
	for r, want := range map[captureReason]string{
		captureReasonR_PASS_NOT_IP:         "pass_not_ip",
		captureReasonR_ASSIGN_HBONE:        "assign_hbone",
		captureReasonR_REDIRECT_HOST_REPLY: "redirect_host_reply",
		captureReasonR_DROP_NO_LISTENER:    "drop_no_listener",
	} {
		if got := Reason(r).String(); got != want {
			t.Errorf("reason %d is %q, want %q", r, got, want)
		}
	}
	if got, want := Reason(captureReasonR_MAX).String(), fmt.Sprintf("reason(%d)", captureReasonR_MAX); got != want {
		t.Errorf("R_MAX named %q, want %q: it is the map's size, not a reason", got, want)
	}
}

func TestNamesOf(t *testing.T) {
	enum := func(names ...string) *btf.Enum {
		e := &btf.Enum{Name: "reason", Size: 4}
		for i, n := range names {
			e.Values = append(e.Values, btf.EnumValue{Name: n, Value: uint64(i)})
		}
		return e
	}
	// A value added anywhere gets its name, with or without R_MAX.
	for _, e := range []*btf.Enum{
		enum("R_PASS_A", "R_PASS_NEW", "R_DROP_B", "R_MAX"),
		enum("R_PASS_A", "R_PASS_NEW", "R_DROP_B"),
	} {
		got, err := namesOf(e)
		if err != nil || !slices.Equal(got, []string{"pass_a", "pass_new", "drop_b"}) {
			t.Errorf("%v: %q, %v", e.Values, got, err)
		}
	}
	gap := enum("R_PASS_A", "R_DROP_B")
	gap.Values[1].Value = 2
	for _, e := range []*btf.Enum{
		enum("R_PASS_A", "DROP_B"),          // not a reason's name
		gap,                                 // a key the counters map does not have
		enum("R_PASS_A", "R_MAX", "R_DROP"), // R_MAX is the map's size
	} {
		if got, err := namesOf(e); err == nil {
			t.Errorf("%v: %q, want an error", e.Values, got)
		}
	}
}
