package agent

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync/atomic"
	"time"

	"github.com/vishvananda/netlink"

	"github.com/amber-mesh/amber/bpf"
	"github.com/amber-mesh/amber/internal/logkey"
)

// adoptLinks replaces the program in every live link an earlier agent
// pinned (BPF_LINK_UPDATE: no moment without a program), so that an
// upgraded agent runs its own programs everywhere before it reconciles. A
// pod veth an older agent attached only at ingress gains the egress
// program here.
func adoptLinks(dp *bpf.Datapath, log *slog.Logger) error {
	if n, err := bpf.PruneDead(dp.PinRoot()); err != nil {
		log.Warn("prune links of vanished interfaces", logkey.Error, err)
	} else if n > 0 {
		log.Info("pruned links of vanished interfaces", "count", n)
	}
	atts, err := bpf.Attachments(dp.PinRoot())
	if err != nil {
		return err
	}
	type point struct {
		role    bpf.Role
		ifindex int
	}
	done := map[point]bool{}
	var errs []error
	for _, a := range atts {
		p := point{a.Role, a.Ifindex}
		if !a.Live || done[p] {
			continue
		}
		done[p] = true
		errs = append(errs, dp.Attach(a.Ifindex, a.Role))
	}
	return errors.Join(errs...)
}

// attachUplinks runs the uplink program on the named interfaces, or on
// those of the default routes.
func attachUplinks(dp *bpf.Datapath, names []string, log *slog.Logger) error {
	var idx []int
	if len(names) == 0 {
		var err error
		if idx, err = defaultRouteLinks(); err != nil {
			return err
		}
		if len(idx) == 0 {
			return errors.New("no default route: name the uplinks")
		}
	}
	for _, n := range names {
		l, err := netlink.LinkByName(n)
		if err != nil {
			return fmt.Errorf("uplink %s: %w", n, err)
		}
		idx = append(idx, l.Attrs().Index)
	}
	for _, i := range idx {
		if err := dp.Attach(i, bpf.RoleUplink); err != nil {
			return err
		}
		name := fmt.Sprint(i)
		if l, err := netlink.LinkByIndex(i); err == nil {
			name = l.Attrs().Name
		}
		log.Info("uplink attached", "interface", name)
	}
	return nil
}

// defaultRouteLinks lists the interfaces of the main table's default
// routes, both families, multipath included.
func defaultRouteLinks() ([]int, error) {
	seen := map[int]bool{}
	var out []int
	for _, fam := range []int{netlink.FAMILY_V4, netlink.FAMILY_V6} {
		rs, err := netlink.RouteListFiltered(fam, &netlink.Route{Table: 254}, netlink.RT_FILTER_TABLE)
		if err != nil {
			return nil, fmt.Errorf("list routes: %w", err)
		}
		for _, r := range rs {
			if r.Dst != nil {
				if ones, _ := r.Dst.Mask.Size(); ones != 0 {
					continue
				}
			}
			links := []int{r.LinkIndex}
			for _, nh := range r.MultiPath {
				links = append(links, nh.LinkIndex)
			}
			for _, i := range links {
				if i > 0 && !seen[i] {
					seen[i] = true
					out = append(out, i)
				}
			}
		}
	}
	return out, nil
}

// pruneLinks periodically unpins links whose interface is gone (a
// deleted pod's veth), so a reused ifindex never inherits a stale pin.
func pruneLinks(ctx context.Context, dp *bpf.Datapath, every time.Duration) error {
	if every <= 0 {
		every = time.Minute
	}
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
			bpf.PruneDead(dp.PinRoot())
		}
	}
}

type readyFlag struct{ v atomic.Bool }

func (f *readyFlag) set()      { f.v.Store(true) }
func (f *readyFlag) get() bool { return f.v.Load() }
