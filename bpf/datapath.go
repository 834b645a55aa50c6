// Package bpf loads, pins and attaches amber's capture programs and gives
// typed access to their maps: pod membership, listener sockets and
// per-reason counters. It knows only the kernel's BPF objects: the host
// routing assigned packets need is bpf/hostnet's, so that the ztunnel,
// which only registers listeners and reads counters, links no netlink
// library.
package bpf

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"
)

// Defaults shared by the agent, the ztunnel and amberctl.
const (
	// DefaultPinRoot is where programs' links and maps are pinned.
	DefaultPinRoot = "/sys/fs/bpf/amber"
	// DefaultMaxPods is the membership capacity per node.
	DefaultMaxPods = 1024
	// BypassMark is the SO_MARK of every socket the ztunnel opens (Istio's
	// value); packets carrying it under BypassMask are never captured.
	BypassMark = 0x539
	// BypassMask selects the bits of BypassMark.
	BypassMask = 0xfff
	// HBONEPort is the inbound HBONE port a connection to a captured pod
	// is addressed to by a remote ztunnel.
	HBONEPort = 15008
	// DefaultRouteMark is the mark the programs set on every packet they
	// assign to a socket, under mask DefaultRouteMark; bpf/hostnet's
	// fwmark rule delivers such packets locally. Bit 18 is clear of
	// kube-proxy's 0x4000/0x8000, Istio's 0x539/0xfff and Calico's default
	// 0xffff0000 range.
	DefaultRouteMark = 0x40000
	// DialPortMin is the lowest source port the ztunnel binds when it
	// dials from a pod's address (ports DialPortMin-65535, above Linux's
	// default ephemeral range, which pods use). The pod program's egress
	// half looks for the node's replies to such dials only at these ports.
	DialPortMin = 61000
)

// Sentinel errors.
var (
	// ErrMapFull is returned when membership capacity is exhausted.
	ErrMapFull = errors.New("membership map full")
	// ErrIncompatiblePins is returned when maps pinned by an earlier
	// version or with other settings cannot be reused.
	ErrIncompatiblePins = errors.New("pinned maps incompatible")
)

// Config selects where state is pinned and how the programs behave. The
// zero value is the production configuration.
type Config struct {
	// PinRoot is the bpffs directory holding maps and links.
	// Zero means DefaultPinRoot.
	PinRoot string
	// MaxPods is the number of pods the membership maps hold (each pod
	// may have an IPv4 and an IPv6 address). Zero means DefaultMaxPods.
	// Changing it needs `amberctl uninstall` first: pinned maps keep
	// their size.
	MaxPods int
	// RouteMark is the mark set on assigned packets; the host's fwmark
	// rule (hostnet.Config.Mark) must match it. Zero means
	// DefaultRouteMark.
	RouteMark uint32
}

func (c Config) pinRoot() string {
	if c.PinRoot == "" {
		return DefaultPinRoot
	}
	return c.PinRoot
}

func (c Config) maxPods() int {
	if c.MaxPods <= 0 {
		return DefaultMaxPods
	}
	return c.MaxPods
}

// Datapath is a loaded set of capture programs with their pinned maps.
// Links and maps outlive it: Close releases this process's handles only.
type Datapath struct {
	cfg  Config
	root string
	objs captureObjects
}

// Load loads the capture programs, creating or reusing the maps pinned
// under cfg.PinRoot. Load does not attach anything; links pinned by an
// earlier process keep running the earlier programs until Attach replaces
// them. Assigned packets reach their sockets only with the host routing
// of bpf/hostnet (hostnet.Ensure) in place.
func Load(cfg Config) (*Datapath, error) {
	root := cfg.pinRoot()
	if err := ensureBPFFS(root); err != nil {
		return nil, err
	}
	if err := os.MkdirAll(filepath.Join(root, linksDir), 0o700); err != nil {
		return nil, fmt.Errorf("create pin root: %w", err)
	}
	spec, err := loadCapture()
	if err != nil {
		return nil, err
	}
	mark := cfg.RouteMark
	if mark == 0 {
		mark = DefaultRouteMark
	}
	for name, v := range map[string]any{
		captureVarRouteMark:   mark,
		captureVarBypassMark:  uint32(BypassMark),
		captureVarBypassMask:  uint32(BypassMask),
		captureVarHbonePort:   uint16(HBONEPort),
		captureVarDialPortMin: uint16(DialPortMin),
	} {
		if err := spec.Variables[name].Set(v); err != nil {
			return nil, fmt.Errorf("set %s: %w", name, err)
		}
	}
	n := cfg.maxPods()
	spec.Maps[captureMapAmberPods].MaxEntries = uint32(2 * n)
	spec.Maps[captureMapAmberIfaces].MaxEntries = uint32(n)

	// Counters are statistics, not state: when a new version counts more
	// reasons, start them afresh instead of refusing to load.
	if err := dropIfIncompatible(root, spec.Maps[captureMapAmberCounters]); err != nil {
		return nil, err
	}

	d := &Datapath{cfg: cfg, root: root}
	err = spec.LoadAndAssign(&d.objs, &ebpf.CollectionOptions{
		Maps: ebpf.MapOptions{PinPath: root},
	})
	if errors.Is(err, ebpf.ErrMapIncompatible) {
		return nil, fmt.Errorf("load capture programs: %w: %w (the maps under %s were made by another version or with another capacity; `amberctl uninstall` removes them)", ErrIncompatiblePins, err, root)
	}
	if err != nil {
		return nil, fmt.Errorf("load capture programs: %w", err)
	}
	return d, nil
}

// Close releases this process's handles. Pinned maps and links stay.
func (d *Datapath) Close() error {
	return d.objs.Close()
}

// PinRoot is the bpffs directory this datapath pins to.
func (d *Datapath) PinRoot() string { return d.root }

func dropIfIncompatible(root string, spec *ebpf.MapSpec) error {
	path := filepath.Join(root, spec.Name)
	m, err := ebpf.LoadPinnedMap(path, nil)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("open pinned %s: %w", spec.Name, err)
	}
	defer m.Close()
	if spec.Compatible(m) == nil {
		return nil
	}
	if err := m.Unpin(); err != nil {
		return fmt.Errorf("replace pinned %s: %w", spec.Name, err)
	}
	return nil
}

// ensureBPFFS mounts bpffs at /sys/fs/bpf when root lives there and
// nothing is mounted yet (minimal hosts and fresh mount namespaces).
func ensureBPFFS(root string) error {
	const base = "/sys/fs/bpf"
	if !strings.HasPrefix(filepath.Clean(root)+"/", base+"/") {
		return checkBPFFS(filepath.Dir(root))
	}
	var st unix.Statfs_t
	if err := unix.Statfs(base, &st); err == nil && st.Type == unix.BPF_FS_MAGIC {
		return nil
	}
	if err := os.MkdirAll(base, 0o755); err != nil {
		return fmt.Errorf("mount bpffs: %w", err)
	}
	if err := unix.Mount("bpf", base, "bpf", 0, "mode=0700"); err != nil {
		return fmt.Errorf("mount bpffs at %s: %w", base, err)
	}
	return nil
}

func checkBPFFS(dir string) error {
	var st unix.Statfs_t
	if err := unix.Statfs(dir, &st); err != nil {
		return fmt.Errorf("pin root: %w", err)
	}
	if st.Type != unix.BPF_FS_MAGIC {
		return fmt.Errorf("pin root %s is not on a bpf filesystem", dir)
	}
	return nil
}
