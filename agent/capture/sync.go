package capture

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strconv"
	"time"

	"github.com/amber-mesh/amber/agent/enrol"
	"github.com/amber-mesh/amber/bpf"
	"github.com/amber-mesh/amber/internal/logkey"
)

// want is what one pod's current view asks of the datapath.
type want struct {
	gone     bool // no pod object and no sandbox: forget the pod
	keep     bool // pod object deleted while its sandbox lives: change nothing
	enrolled bool
	addrs    []netip.Addr
	veth     Veth
	vethErr  error
	// sandboxGone: the pod's sandbox was deleted (CNI DEL) or its veth
	// vanished; what it held, quarantine included, goes with it.
	sandboxGone bool
	// evict are the pods whose capture on veth is this pod's now (see
	// claim): their bookkeeping goes, without touching the kernel.
	evict []*podState
}

// olderThan reports whether a is an older view of the pod than b.
// Resource versions are opaque, but every API server in use orders them as
// integers (etcd revisions); when they do not parse, the newer-arriving
// view wins.
func olderThan(a, b *enrol.Pod) bool {
	x, err1 := strconv.ParseUint(a.ResourceVersion, 10, 64)
	y, err2 := strconv.ParseUint(b.ResourceVersion, 10, 64)
	return err1 == nil && err2 == nil && x < y
}

// desired is what st's view asks of the datapath. It changes nothing:
// sync applies the answer.
func (c *Controller) desired(st *podState) want {
	p := st.pod
	switch {
	case p == nil && st.sandbox == nil:
		return want{gone: true}
	case p == nil:
		// Force-deleted, or the API object went before the kubelet's CNI
		// DEL: the sandbox may still run, so its capture stays until DEL
		// (or until its veth is gone).
		if c.cfg.Host.Alive(st.sandbox.veth) {
			return want{keep: true}
		}
		return want{gone: true}
	case p.Terminal():
		// No sandbox any more; its last IP may be someone else's.
		return want{}
	}
	w := want{enrolled: c.cfg.Rules.Decide(c.namespaces[p.Namespace], p).Enrolled}
	w.addrs = p.IPs
	if st.sandbox != nil && len(st.sandbox.Addrs) > 0 {
		w.addrs = st.sandbox.Addrs
	}
	if st.sandbox == nil && len(st.deadVeths) > 0 {
		// The CNI plugin deleted the pod's sandbox; its addresses are
		// going back to IPAM. A new sandbox arrives with a new ADD.
		w.addrs, w.sandboxGone = nil, true
		return w
	}
	if len(w.addrs) == 0 {
		return w
	}
	if st.sandbox != nil {
		w.veth = st.sandbox.veth
		if !c.cfg.Host.Alive(w.veth) {
			// The sandbox died without a DEL (yet): it sends nothing, and
			// its addresses may be handed out again.
			w.addrs, w.veth, w.sandboxGone = nil, Veth{}, true
			return w
		}
	} else {
		w.veth, w.vethErr = c.cfg.Host.VethByRoute(w.addrs)
		if w.vethErr == nil && st.deadVeths[w.veth.Index] {
			w.veth, w.vethErr = Veth{}, fmt.Errorf("%w: the sandbox on %s was deleted", ErrVethNotFound, w.veth.Name)
		}
	}
	if w.vethErr == nil {
		var err error
		if w.evict, err = c.claim(st, w.veth); err != nil {
			w.veth, w.vethErr = Veth{}, err
		}
	}
	if w.vethErr == nil {
		if err := c.claimAddrs(st, w.veth, w.addrs); err != nil {
			w.veth, w.vethErr = Veth{}, err
		}
	}
	return w
}

// claimAddrs refuses addresses another pod holds on another live veth
// with a better claim (a CNI-reported sandbox over a route, the newer pod
// otherwise): Capture would move them to this pod's veth.
func (c *Controller) claimAddrs(st *podState, v Veth, addrs []netip.Addr) error {
	for _, a := range addrs {
		uid := c.addrOwner[a]
		o := c.pods[uid]
		if uid == "" || uid == st.uid || o == nil || o.veth.Index == v.Index || !c.cfg.Host.Alive(o.veth) {
			continue
		}
		mine, theirs := st.sandbox != nil, o.sandbox != nil && o.sandbox.veth == o.veth
		if theirs && !mine || theirs == mine && o.pod != nil && st.pod != nil && st.pod.Created.Before(o.pod.Created) {
			return fmt.Errorf("%w: %s is on %s", ErrAddressReused, a, o.veth.Name)
		}
	}
	return nil
}

