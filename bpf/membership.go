package bpf

import (
	"errors"
	"fmt"
	"net/netip"
	"path/filepath"
	"sort"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"
)

// Member is one address of a captured pod.
type Member struct {
	Addr    netip.Addr `json:"addr"`
	Ifindex int        `json:"ifindex"`
}

func ipKey(a netip.Addr) captureIpKey {
	return captureIpKey{Addr: a.As16()}
}

func keyAddr(k captureIpKey) netip.Addr {
	return netip.AddrFrom16(k.Addr).Unmap()
}

// Capture makes the pod behind the host-side veth ifindex a captured pod
// with the given addresses (all of them: any other source address on that
// veth is dropped as spoofed). The veth must already run the pod program,
// as every local pod veth does.
//
// The veth is marked captured before its addresses are written. In between
// (and for good, if an address cannot be written because the map is full)
// the pod's packets are dropped as coming from an unregistered source:
// capture fails closed, never into plaintext.
func (d *Datapath) Capture(ifindex int, addrs []netip.Addr) error {
	if len(addrs) == 0 {
		return fmt.Errorf("capture ifindex %d: no addresses", ifindex)
	}
	for _, a := range addrs {
		if !a.IsValid() {
			return fmt.Errorf("capture ifindex %d: invalid address", ifindex)
		}
	}
	v := captureIfaceInfo{Flags: uint32(captureIfaceFlagsIFACE_CAPTURED_POD)}
	if err := d.objs.AmberIfaces.Update(uint32(ifindex), v, ebpf.UpdateAny); err != nil {
		return fmt.Errorf("capture ifindex %d: %w", ifindex, mapErr(err))
	}
	for _, a := range addrs {
		v := capturePodInfo{Ifindex: uint32(ifindex), Flags: uint32(capturePodFlagsPOD_CAPTURED)}
		if err := d.objs.AmberPods.Update(ipKey(a), v, ebpf.UpdateAny); err != nil {
			return fmt.Errorf("capture %s on ifindex %d: %w", a, ifindex, mapErr(err))
		}
	}
	return nil
}

// Release undoes Capture: the veth first, then its addresses. Entries that
// are already gone are not an error. An address now owned by another
// veth (an IP reused by a new pod) is left alone.
func (d *Datapath) Release(ifindex int, addrs []netip.Addr) error {
	var errs []error
	if err := d.objs.AmberIfaces.Delete(uint32(ifindex)); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
		errs = append(errs, fmt.Errorf("release ifindex %d: %w", ifindex, err))
	}
	for _, a := range addrs {
		var v capturePodInfo
		err := d.objs.AmberPods.Lookup(ipKey(a), &v)
		if errors.Is(err, ebpf.ErrKeyNotExist) || err == nil && int(v.Ifindex) != ifindex {
			continue
		}
		if err == nil {
			err = d.objs.AmberPods.Delete(ipKey(a))
		}
		if err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			errs = append(errs, fmt.Errorf("release %s: %w", a, err))
		}
	}
	return errors.Join(errs...)
}

// Membership reads the pinned membership map: which addresses the node's
// datapath captures. The ztunnel asks it before it passes a connection
// through to an address of this node's pods.
type Membership struct {
	m *ebpf.Map
}

// OpenMembership opens the membership map pinned under root (zero:
// DefaultPinRoot), read-only.
func OpenMembership(root string) (*Membership, error) {
	if root == "" {
		root = DefaultPinRoot
	}
	m, err := ebpf.LoadPinnedMap(filepath.Join(root, captureMapAmberPods), &ebpf.LoadPinOptions{ReadOnly: true})
	if err != nil {
		return nil, fmt.Errorf("open membership map under %s (is the agent running?): %w", root, err)
	}
	return &Membership{m: m}, nil
}

// Captured reports whether a is an address of a captured pod.
func (ms *Membership) Captured(a netip.Addr) (bool, error) {
	var v capturePodInfo
	err := ms.m.Lookup(ipKey(a), &v)
	if errors.Is(err, ebpf.ErrKeyNotExist) {
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("look up %s in the membership map: %w", a, err)
	}
	return v.Flags&uint32(capturePodFlagsPOD_CAPTURED) != 0, nil
}

// Close releases the map.
func (ms *Membership) Close() error { return ms.m.Close() }

// Members lists the membership map.
func (d *Datapath) Members() ([]Member, error) {
	return readMembers(d.objs.AmberPods)
}

// CapturedIfaces lists the veths marked captured.
func (d *Datapath) CapturedIfaces() ([]int, error) {
	return readIfaces(d.objs.AmberIfaces)
}

func readMembers(m *ebpf.Map) ([]Member, error) {
	var (
		out []Member
		k   captureIpKey
		v   capturePodInfo
	)
	it := m.Iterate()
	for it.Next(&k, &v) {
		out = append(out, Member{Addr: keyAddr(k), Ifindex: int(v.Ifindex)})
	}
	if err := it.Err(); err != nil {
		return nil, fmt.Errorf("read membership: %w", err)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Addr.Less(out[j].Addr) })
	return out, nil
}

func readIfaces(m *ebpf.Map) ([]int, error) {
	var (
		out []int
		k   uint32
		v   captureIfaceInfo
	)
	it := m.Iterate()
	for it.Next(&k, &v) {
		if v.Flags&uint32(captureIfaceFlagsIFACE_CAPTURED_POD) != 0 {
			out = append(out, int(k))
		}
	}
	if err := it.Err(); err != nil {
		return nil, fmt.Errorf("read captured interfaces: %w", err)
	}
	sort.Ints(out)
	return out, nil
}

// mapErr turns the kernel's "no room" answers into ErrMapFull.
func mapErr(err error) error {
	if errors.Is(err, unix.E2BIG) || errors.Is(err, unix.ENOSPC) || errors.Is(err, unix.ENOMEM) {
		return fmt.Errorf("%w: %w", ErrMapFull, err)
	}
	return err
}
