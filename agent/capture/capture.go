// Package capture keeps a node's datapath in step with the pods that must
// be captured: it attaches the pod program to every local pod veth, writes
// and removes membership per pod UID, quarantines enrolled pods whose
// capture cannot be put in place, and asks for the redirection annotation.
package capture

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"slices"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/amber-mesh/amber/agent/enrol"
	"github.com/amber-mesh/amber/bpf"
)

// Sentinel errors.
var (
	// ErrVethNotFound is returned when a pod's host-side veth cannot be
	// identified.
	ErrVethNotFound = errors.New("pod veth not found")
	// ErrMapFull is returned when capturing a pod would exceed the
	// membership capacity.
	ErrMapFull = bpf.ErrMapFull
	// ErrNotReady is returned to sandbox requests before the controller
	// runs.
	ErrNotReady = errors.New("capture controller not running")
	// ErrAddressReused is returned when a pod's address now belongs to a
	// newer pod's sandbox.
	ErrAddressReused = errors.New("pod address belongs to a newer pod")
)

// Failure reasons, as they appear in events, logs and the errors metric.
const (
	ReasonVethNotFound  = "VethNotFound"
	ReasonMapFull       = "MapFull"
	ReasonCaptureFailed = "CaptureFailed"
	ReasonAttachFailed  = "AttachFailed"
	ReasonReleaseFailed = "ReleaseFailed"
	ReasonQuarantine    = "QuarantineFailed"
	ReasonAnnotate      = "AnnotateFailed"
	ReasonDrift         = "MembershipDrift"
)

// Datapath is what the controller needs of *bpf.Datapath.
type Datapath interface {
	Attach(ifindex int, r bpf.Role) error
	Detach(ifindex int, r bpf.Role) error
	Capture(ifindex int, addrs []netip.Addr) error
	Release(ifindex int, addrs []netip.Addr) error
	Members() ([]bpf.Member, error)
	CapturedIfaces() ([]int, error)
}

// Reporter publishes the controller's outcome on the pod objects.
type Reporter interface {
	// Annotate sets (on) or removes the redirection annotation.
	Annotate(ctx context.Context, p *enrol.Pod, on bool) error
	// Warn records a warning event on the pod.
	Warn(p *enrol.Pod, reason, message string)
}

// Config configures a Controller.
type Config struct {
	// Datapath is the loaded datapath. Required.
	Datapath Datapath
	// Host is the node's network namespace. Required.
	Host Host
	// Rules add the installation's exclusions to Istio's enrolment
	// rules. The zero value adds none.
	Rules enrol.Rules
	// Reporter receives annotations and events. Nil means none are
	// published.
	Reporter Reporter
	// Capacity is how many pods may be captured at once; it must not
	// exceed the datapath's MaxPods. Zero means bpf.DefaultMaxPods.
	Capacity int
	// Resync is the period of full reconciliations (drift repair, retries
	// of pruning). Zero means one minute.
	Resync time.Duration
	// Registerer receives the controller's metrics. Nil means they are
	// not registered.
	Registerer prometheus.Registerer
	// Logger; nil means slog.Default().
	Logger *slog.Logger
}

// Sandbox is a pod sandbox as the CNI plugin reports it on ADD.
type Sandbox struct {
	ContainerID string
	NetNS       string
	IfName      string
	Addrs       []netip.Addr
}

// Result is the outcome of AddSandbox.
type Result struct {
	Captured bool
	Reason   enrol.Reason
	Veth     Veth
}

// Controller reconciles pods into the datapath. Its inputs are the
// Upsert/Delete methods (fed by informers) and AddSandbox/DelSandbox (fed
// by the CNI plugin); its methods are safe for concurrent use.
type Controller struct {
	cfg     Config
	log     *slog.Logger
	metrics *metrics
	queue   *queue
	annots  *queue

	mu         sync.Mutex // guards the fields below
	pods       map[string]*podState
	namespaces map[string]*enrol.Namespace
	synced     bool
	reconciled bool
	running    bool
	// Indexes of what is in the kernel on behalf of which pod.
	vethOwner map[int]string        // captured veth ifindex -> uid
	addrOwner map[netip.Addr]string // captured address -> uid
	attached  map[Veth]bool         // veths this process attached to
	// quarantined addresses (from the kernel at start, then ours).
	quarantined map[netip.Addr]bool
	captured    int
}

// podState is everything known about one pod UID.
type podState struct {
	uid     string
	pod     *enrol.Pod // latest API view; nil when deleted or not yet seen
	sandbox *sandbox   // from the latest CNI ADD; nil when unknown
	// deadVeths are veths of sandboxes the CNI plugin deleted: a route
	// lookup must never bind the pod to them again.
	deadVeths map[int]bool

	resolved Veth         // the veth the pod's view points at, if found
	veth     Veth         // capture is written for this veth
	addrs    []netip.Addr // captured addresses (empty: not captured)
	qaddrs   []netip.Addr // addresses this pod is quarantined under
	failure  string       // last failure reported, for deduplication
	failures int          // consecutive failures, for backoff
	wantAnno *bool        // annotation state last decided
}