// claim settles which pod a veth belongs to when two pods' views point
// at it, which happens when an address was reused while one of them was
// still known: a CNI-reported sandbox is ground truth; otherwise the newer
// pod holds the address (IPAM hands it out again only after the older
// sandbox released it). It returns the pods whose capture on v st takes
// over, those it met before a pod with a better claim, if any, refused it.
func (c *Controller) claim(st *podState, v Veth) (evict []*podState, err error) {
	for uid, o := range c.pods {
		if uid == st.uid {
			continue
		}
		oVeth := o.veth
		oCNI := o.sandbox != nil && o.sandbox.veth.Index == v.Index
		if oCNI {
			oVeth = o.sandbox.veth
		}
		if oVeth.Index != v.Index {
			continue
		}
		mine := st.sandbox != nil && st.sandbox.veth.Index == v.Index
		switch {
		case mine && !oCNI:
		case oCNI && !mine:
			return evict, fmt.Errorf("%w: %s", ErrAddressReused, v.Name)
		case o.pod != nil && st.pod != nil && st.pod.Created.Before(o.pod.Created):
			return evict, fmt.Errorf("%w: %s", ErrAddressReused, v.Name)
		}
		// st wins: o's capture on this veth is st's from now on.
		if o.veth.Index == v.Index {
			evict = append(evict, o)
		}
	}
	return evict, nil
}

// sync brings one pod's datapath state in line with its view. c.mu is
// held. The error is the pod's failure, for the CNI path.
func (c *Controller) sync(uid string) error {
	st := c.pods[uid]
	if st == nil {
		return nil
	}
	start := time.Now()
	defer func() { c.metrics.syncLatency.Observe(time.Since(start).Seconds()) }()

	if st.veth.Index != 0 && !c.cfg.Host.Alive(st.veth) {
		// The veth is gone, and with it the sandbox: its entries can
		// only be in the way of a pod that reuses the addresses.
		if err := c.release(st); err != nil {
			c.retry(st)
			return err
		}
	}
	w := c.desired(st)
	for _, o := range w.evict {
		c.forget(o)
		c.queue.add(o.uid)
	}
	if w.keep {
		return nil
	}
	st.resolved = w.veth
	if w.veth.Index != 0 {
		if err := c.attach(w.veth); err != nil {
			if w.enrolled {
				return c.fail(st, ReasonAttachFailed, w.addrs, err)
			}
			c.metrics.errors.WithLabelValues(ReasonAttachFailed).Inc()
			c.log.Warn("attach pod program", "pod", podKey(st), "veth", w.veth.Name, logkey.Error, err)
		}
	}
	if !w.enrolled {
		if err := c.release(st); err != nil {
			c.metrics.errors.WithLabelValues(ReasonReleaseFailed).Inc()
			c.log.Warn("release pod", "pod", podKey(st), logkey.Error, err)
			c.retry(st)
			return err
		}
		if err := c.lift(st); err != nil {
			c.retry(st)
			return err
		}
		st.failure, st.failures = "", 0
		if w.gone {
			delete(c.pods, uid)
			return nil
		}
		c.setAnnotation(st, false)
		return nil
	}
	if len(w.addrs) == 0 {
		// Not started yet (no IPs), or its sandbox is gone: nothing to
		// capture. What a gone sandbox held goes with it.
		if w.sandboxGone || st.veth.Index != 0 && !c.cfg.Host.Alive(st.veth) {
			return errors.Join(c.release(st), c.lift(st))
		}
		return nil
	}
	if w.vethErr != nil {
		reason := ReasonVethNotFound
		if errors.Is(w.vethErr, ErrAddressReused) || st.pod.Deleting {
			// The address is a newer pod's, or the pod is terminating and
			// its sandbox already went: there is nothing to capture and
			// nothing to quarantine.
			_ = c.release(st)
			return w.vethErr
		}
		return c.fail(st, reason, w.addrs, w.vethErr)
	}
	if err := c.capture(st, w.veth, w.addrs); err != nil {
		reason := ReasonCaptureFailed
		if errors.Is(err, ErrMapFull) {
			reason = ReasonMapFull
		}
		return c.fail(st, reason, w.addrs, err)
	}
	if err := c.lift(st); err != nil {
		c.retry(st)
	}
	if st.failure != "" {
		c.log.Info("pod captured after failure", "pod", podKey(st), "failure", st.failure)
	}
	st.failure, st.failures = "", 0
	c.setAnnotation(st, true)
	return nil
}

