package capture

import (
	"errors"
	"net/netip"
	"slices"
	"testing"

	"github.com/amber-mesh/amber/bpf"
)

// contractCapacity is the number of pods the contract's datapaths hold:
// as many veths, twice as many addresses.
const contractCapacity = 4

// testDatapathContract checks what the controller relies on of a
// Datapath. The in-memory fake the unit tests use and the real
// *bpf.Datapath (TestPrivilegedDatapathContract) both run it, so the
// fake cannot drift from the kernel's semantics. newDP returns a fresh,
// empty datapath of contractCapacity pods and two veths its Attach can
// run on.
func testDatapathContract(t *testing.T, newDP func(t *testing.T) (Datapath, [2]int)) {
	a4, a6, b4 := addr("10.0.0.7"), addr("fd00::7"), addr("10.0.0.8")
	members := func(t *testing.T, dp Datapath, want ...bpf.Member) {
		t.Helper()
		expectList(t, "members", dp.Members, want)
	}
	captured := func(t *testing.T, dp Datapath, want ...int) {
		t.Helper()
		expectList(t, "captured veths", dp.CapturedIfaces, want)
	}

	t.Run("capture lists addresses and veths in order", func(t *testing.T) {
		dp, v := newDP(t)
		if err := dp.Capture(v[0], []netip.Addr{a6, a4}); err != nil {
			t.Fatal(err)
		}
		// An IPv4-mapped address is its IPv4 address.
		if err := dp.Capture(v[1], []netip.Addr{netip.AddrFrom16(b4.As16())}); err != nil {
			t.Fatal(err)
		}
		members(t, dp, bpf.Member{Addr: a4, Ifindex: v[0]}, bpf.Member{Addr: b4, Ifindex: v[1]}, bpf.Member{Addr: a6, Ifindex: v[0]})
		captured(t, dp, min(v[0], v[1]), max(v[0], v[1]))
	})

	t.Run("capture refuses no or invalid addresses", func(t *testing.T) {
		dp, v := newDP(t)
		if err := dp.Capture(v[0], nil); err == nil {
			t.Error("capture without addresses succeeded")
		}
		if err := dp.Capture(v[0], []netip.Addr{a4, {}}); err == nil {
			t.Error("capture of an invalid address succeeded")
		}
		members(t, dp)
		captured(t, dp)
	})

	t.Run("an address moves to the veth that captures it last", func(t *testing.T) {
		dp, v := newDP(t)
		if err := dp.Capture(v[0], []netip.Addr{a4}); err != nil {
			t.Fatal(err)
		}
		if err := dp.Capture(v[1], []netip.Addr{a4}); err != nil {
			t.Fatal(err)
		}
		members(t, dp, bpf.Member{Addr: a4, Ifindex: v[1]})
		// Releasing the old veth leaves the address its new owner holds.
		if err := dp.Release(v[0], []netip.Addr{a4}); err != nil {
			t.Fatal(err)
		}
		members(t, dp, bpf.Member{Addr: a4, Ifindex: v[1]})
		captured(t, dp, v[1])
	})

	t.Run("release of what is not there succeeds", func(t *testing.T) {
		dp, v := newDP(t)
		if err := dp.Capture(v[0], []netip.Addr{a4, a6}); err != nil {
			t.Fatal(err)
		}
		for range 2 {
			if err := dp.Release(v[0], []netip.Addr{a4, a6}); err != nil {
				t.Fatal(err)
			}
		}
		if err := dp.Release(v[1], []netip.Addr{b4}); err != nil {
			t.Fatal(err)
		}
		members(t, dp)
		captured(t, dp)
	})

	t.Run("capacity", func(t *testing.T) {
		dp, _ := newDP(t)
		// Veths are map keys here; Capture does not look at the
		// interfaces.
		veth := func(i int) int { return 1000 + i }
		for i := range contractCapacity {
			if err := dp.Capture(veth(i), []netip.Addr{netip.AddrFrom4([4]byte{10, 1, byte(i), 1}), netip.AddrFrom4([4]byte{10, 1, byte(i), 2})}); err != nil {
				t.Fatalf("pod %d of %d: %v", i+1, contractCapacity, err)
			}
		}
		if err := dp.Capture(veth(contractCapacity), []netip.Addr{netip.AddrFrom4([4]byte{10, 2, 0, 1})}); !errors.Is(err, bpf.ErrMapFull) {
			t.Errorf("a veth too many: %v, want ErrMapFull", err)
		}
		if err := dp.Capture(veth(0), []netip.Addr{netip.AddrFrom4([4]byte{10, 2, 0, 2})}); !errors.Is(err, bpf.ErrMapFull) {
			t.Errorf("an address too many: %v, want ErrMapFull", err)
		}
		// Re-capturing what is there needs no room.
		if err := dp.Capture(veth(0), []netip.Addr{netip.AddrFrom4([4]byte{10, 1, 0, 1}), netip.AddrFrom4([4]byte{10, 1, 0, 2})}); err != nil {
			t.Errorf("re-capture at capacity: %v", err)
		}
		if got, err := dp.CapturedIfaces(); err != nil || len(got) != contractCapacity {
			t.Errorf("captured veths %v, %v", got, err)
		}
	})

	t.Run("attach and detach", func(t *testing.T) {
		dp, v := newDP(t)
		for range 2 { // the second replaces the program in place
			if err := dp.Attach(v[0], bpf.RolePod); err != nil {
				t.Fatal(err)
			}
		}
		for range 2 {
			if err := dp.Detach(v[0], bpf.RolePod); err != nil {
				t.Fatal(err)
			}
		}
		if err := dp.Detach(v[1], bpf.RolePod); err != nil {
			t.Errorf("detach of nothing: %v", err)
		}
		if err := dp.Attach(0, bpf.RolePod); err == nil {
			t.Error("attach to ifindex 0 succeeded")
		}
	})
}

// expectList fails t unless list returns want.
func expectList[T comparable](t *testing.T, what string, list func() ([]T, error), want []T) {
	t.Helper()
	got, err := list()
	if err != nil {
		t.Fatalf("%s: %v", what, err)
	}
	if !slices.Equal(got, want) {
		t.Errorf("%s %v, want %v", what, got, want)
	}
}

func TestFakeDatapathContract(t *testing.T) {
	testDatapathContract(t, func(*testing.T) (Datapath, [2]int) {
		return newFakeDatapath(contractCapacity), [2]int{12, 7}
	})
}