type sandbox struct {
	Sandbox
	veth Veth
}

// New returns a Controller. Run must be called for it to act on informer
// events; AddSandbox answers as soon as Run has started.
func New(cfg Config) (*Controller, error) {
	if cfg.Datapath == nil || cfg.Host == nil {
		return nil, errors.New("capture: Datapath and Host are required")
	}
	if cfg.Capacity <= 0 {
		cfg.Capacity = bpf.DefaultMaxPods
	}
	if cfg.Resync <= 0 {
		cfg.Resync = time.Minute
	}
	log := cfg.Logger
	if log == nil {
		log = slog.Default()
	}
	c := &Controller{
		cfg:         cfg,
		log:         log,
		metrics:     newMetrics(cfg.Registerer, cfg.Capacity),
		queue:       newQueue(),
		annots:      newQueue(),
		pods:        map[string]*podState{},
		namespaces:  map[string]*enrol.Namespace{},
		vethOwner:   map[int]string{},
		addrOwner:   map[netip.Addr]string{},
		attached:    map[Veth]bool{},
		quarantined: map[netip.Addr]bool{},
	}
	return c, nil
}

// UpsertPod records the API server's view of a pod on this node.
func (c *Controller) UpsertPod(p *enrol.Pod) {
	c.mu.Lock()
	st := c.state(p.UID)
	st.pod = p
	c.mu.Unlock()
	c.queue.add(p.UID)
	c.annots.add(p.UID)
}

// DeletePod records that a pod is gone from the API server.
func (c *Controller) DeletePod(uid string) {
	c.mu.Lock()
	if st := c.pods[uid]; st != nil {
		st.pod = nil
	}
	c.mu.Unlock()
	c.queue.add(uid)
}

// UpsertNamespace records a namespace's labels and re-decides its pods.
func (c *Controller) UpsertNamespace(ns *enrol.Namespace) {
	c.mu.Lock()
	old := c.namespaces[ns.Name]
	c.namespaces[ns.Name] = ns
	var uids []string
	if old == nil || old.Labels[enrol.DataplaneModeLabel] != ns.Labels[enrol.DataplaneModeLabel] {
		uids = c.podsIn(ns.Name)
	}
	c.mu.Unlock()
	c.queue.add(uids...)
}

// DeleteNamespace forgets a namespace.
func (c *Controller) DeleteNamespace(name string) {
	c.mu.Lock()
	delete(c.namespaces, name)
	uids := c.podsIn(name)
	c.mu.Unlock()
	c.queue.add(uids...)
}

// MarkSynced says the pods and namespaces seen so far are the API
// server's complete view: from now on absence means deletion, and stale
// datapath state may be pruned.
func (c *Controller) MarkSynced() {
	c.mu.Lock()
	c.synced = true
	c.mu.Unlock()
	c.queue.add(resyncKey)
}

// Ready reports whether the controller has reconciled a complete view.
func (c *Controller) Ready() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.reconciled
}

func (c *Controller) state(uid string) *podState {
	st := c.pods[uid]
	if st == nil {
		st = &podState{uid: uid}
		c.pods[uid] = st
	}
	return st
}

func (c *Controller) podsIn(ns string) []string {
	var uids []string
	for uid, st := range c.pods {
		if st.pod != nil && st.pod.Namespace == ns {
			uids = append(uids, uid)
		}
	}
	return uids
}

// resyncKey asks the worker for a full reconciliation.
const resyncKey = "\x00resync"

// Run processes work until ctx is done. It first adopts quarantines left
// in the kernel by an earlier process.
func (c *Controller) Run(ctx context.Context) error {
	q, err := c.cfg.Host.Quarantined()
	if err != nil {
		return err
	}
	c.mu.Lock()
	for _, a := range q {
		c.quarantined[a] = true
	}
	c.running = true
	c.mu.Unlock()
	defer func() {
		c.mu.Lock()
		c.running = false
		c.mu.Unlock()
	}()

	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var wg sync.WaitGroup
	wg.Add(2)
	go func() { defer wg.Done(); c.annotateLoop(ctx) }()
	go func() { defer wg.Done(); c.resyncLoop(ctx) }()
	c.workLoop(ctx)
	wg.Wait()
	return ctx.Err()
}

// workLoop is the single writer of the datapath for informer events.
func (c *Controller) workLoop(ctx context.Context) {
	for {
		uid, ok := c.queue.get(ctx)
		if !ok {
			return
		}
		if uid == resyncKey {
			c.reconcileAll()
			continue
		}
		c.mu.Lock()
		c.sync(uid)
		c.mu.Unlock()
	}
}

func (c *Controller) resyncLoop(ctx context.Context) {
	t := time.NewTicker(c.cfg.Resync)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			c.queue.add(resyncKey)
		}
	}
}

