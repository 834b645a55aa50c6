package bpf

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"golang.org/x/sys/unix"
)

const linksDir = "links"

// Role says which programs an attachment point runs.
type Role string

const (
	// RolePod is the host side of a pod's veth: amber_pod at TCX ingress
	// (packets leaving the pod) and amber_to_pod at TCX egress (the
	// node's own replies to the ztunnel's dials from the pod's address).
	RolePod Role = "pod"
	// RoleUplink is a node uplink: packets arriving from other nodes.
	RoleUplink Role = "uplink"
	// RoleNode is the node's network namespace: amber_lookup picks the
	// ztunnel's listener when the kernel looks one up for a captured
	// connection (a SYN on a 4-tuple in TIME_WAIT). Its attachment point
	// is the calling thread's namespace, not an interface.
	RoleNode Role = "node"
)

// Hook is where in the kernel a program runs.
type Hook string

const (
	HookIngress  Hook = "ingress"   // TCX ingress of an interface
	HookEgress   Hook = "egress"    // TCX egress of an interface
	HookSkLookup Hook = "sk_lookup" // listener lookups of a network namespace
)

// hook is one program of a role, pinned as links/<pin>-<target>, where the
// target is the interface's index or, for sk_lookup, the network
// namespace's inode number. Pin names other versions do not know are
// skipped by them (their index does not parse).
type hook struct {
	role Role
	at   Hook
	pin  string
}

var hooks = []hook{
	{RolePod, HookIngress, "pod"},
	{RolePod, HookEgress, "pod-egress"},
	{RoleUplink, HookIngress, "uplink"},
	{RoleNode, HookSkLookup, "node-netns"},
}

func (d *Datapath) program(h hook) *ebpf.Program {
	switch {
	case h.role == RolePod && h.at == HookEgress:
		return d.objs.AmberToPod
	case h.role == RolePod:
		return d.objs.AmberPod
	case h.role == RoleUplink:
		return d.objs.AmberUplink
	}
	return d.objs.AmberLookup
}

func (h hook) path(root string, target uint64) string {
	return filepath.Join(root, linksDir, fmt.Sprintf("%s-%d", h.pin, target))
}

func (h hook) attach(target uint64, prog *ebpf.Program) (link.Link, error) {
	switch h.at {
	case HookIngress, HookEgress:
		at := ebpf.AttachTCXIngress
		if h.at == HookEgress {
			at = ebpf.AttachTCXEgress
		}
		return link.AttachTCX(link.TCXOptions{Interface: int(target), Program: prog, Attach: at})
	}
	ns, err := os.Open("/proc/thread-self/ns/net")
	if err != nil {
		return nil, err
	}
	defer ns.Close()
	if ino, err := fdInode(int(ns.Fd())); err != nil || ino != target {
		return nil, fmt.Errorf("network namespace changed under the calling thread (inode %d, want %d): %v", ino, target, err)
	}
	return link.AttachNetNs(int(ns.Fd()), prog)
}

// attachPoint returns the role's hooks and what they attach to: the
// interface index, or for RoleNode (ifindex 0) the calling thread's
// network namespace.
func attachPoint(ifindex int, r Role) ([]hook, uint64, error) {
	var hs []hook
	for _, h := range hooks {
		if h.role == r {
			hs = append(hs, h)
		}
	}
	switch {
	case len(hs) == 0:
		return nil, 0, fmt.Errorf("unknown role %q", r)
	case r == RoleNode && ifindex != 0:
		return nil, 0, fmt.Errorf("node programs attach to the calling thread's network namespace, not ifindex %d", ifindex)
	case r == RoleNode:
		t, err := currentNetns()
		return hs, t, err
	case ifindex <= 0:
		return nil, 0, fmt.Errorf("%s programs: invalid ifindex %d", r, ifindex)
	}
	return hs, uint64(ifindex), nil
}

func currentNetns() (uint64, error) {
	var st unix.Stat_t
	if err := unix.Stat("/proc/thread-self/ns/net", &st); err != nil {
		return 0, fmt.Errorf("network namespace of the calling thread: %w", err)
	}
	return st.Ino, nil
}

func fdInode(fd int) (uint64, error) {
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return 0, err
	}
	return st.Ino, nil
}

// Attach runs the role's programs on ifindex (in the calling thread's
// network namespace) — or, for RoleNode, whose ifindex must be 0, on the
// calling thread's network namespace — and pins their links. If a pinned
// link exists, its program is replaced atomically (BPF_LINK_UPDATE): there
// is no moment without a program. A pin whose target is gone (an interface
// index or a namespace inode may be reused) is replaced by a new
// attachment.
func (d *Datapath) Attach(ifindex int, r Role) error {
	hs, t, err := attachPoint(ifindex, r)
	if err != nil {
		return err
	}
	for _, h := range hs {
		if err := d.attachHook(h, t); err != nil {
			return err
		}
	}
	return nil
}

