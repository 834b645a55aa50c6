package bpf

import (
	"net/netip"
	"testing"

	"github.com/amber-mesh/amber/test/privileged"
)

// TestPrivilegedMembershipReader: the ztunnel's read-only view of the
// pinned membership map follows Capture and Release.
func TestPrivilegedMembershipReader(t *testing.T) {
	privileged.Require(t)
	d, idx := capturedNetns(t, 1)
	ms, err := OpenMembership(d.PinRoot())
	if err != nil {
		t.Fatal(err)
	}
	defer ms.Close()
	check := func(a netip.Addr, want bool) {
		t.Helper()
		if got, err := ms.Captured(a); err != nil || got != want {
			t.Errorf("Captured(%s) = %v, %v; want %v", a, got, err, want)
		}
	}
	check(podP, true)
	check(podP6, true)
	check(podC, false)
	if err := d.Release(idx[0], []netip.Addr{podP, podP6}); err != nil {
		t.Fatal(err)
	}
	check(podP, false)
	if _, err := OpenMembership(t.TempDir()); err == nil {
		t.Error("OpenMembership of a directory without pins succeeded")
	}
}