func (c *Controller) attach(v Veth) error {
	if c.attached[v] {
		return nil
	}
	if err := c.cfg.Datapath.Attach(v.Index, bpf.RolePod); err != nil {
		return err
	}
	c.attached[v] = true
	return nil
}

// capture writes the pod's membership. Writing the same entries again
// (after a restart) is an in-place overwrite: there is no moment without
// them.
func (c *Controller) capture(st *podState, v Veth, addrs []netip.Addr) error {
	fresh := len(st.addrs) == 0
	if st.veth == v && slices.Equal(st.addrs, addrs) {
		return nil
	}
	if fresh && c.captured >= c.cfg.Capacity {
		return fmt.Errorf("%w: %d of %d pods captured", ErrMapFull, c.captured, c.cfg.Capacity)
	}
	if err := c.cfg.Datapath.Capture(v.Index, addrs); err != nil {
		// The veth may now be marked with only some addresses: that pod
		// is dropped, not let through. Remember it so release cleans up.
		if fresh {
			c.own(st, v, nil)
		}
		return err
	}
	if st.veth.Index != 0 && st.veth != v {
		// A new sandbox: the old veth's entries go (addresses now on the
		// new veth are kept by Release).
		_ = c.release(st)
	}
	c.own(st, v, addrs)
	return nil
}

// own records that st's capture is (v, addrs).
func (c *Controller) own(st *podState, v Veth, addrs []netip.Addr) {
	if len(st.addrs) == 0 && len(addrs) > 0 {
		c.captured++
	} else if len(st.addrs) > 0 && len(addrs) == 0 {
		c.captured--
	}
	st.veth, st.addrs = v, slices.Clone(addrs)
	c.vethOwner[v.Index] = st.uid
	for _, a := range addrs {
		if o := c.addrOwner[a]; o != "" && o != st.uid {
			// Reused address: Capture moved it to this pod's veth.
			if os := c.pods[o]; os != nil {
				os.addrs = slices.DeleteFunc(os.addrs, func(x netip.Addr) bool { return x == a })
				if len(os.addrs) == 0 {
					c.captured--
					os.addrs = nil
				}
			}
		}
		c.addrOwner[a] = st.uid
	}
	c.metrics.enrolled.Set(float64(c.captured))
}

// forget drops st's bookkeeping without touching the kernel.
func (c *Controller) forget(st *podState) {
	if len(st.addrs) > 0 {
		c.captured--
	}
	if c.vethOwner[st.veth.Index] == st.uid {
		delete(c.vethOwner, st.veth.Index)
	}
	for _, a := range st.addrs {
		if c.addrOwner[a] == st.uid {
			delete(c.addrOwner, a)
		}
	}
	st.veth, st.addrs = Veth{}, nil
	c.metrics.enrolled.Set(float64(c.captured))
}

// release removes what st captured, and only that: addresses another
// veth holds now are left alone by the datapath, and a veth another pod
// holds now is not touched.
func (c *Controller) release(st *podState) error {
	if st.veth.Index == 0 {
		return nil
	}
	if o := c.vethOwner[st.veth.Index]; o == "" || o == st.uid {
		if err := c.cfg.Datapath.Release(st.veth.Index, st.addrs); err != nil {
			return fmt.Errorf("release %s: %w", st.veth.Name, err)
		}
	}
	c.forget(st)
	return nil
}