func (d *Datapath) attachHook(h hook, t uint64) error {
	prog := d.program(h)
	path := h.path(d.root, t)
	if l, err := link.LoadPinnedLink(path, nil); err == nil {
		live := linkTarget(l) == t
		if live {
			err = l.Update(prog)
		} else {
			err = l.Unpin()
		}
		l.Close()
		if err != nil {
			return fmt.Errorf("replace %s %s program on %d: %w", h.role, h.at, t, err)
		}
		if live {
			return nil
		}
	} else if !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("open pinned link %s: %w", path, err)
	}

	l, err := h.attach(t, prog)
	if err != nil {
		return fmt.Errorf("attach %s %s program to %d: %w", h.role, h.at, t, err)
	}
	defer l.Close()
	if err := l.Pin(path); err != nil {
		return fmt.Errorf("pin %s %s link of %d: %w", h.role, h.at, t, err)
	}
	return nil
}

// Detach removes the role's programs from ifindex (RoleNode: ifindex 0,
// the calling thread's network namespace). Detaching what has none is not
// an error.
func (d *Datapath) Detach(ifindex int, r Role) error {
	hs, t, err := attachPoint(ifindex, r)
	if err != nil {
		return err
	}
	var errs []error
	for _, h := range hs {
		errs = append(errs, detachPinned(h.path(d.root, t)))
	}
	return errors.Join(errs...)
}

func detachPinned(path string) error {
	l, err := link.LoadPinnedLink(path, nil)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("open pinned link %s: %w", path, err)
	}
	defer l.Close()
	// Closing the last reference of an unpinned link detaches it.
	if err := l.Unpin(); err != nil {
		return fmt.Errorf("unpin %s: %w", path, err)
	}
	return nil
}

// linkTarget is the interface index of a TCX link or the namespace inode
// of a netns link; 0 once the interface or namespace is gone.
func linkTarget(l link.Link) uint64 {
	info, err := l.Info()
	if err != nil {
		return 0
	}
	if tcx := info.TCX(); tcx != nil {
		return uint64(tcx.Ifindex)
	}
	if ns := info.NetNs(); ns != nil {
		return uint64(ns.NetnsInode)
	}
	return 0
}

// Attachment is one pinned link.
type Attachment struct {
	Role    Role   `json:"role"`
	Hook    Hook   `json:"hook"`
	Ifindex int    `json:"ifindex,omitempty"` // as pinned; 0 for RoleNode
	Netns   uint64 `json:"netns,omitempty"`   // RoleNode: the namespace's inode, as pinned
	Live    bool   `json:"live"`              // the interface or namespace still exists and runs it
	LinkID  uint32 `json:"link_id"`
	ProgID  uint32 `json:"prog_id"`
	Program string `json:"program"`
	Pin     string `json:"pin"`
}

// Attachments lists the links pinned under root.
func Attachments(root string) ([]Attachment, error) {
	dir := filepath.Join(root, linksDir)
	ents, err := os.ReadDir(dir)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("list links: %w", err)
	}
	var out []Attachment
	for _, e := range ents {
		h, t, ok := parsePin(e.Name())
		if !ok {
			continue
		}
		a := Attachment{Role: h.role, Hook: h.at, Pin: filepath.Join(dir, e.Name())}
		if h.role == RoleNode {
			a.Netns = t
		} else {
			a.Ifindex = int(t)
		}
		if l, err := link.LoadPinnedLink(a.Pin, nil); err == nil {
			a.Live = linkTarget(l) == t
			if info, err := l.Info(); err == nil {
				a.LinkID = uint32(info.ID)
				a.ProgID = uint32(info.Program)
				if p, err := ebpf.NewProgramFromID(info.Program); err == nil {
					if pi, err := p.Info(); err == nil {
						a.Program = pi.Name
					}
					p.Close()
				}
			}
			l.Close()
		}
		out = append(out, a)
	}
	return out, nil
}

func parsePin(name string) (hook, uint64, bool) {
	i := strings.LastIndexByte(name, '-')
	if i < 0 {
		return hook{}, 0, false
	}
	t, err := strconv.ParseUint(name[i+1:], 10, 64)
	if err != nil || t == 0 {
		return hook{}, 0, false
	}
	for _, h := range hooks {
		if h.pin == name[:i] {
			return h, t, true
		}
	}
	return hook{}, 0, false
}

// PruneDead removes pinned links whose interface or namespace is gone, so
// a reused ifindex never inherits a stale pin. It returns how many it
// removed.
func PruneDead(root string) (int, error) {
	atts, err := Attachments(root)
	if err != nil {
		return 0, err
	}
	n := 0
	var errs []error
	for _, a := range atts {
		if a.Live {
			continue
		}
		if err := detachPinned(a.Pin); err != nil {
			errs = append(errs, err)
			continue
		}
		n++
	}
	return n, errors.Join(errs...)
}
