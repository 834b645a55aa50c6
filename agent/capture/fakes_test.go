package capture

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"sort"
	"sync"

	"github.com/amber-mesh/amber/agent/enrol"
	"github.com/amber-mesh/amber/bpf"
)

// fakeDatapath holds bpf.Datapath's membership semantics in memory: the
// unit tests here check the controller's bookkeeping; the privileged
// tests in package agent run the same scenarios on the real datapath, and
// both datapaths pass testDatapathContract.
type fakeDatapath struct {
	mu       sync.Mutex
	max      int
	ifaces   map[int]bool
	pods     map[netip.Addr]int
	attached map[int]bool
	ops      []string
}

func newFakeDatapath(max int) *fakeDatapath {
	return &fakeDatapath{max: max, ifaces: map[int]bool{}, pods: map[netip.Addr]int{}, attached: map[int]bool{}}
}

func (d *fakeDatapath) Attach(i int, r bpf.Role) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if i <= 0 {
		return fmt.Errorf("%s programs: invalid ifindex %d", r, i)
	}
	d.attached[i] = true
	return nil
}

func (d *fakeDatapath) Detach(i int, r bpf.Role) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if i <= 0 {
		return fmt.Errorf("%s programs: invalid ifindex %d", r, i)
	}
	delete(d.attached, i)
	return nil
}

func (d *fakeDatapath) Capture(i int, addrs []netip.Addr) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.ops = append(d.ops, fmt.Sprintf("capture %d %v", i, addrs))
	if len(addrs) == 0 || slices.ContainsFunc(addrs, func(a netip.Addr) bool { return !a.IsValid() }) {
		return fmt.Errorf("capture ifindex %d: no or invalid addresses %v", i, addrs)
	}
	if !d.ifaces[i] && len(d.ifaces) >= d.max {
		return fmt.Errorf("capture ifindex %d: %w", i, bpf.ErrMapFull)
	}
	d.ifaces[i] = true
	for _, a := range addrs {
		a = a.Unmap() // one key per address, as the kernel map's
		if _, ok := d.pods[a]; !ok && len(d.pods) >= 2*d.max {
			return fmt.Errorf("capture %s: %w", a, bpf.ErrMapFull)
		}
		d.pods[a] = i
	}
	return nil
}

func (d *fakeDatapath) Release(i int, addrs []netip.Addr) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.ops = append(d.ops, fmt.Sprintf("release %d %v", i, addrs))
	delete(d.ifaces, i)
	for _, a := range addrs {
		a = a.Unmap()
		if d.pods[a] == i {
			delete(d.pods, a)
		}
	}
	return nil
}

func (d *fakeDatapath) Members() ([]bpf.Member, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	var out []bpf.Member
	for a, i := range d.pods {
		out = append(out, bpf.Member{Addr: a, Ifindex: i})
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Addr.Less(out[j].Addr) })
	return out, nil
}

func (d *fakeDatapath) CapturedIfaces() ([]int, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	var out []int
	for i := range d.ifaces {
		out = append(out, i)
	}
	sort.Ints(out)
	return out, nil
}

// owner returns the veth an address is captured on, 0 when none, and
// whether that veth is marked captured.
func (d *fakeDatapath) owner(a netip.Addr) (int, bool) {
	d.mu.Lock()
	defer d.mu.Unlock()
	i := d.pods[a]
	return i, d.ifaces[i]
}

// fakeHost is a node with routes to veths.
type fakeHost struct {
	mu      sync.Mutex
	routes  map[netip.Addr]Veth
	alive   map[int]Veth
	netns   map[string]Veth
	quar    map[netip.Addr]bool
	failing bool
}

func newFakeHost() *fakeHost {
	return &fakeHost{routes: map[netip.Addr]Veth{}, alive: map[int]Veth{}, netns: map[string]Veth{}, quar: map[netip.Addr]bool{}}
}

// addPod wires a sandbox: a veth, its routes and its netns path.
func (h *fakeHost) addPod(netns string, v Veth, addrs ...netip.Addr) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.alive[v.Index] = v
	h.netns[netns] = v
	for _, a := range addrs {
		h.routes[a] = v
	}
}

func (h *fakeHost) delPod(netns string) {
	h.mu.Lock()
	defer h.mu.Unlock()
	v := h.netns[netns]
	delete(h.netns, netns)
	delete(h.alive, v.Index)
	for a, r := range h.routes {
		if r == v {
			delete(h.routes, a)
		}
	}
}

func (h *fakeHost) VethByRoute(addrs []netip.Addr) (Veth, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	var v Veth
	for _, a := range addrs {
		r, ok := h.routes[a]
		if !ok {
			return Veth{}, fmt.Errorf("%w: no route to %s", ErrVethNotFound, a)
		}
		v = r
	}
	return v, nil
}

func (h *fakeHost) VethOfSandbox(netns, ifname string) (Veth, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	v, ok := h.netns[netns]
	if !ok {
		return Veth{}, fmt.Errorf("%w: %s", ErrVethNotFound, netns)
	}
	return v, nil
}

func (h *fakeHost) Alive(v Veth) bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	a, ok := h.alive[v.Index]
	return ok && (v.Name == "" || a.Name == v.Name)
}

func (h *fakeHost) Quarantine(addrs []netip.Addr) error {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.failing {
		return errors.New("rule add failed")
	}
	for _, a := range addrs {
		h.quar[a] = true
	}
	return nil
}

func (h *fakeHost) Unquarantine(addrs []netip.Addr) error {
	h.mu.Lock()
	defer h.mu.Unlock()
	for _, a := range addrs {
		delete(h.quar, a)
	}
	return nil
}

func (h *fakeHost) Quarantined() ([]netip.Addr, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	var out []netip.Addr
	for a := range h.quar {
		out = append(out, a)
	}
	return out, nil
}

func (h *fakeHost) quarantined(a netip.Addr) bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.quar[a]
}

func (h *fakeHost) Close() error { return nil }

// fakeReporter records annotations and events.
type fakeReporter struct {
	mu     sync.Mutex
	annots map[string]bool // uid -> annotated
	events []string        // "ns/name reason"
}

func (r *fakeReporter) Annotate(_ context.Context, p *enrol.Pod, on bool) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.annots == nil {
		r.annots = map[string]bool{}
	}
	r.annots[p.UID] = on
	return nil
}

func (r *fakeReporter) Warn(p *enrol.Pod, reason, msg string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.events = append(r.events, p.Key()+" "+reason)
}

func (r *fakeReporter) annotated(uid string) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.annots[uid]
}

func (r *fakeReporter) eventList() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]string(nil), r.events...)
}