// fail reports a failed capture of an enrolled pod, quarantines its
// addresses (fail closed: no packet from them leaves the node's routing)
// and schedules a retry.
func (c *Controller) fail(st *podState, reason string, addrs []netip.Addr, err error) error {
	c.metrics.errors.WithLabelValues(reason).Inc()
	if st.failure != reason {
		st.failure = reason
		c.log.Warn("pod capture failed", "pod", podKey(st), "reason", reason, logkey.Error, err)
		if c.cfg.Reporter != nil && st.pod != nil {
			c.cfg.Reporter.Warn(st.pod, reason, fmt.Sprintf("amber could not capture this pod's traffic; its addresses are quarantined (no traffic leaves the pod) until it can: %v", err))
		}
	}
	if len(addrs) > 0 {
		if qerr := c.cfg.Host.Quarantine(addrs); qerr != nil {
			c.metrics.errors.WithLabelValues(ReasonQuarantine).Inc()
			c.log.Error("quarantine failed", "pod", podKey(st), logkey.Error, qerr)
			err = errors.Join(err, qerr)
		} else {
			for _, a := range addrs {
				c.quarantined[a] = true
			}
			st.qaddrs = mergeAddrs(st.qaddrs, addrs)
		}
	}
	c.metrics.quarantined.Set(float64(len(c.quarantined)))
	c.setAnnotation(st, false)
	c.retry(st)
	return err
}

func (c *Controller) retry(st *podState) {
	st.failures++
	c.queue.addAfter(st.uid, backoff(st.failures))
}

// lift removes st's quarantine.
func (c *Controller) lift(st *podState) error {
	if len(st.qaddrs) == 0 {
		return nil
	}
	if err := c.cfg.Host.Unquarantine(st.qaddrs); err != nil {
		c.metrics.errors.WithLabelValues(ReasonQuarantine).Inc()
		return err
	}
	for _, a := range st.qaddrs {
		delete(c.quarantined, a)
	}
	st.qaddrs = nil
	c.metrics.quarantined.Set(float64(len(c.quarantined)))
	return nil
}

func mergeAddrs(a, b []netip.Addr) []netip.Addr {
	for _, x := range b {
		if !slices.Contains(a, x) {
			a = append(a, x)
		}
	}
	return a
}

func podKey(st *podState) string {
	if st.pod != nil {
		return st.pod.Key()
	}
	return "uid:" + st.uid
}

// setAnnotation records the annotation the pod should carry and wakes
// the annotator if it differs from what the pod shows.
func (c *Controller) setAnnotation(st *podState, on bool) {
	if c.cfg.Reporter == nil || st.pod == nil {
		return
	}
	st.wantAnno = &on
	if st.pod.Redirected() != on {
		c.annots.add(st.uid)
	}
}

// annotateLoop patches annotations outside the lock: an API round trip
// must not hold up capture. Failures are retried with backoff; the
// capture itself never depends on them.
func (c *Controller) annotateLoop(ctx context.Context) {
	fails := map[string]int{}
	for {
		uid, ok := c.annots.get(ctx)
		if !ok {
			return
		}
		c.mu.Lock()
		st := c.pods[uid]
		var p *enrol.Pod
		var on bool
		if st != nil && st.pod != nil && st.wantAnno != nil {
			p, on = st.pod, *st.wantAnno
		}
		c.mu.Unlock()
		if p == nil || p.Redirected() == on || c.cfg.Reporter == nil {
			delete(fails, uid)
			continue
		}
		if err := c.cfg.Reporter.Annotate(ctx, p, on); err != nil {
			if ctx.Err() != nil {
				return
			}
			fails[uid]++
			c.metrics.errors.WithLabelValues(ReasonAnnotate).Inc()
			c.log.Debug("annotate pod", "pod", p.Key(), logkey.Error, err)
			c.annots.addAfter(uid, backoff(fails[uid]))
			continue
		}
		delete(fails, uid)
	}
}

// reconcileAll re-syncs every pod and, with a complete view, prunes what
// no pod accounts for.
func (c *Controller) reconcileAll() {
	start := time.Now()
	c.mu.Lock()
	defer c.mu.Unlock()
	if !c.synced {
		return
	}
	for uid := range c.pods {
		c.sync(uid)
	}
	if err := c.prune(); err != nil {
		c.metrics.errors.WithLabelValues(ReasonReleaseFailed).Inc()
		c.log.Warn("prune stale capture", logkey.Error, err)
	}
	if !c.reconciled {
		c.log.Info("initial reconciliation done", "pods", len(c.pods), "captured", c.captured, "took", time.Since(start))
	}
	c.reconciled = true
	c.metrics.fullLatency.Observe(time.Since(start).Seconds())
}

