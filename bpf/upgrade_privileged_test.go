package bpf

import (
	"fmt"
	"os"
	"path/filepath"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"

	"github.com/amber-mesh/amber/test/privileged"
)

// TestPrivilegedLoadOverOlderPins loads over what an earlier version
// (c5b7f47) left pinned: a counters map with fewer reasons and a pod veth
// with an ingress link only. The counters are started afresh with every
// reason, the pod link keeps its identity and gets the new program, and the
// pod's egress half and the node's sk_lookup program are added.
func TestPrivilegedLoadOverOlderPins(t *testing.T) {
	privileged.Require(t)
	enterNetns(t)
	root := testPinRoot(t)
	veth := vethIfaces(t, 1)[0]
	if err := os.MkdirAll(filepath.Join(root, linksDir), 0o700); err != nil {
		t.Fatal(err)
	}

	// The earlier version's counters: 16 reasons.
	old, err := ebpf.NewMap(&ebpf.MapSpec{Type: ebpf.PerCPUArray, KeySize: 4, ValueSize: 8, MaxEntries: 16})
	if err != nil {
		t.Fatal(err)
	}
	defer old.Close()
	if err := old.Pin(filepath.Join(root, captureMapAmberCounters)); err != nil {
		t.Fatal(err)
	}
	// Its pod link, running its own program.
	l, err := link.AttachTCX(link.TCXOptions{Interface: veth, Program: emptyTC(t), Attach: ebpf.AttachTCXIngress})
	if err != nil {
		t.Fatal(err)
	}
	if err := l.Pin(filepath.Join(root, linksDir, fmt.Sprintf("pod-%d", veth))); err != nil {
		t.Fatal(err)
	}
	oldLink, err := l.Info()
	if err != nil {
		t.Fatal(err)
	}
	l.Close()

	d := mustLoad(t, Config{PinRoot: root})
	c, err := d.Counters()
	if err != nil {
		t.Fatal(err)
	}
	if len(c) != int(captureReasonR_MAX) {
		t.Errorf("%d counters after loading over 16, want %d", len(c), captureReasonR_MAX)
	}
	if err := d.Attach(veth, RolePod); err != nil {
		t.Fatal(err)
	}
	if err := d.Attach(0, RoleNode); err != nil {
		t.Fatal(err)
	}
	atts, err := Attachments(root)
	if err != nil {
		t.Fatal(err)
	}
	want := map[Hook]string{HookIngress: "amber_pod", HookEgress: "amber_to_pod", HookSkLookup: "amber_lookup"}
	for _, a := range atts {
		if want[a.Hook] != a.Program || !a.Live {
			t.Errorf("%s %s link runs %q (live %v), want %s", a.Role, a.Hook, a.Program, a.Live, want[a.Hook])
		}
		if a.Hook == HookIngress && a.LinkID != uint32(oldLink.ID) {
			t.Errorf("pod link %d replaced by %d: the program should be swapped in place", oldLink.ID, a.LinkID)
		}
		delete(want, a.Hook)
	}
	if len(want) > 0 {
		t.Errorf("missing links: %v (have %+v)", want, atts)
	}
}