// AddSandbox is the CNI ADD path: the pod's object (fetched live by the
// caller) and namespace decide enrolment; the veth is attached in every
// case and, for an enrolled pod, the capture is in place when it returns
// without error. An error means the pod must not start.
func (c *Controller) AddSandbox(ctx context.Context, p *enrol.Pod, ns *enrol.Namespace, sb Sandbox) (Result, error) {
	start := time.Now()
	if err := ctx.Err(); err != nil {
		return Result{}, err
	}
	veth, err := c.cfg.Host.VethOfSandbox(sb.NetNS, sb.IfName)
	if err != nil && len(sb.Addrs) > 0 {
		// A runtime that reports no usable netns (or a foreign veth
		// layout) still routes the pod's addresses.
		if v, rerr := c.cfg.Host.VethByRoute(sb.Addrs); rerr == nil {
			veth, err = v, nil
		}
	}

	c.mu.Lock()
	defer c.mu.Unlock()
	if !c.running {
		return Result{}, ErrNotReady
	}
	if ns != nil {
		c.namespaces[ns.Name] = ns
	}
	st := c.state(p.UID)
	if st.pod == nil || !olderThan(p, st.pod) {
		st.pod = p
	}
	dec := c.cfg.Rules.Decide(c.namespaces[p.Namespace], st.pod)
	if err != nil {
		if dec.Enrolled {
			// No quarantine: the failed ADD keeps the pod from starting,
			// and its addresses go back to IPAM with the runtime's DEL.
			c.fail(st, ReasonVethNotFound, nil, err)
			return Result{Reason: dec.Reason}, fmt.Errorf("pod %s: %w", p.Key(), err)
		}
		return Result{Reason: dec.Reason}, nil
	}
	if st.sandbox != nil && st.sandbox.veth != veth {
		st.deadVeths = setAdd(st.deadVeths, st.sandbox.veth.Index)
	}
	delete(st.deadVeths, veth.Index)
	st.sandbox = &sandbox{Sandbox: sb, veth: veth}
	err = c.sync(p.UID)
	c.metrics.cniLatency.Observe(time.Since(start).Seconds())
	res := Result{Captured: len(st.addrs) > 0, Reason: dec.Reason, Veth: veth}
	if err != nil {
		return res, fmt.Errorf("pod %s: %w", p.Key(), err)
	}
	if dec.Enrolled && !res.Captured {
		return res, fmt.Errorf("pod %s: enrolled but not captured (no addresses)", p.Key())
	}
	return res, nil
}

// DelSandbox is the CNI DEL path: the sandbox's capture is released and
// its veth is never bound to the pod again. The sandbox is found by pod
// UID, or by container ID when the runtime passes no UID. Unknown
// sandboxes are not an error (DEL must be idempotent).
func (c *Controller) DelSandbox(ctx context.Context, uid, containerID string) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	st := c.pods[uid]
	if uid == "" {
		for _, s := range c.pods {
			if s.sandbox != nil && s.sandbox.ContainerID == containerID {
				st = s
			}
		}
	}
	if st == nil {
		return nil
	}
	if st.sandbox == nil || (containerID != "" && st.sandbox.ContainerID != containerID) {
		// A sandbox this process did not see added (it started later):
		// the pod is re-decided, and its entries go with its veth.
		c.queue.add(st.uid)
		return nil
	}
	veth := st.sandbox.veth
	st.deadVeths = setAdd(st.deadVeths, veth.Index)
	st.sandbox = nil
	var errs []error
	if st.veth == veth {
		errs = append(errs, c.release(st))
	}
	if err := c.cfg.Datapath.Detach(veth.Index, bpf.RolePod); err != nil {
		errs = append(errs, err)
	}
	delete(c.attached, veth)
	if err := errors.Join(errs...); err != nil {
		return err
	}
	c.queue.add(st.uid)
	return nil
}

func setAdd(m map[int]bool, k int) map[int]bool {
	if m == nil {
		m = map[int]bool{}
	}
	m[k] = true
	return m
}

// Snapshot is a pod's capture state, for tests and debugging.
type Snapshot struct {
	UID         string
	Key         string
	Veth        Veth
	Addrs       []netip.Addr
	Quarantined []netip.Addr
	Failure     string
}

// Pods returns the state of every pod the controller tracks.
func (c *Controller) Pods() []Snapshot {
	c.mu.Lock()
	defer c.mu.Unlock()
	var out []Snapshot
	for uid, st := range c.pods {
		s := Snapshot{UID: uid, Veth: st.veth, Addrs: slices.Clone(st.addrs), Quarantined: slices.Clone(st.qaddrs), Failure: st.failure}
		if st.pod != nil {
			s.Key = st.pod.Key()
		}
		out = append(out, s)
	}
	slices.SortFunc(out, func(a, b Snapshot) int {
		if a.UID < b.UID {
			return -1
		}
		if a.UID > b.UID {
			return 1
		}
		return 0
	})
	return out
}