// complete reports whether every enrolled, running pod's addresses are
// known: only then can an address nobody claims be called stale.
func (c *Controller) complete() bool {
	if !c.synced {
		return false
	}
	for _, st := range c.pods {
		p := st.pod
		if p == nil || p.Terminal() || !c.cfg.Rules.Decide(c.namespaces[p.Namespace], p).Enrolled {
			continue
		}
		if len(p.IPs) == 0 && (st.sandbox == nil || len(st.sandbox.Addrs) == 0) {
			return false
		}
	}
	return true
}

// prune removes datapath state no pod accounts for. A captured veth is
// released when it is gone or when a known pod outside the mesh holds it;
// one that still exists but belongs to no known pod is kept: it may be a
// sandbox whose pod object is gone while it still runs, and keeping it
// captured fails closed. Addresses without a captured veth and
// quarantines nobody claims are removed only from a complete view.
func (c *Controller) prune() error {
	members, err := c.cfg.Datapath.Members()
	if err != nil {
		return err
	}
	ifaces, err := c.cfg.Datapath.CapturedIfaces()
	if err != nil {
		return err
	}
	for v := range c.attached {
		if !c.cfg.Host.Alive(v) {
			delete(c.attached, v)
		}
	}
	complete := c.complete()
	// Veths a known pod that is not captured resolves to: a capture on
	// them is left over from when the pod was enrolled.
	outside := map[int]bool{}
	for _, st := range c.pods {
		if st.resolved.Index != 0 && len(st.addrs) == 0 {
			outside[st.resolved.Index] = true
		}
	}
	byVeth := map[int][]netip.Addr{}
	inMap := map[netip.Addr]int{}
	for _, m := range members {
		byVeth[m.Ifindex] = append(byVeth[m.Ifindex], m.Addr)
		inMap[m.Addr] = m.Ifindex
	}
	var errs []error
	// Drift: a captured pod whose entries someone removed gets them back.
	isCaptured := map[int]bool{}
	for _, idx := range ifaces {
		isCaptured[idx] = true
	}
	for _, st := range c.pods {
		if len(st.addrs) == 0 {
			continue
		}
		ok := isCaptured[st.veth.Index]
		for _, a := range st.addrs {
			ok = ok && inMap[a] == st.veth.Index
		}
		if !ok {
			c.log.Warn("membership drifted; rewriting it", "pod", podKey(st), "veth", st.veth.Name)
			c.metrics.errors.WithLabelValues(ReasonDrift).Inc()
			errs = append(errs, c.cfg.Datapath.Capture(st.veth.Index, st.addrs))
		}
	}
	captured := map[int]bool{}
	for _, idx := range ifaces {
		captured[idx] = true
		if _, ok := c.vethOwner[idx]; ok {
			continue
		}
		if !outside[idx] && c.cfg.Host.Alive(Veth{Index: idx}) {
			continue
		}
		errs = append(errs, c.cfg.Datapath.Release(idx, byVeth[idx]))
		delete(captured, idx)
		c.metrics.pruned.Inc()
	}
	for _, m := range members {
		if o := c.addrOwner[m.Addr]; o != "" && c.pods[o] != nil && c.pods[o].veth.Index == m.Ifindex {
			continue
		}
		if captured[m.Ifindex] {
			continue
		}
		if c.cfg.Host.Alive(Veth{Index: m.Ifindex}) && !complete {
			continue
		}
		errs = append(errs, c.cfg.Datapath.Release(m.Ifindex, []netip.Addr{m.Addr}))
		c.metrics.pruned.Inc()
	}
	if complete {
		claimed := map[netip.Addr]bool{}
		for _, st := range c.pods {
			for _, a := range st.qaddrs {
				claimed[a] = true
			}
		}
		var stale []netip.Addr
		for a := range c.quarantined {
			if !claimed[a] {
				stale = append(stale, a)
			}
		}
		if len(stale) > 0 {
			if err := c.cfg.Host.Unquarantine(stale); err != nil {
				errs = append(errs, err)
			} else {
				for _, a := range stale {
					delete(c.quarantined, a)
				}
			}
		}
		c.metrics.quarantined.Set(float64(len(c.quarantined)))
	}
	return errors.Join(errs...)
}
