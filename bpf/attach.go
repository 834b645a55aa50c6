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
)

const linksDir = "links"

// Role says which program an interface runs.
type Role string

const (
	// RolePod is the host side of a pod's veth: packets leaving the pod.
	RolePod Role = "pod"
	// RoleUplink is a node uplink: packets arriving from other nodes.
	RoleUplink Role = "uplink"
)

func (d *Datapath) program(r Role) (*ebpf.Program, error) {
	switch r {
	case RolePod:
		return d.objs.AmberPod, nil
	case RoleUplink:
		return d.objs.AmberUplink, nil
	}
	return nil, fmt.Errorf("unknown role %q", r)
}

func linkPath(root string, r Role, ifindex int) string {
	return filepath.Join(root, linksDir, fmt.Sprintf("%s-%d", r, ifindex))
}

// Attach runs the role's program at TCX ingress of ifindex (in the calling
// thread's network namespace) and pins the link. If a pinned link for the
// interface exists, its program is replaced atomically (BPF_LINK_UPDATE):
// there is no moment without a program on the interface. A pin whose
// interface is gone (the index may have been reused) is replaced by a new
// attachment.
func (d *Datapath) Attach(ifindex int, r Role) error {
	prog, err := d.program(r)
	if err != nil {
		return err
	}
	path := linkPath(d.root, r, ifindex)
	if l, err := link.LoadPinnedLink(path, nil); err == nil {
		live := linkIfindex(l) == ifindex
		if live {
			err = l.Update(prog)
		} else {
			err = l.Unpin()
		}
		l.Close()
		if err != nil {
			return fmt.Errorf("replace program on ifindex %d: %w", ifindex, err)
		}
		if live {
			return nil
		}
	} else if !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("open pinned link %s: %w", path, err)
	}

	l, err := link.AttachTCX(link.TCXOptions{
		Interface: ifindex,
		Program:   prog,
		Attach:    ebpf.AttachTCXIngress,
	})
	if err != nil {
		return fmt.Errorf("attach %s program to ifindex %d: %w", r, ifindex, err)
	}
	defer l.Close()
	if err := l.Pin(path); err != nil {
		return fmt.Errorf("pin link for ifindex %d: %w", ifindex, err)
	}
	return nil
}

// Detach removes the program from ifindex. Detaching an interface that has
// none is not an error.
func (d *Datapath) Detach(ifindex int, r Role) error {
	return detachPinned(linkPath(d.root, r, ifindex))
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

// linkIfindex is the interface a TCX link is attached to, 0 once the
// interface is gone.
func linkIfindex(l link.Link) int {
	info, err := l.Info()
	if err != nil {
		return 0
	}
	if tcx := info.TCX(); tcx != nil {
		return int(tcx.Ifindex)
	}
	return 0
}

// Attachment is one pinned link.
type Attachment struct {
	Role    Role   `json:"role"`
	Ifindex int    `json:"ifindex"` // as pinned
	Live    bool   `json:"live"`    // the interface still exists and runs it
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
		role, idx, ok := strings.Cut(e.Name(), "-")
		ifindex, err := strconv.Atoi(idx)
		if !ok || err != nil {
			continue
		}
		a := Attachment{Role: Role(role), Ifindex: ifindex, Pin: filepath.Join(dir, e.Name())}
		if l, err := link.LoadPinnedLink(a.Pin, nil); err == nil {
			if info, err := l.Info(); err == nil {
				a.LinkID = uint32(info.ID)
				a.ProgID = uint32(info.Program)
				if tcx := info.TCX(); tcx != nil {
					a.Live = int(tcx.Ifindex) == ifindex
				}
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

// PruneDead removes pinned links whose interface is gone, so a reused
// ifindex never inherits a stale pin. It returns how many it removed.
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
