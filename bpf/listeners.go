package bpf

import (
	"errors"
	"fmt"
	"path/filepath"
	"syscall"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"
)

// Listener names a ztunnel listener the capture programs assign new
// connections to.
type Listener int

// The three transparent listeners (ARCHITECTURE.md, Ports).
const (
	Outbound Listener = iota // 15001: connections leaving a captured pod
	Inbound                  // 15006: plaintext connections to a captured pod
	HBONE                    // 15008: HBONE connections to a captured pod
)

func (l Listener) String() string {
	switch l {
	case Outbound:
		return "outbound"
	case Inbound:
		return "inbound"
	case HBONE:
		return "hbone"
	}
	return fmt.Sprintf("listener(%d)", int(l))
}

// Family selects the IPv4 or IPv6 slot of a listener.
type Family int

const (
	IPv4 Family = 4
	IPv6 Family = 6
)

func slot(l Listener, f Family) (uint32, error) {
	if l < Outbound || l > HBONE {
		return 0, fmt.Errorf("unknown listener %d", int(l))
	}
	s := uint32(l)
	switch f {
	case IPv4:
	case IPv6:
		s += uint32(captureListenerSlotSLOT_OUTBOUND6)
	default:
		return 0, fmt.Errorf("unknown family %d", int(f))
	}
	return s, nil
}

// Listeners is the pinned listener SOCKMAP as the ztunnel sees it.
// The kernel removes a socket from it when the socket closes, so a
// ztunnel that exits leaves captured connections failing closed.
type Listeners struct {
	m *ebpf.Map
}

// OpenListeners opens the listener map pinned under root (the agent must
// have loaded the datapath).
func OpenListeners(root string) (*Listeners, error) {
	if root == "" {
		root = DefaultPinRoot
	}
	m, err := ebpf.LoadPinnedMap(filepath.Join(root, captureMapAmberListeners), nil)
	if err != nil {
		return nil, fmt.Errorf("open listener map under %s (is the agent running?): %w", root, err)
	}
	return &Listeners{m: m}, nil
}

// Register puts the listening socket into the slot of (l, f). The socket
// must be a TCP listener in the capture's network namespace with
// IP_TRANSPARENT (IPV6_TRANSPARENT) set and MPTCP off; a dual-stack socket
// may be registered for both families.
func (ls *Listeners) Register(l Listener, f Family, sock syscall.Conn) error {
	s, err := slot(l, f)
	if err != nil {
		return err
	}
	rc, err := sock.SyscallConn()
	if err != nil {
		return fmt.Errorf("register %s listener: %w", l, err)
	}
	var uerr error
	if err := rc.Control(func(fd uintptr) {
		uerr = ls.m.Update(s, uint64(fd), ebpf.UpdateAny)
	}); err != nil {
		return fmt.Errorf("register %s listener: %w", l, err)
	}
	if uerr != nil {
		return fmt.Errorf("register %s ipv%d listener: %w", l, f, uerr)
	}
	return nil
}

// Unregister empties the slot of (l, f): new connections needing it are
// dropped from then on.
func (ls *Listeners) Unregister(l Listener, f Family) error {
	s, err := slot(l, f)
	if err != nil {
		return err
	}
	if err := ls.m.Delete(s); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
		return fmt.Errorf("unregister %s ipv%d listener: %w", l, f, err)
	}
	return nil
}

// UnregisterSocket empties the slot of (l, f) if it holds sock, and leaves
// it alone if another socket (a newer ztunnel's) took it: a ztunnel that
// stops takes its listeners out of the datapath before closing them, so
// that new connections wait (their SYNs are dropped and retransmitted)
// instead of being reset by a closing listener.
func (ls *Listeners) UnregisterSocket(l Listener, f Family, sock syscall.Conn) error {
	s, err := slot(l, f)
	if err != nil {
		return err
	}
	rc, err := sock.SyscallConn()
	if err != nil {
		return fmt.Errorf("unregister %s listener: %w", l, err)
	}
	var mine uint64
	var cerr error
	if err := rc.Control(func(fd uintptr) {
		mine, cerr = unix.GetsockoptUint64(int(fd), unix.SOL_SOCKET, unix.SO_COOKIE)
	}); err != nil || cerr != nil {
		return fmt.Errorf("unregister %s listener: socket cookie: %w", l, errors.Join(err, cerr))
	}
	var held uint64
	if err := ls.m.Lookup(s, &held); err != nil {
		if errors.Is(err, ebpf.ErrKeyNotExist) {
			return nil
		}
		return fmt.Errorf("unregister %s ipv%d listener: %w", l, f, err)
	}
	if held != mine {
		return nil
	}
	return ls.Unregister(l, f)
}

// Close releases the map handle; registrations stay.
func (ls *Listeners) Close() error { return ls.m.Close() }

// ListenerSlot is the registration state of one slot.
type ListenerSlot struct {
	Listener   string `json:"listener"`
	Family     int    `json:"family"`
	Registered bool   `json:"registered"`
	Cookie     uint64 `json:"socket_cookie,omitempty"`
}

// Slots reports which slots hold a socket. Reading a SOCKMAP from user
// space yields the socket's cookie, which identifies it in `ss -e`.
func (ls *Listeners) Slots() ([]ListenerSlot, error) {
	var out []ListenerSlot
	for _, f := range []Family{IPv4, IPv6} {
		for l := Outbound; l <= HBONE; l++ {
			s, _ := slot(l, f)
			var cookie uint64
			err := ls.m.Lookup(s, &cookie)
			if err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
				return nil, fmt.Errorf("read listener slot %d: %w", s, err)
			}
			out = append(out, ListenerSlot{Listener: l.String(), Family: int(f), Registered: err == nil, Cookie: cookie})
		}
	}
	return out, nil
}
