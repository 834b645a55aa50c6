package state

import (
	"context"
	"maps"
	"strings"
	"sync"
	"sync/atomic"

	"github.com/amber-mesh/amber/tunnel/authz"
)

// Changed says which kinds of resources an update touched.
type Changed uint8

const (
	// ChangedWorkloads: workloads were added, replaced or removed.
	ChangedWorkloads Changed = 1 << iota
	// ChangedServices: services were added, replaced or removed.
	ChangedServices
	// ChangedAuthorizations: policies, or the set of rejected policies,
	// changed. With ChangedWorkloads (a workload's resource lists its
	// policies), it is what makes the tunnel re-check live connections.
	ChangedAuthorizations
)

// Store holds the current Snapshot. It has a single writer (the xDS client)
// and any number of readers; a reader sees either all of an update or none
// of it. The zero value is an empty store ready to use.
type Store struct {
	cur atomic.Pointer[Snapshot]

	mu   sync.Mutex // serializes Update; guards the fields below
	subs map[*Subscription]struct{}
}

// NewStore returns an empty store.
func NewStore() *Store { return new(Store) }

// Load returns the current snapshot; never nil.
func (s *Store) Load() *Snapshot {
	if p := s.cur.Load(); p != nil {
		return p
	}
	return emptySnapshot
}

// Update applies fn's changes as one new snapshot and wakes subscribers.
// Readers never observe a partial update. fn must not call back into s.
func (s *Store) Update(fn func(tx *Txn)) Changed {
	s.mu.Lock()
	defer s.mu.Unlock()
	tx := &Txn{base: s.Load()}
	fn(tx)
	if tx.changed == 0 {
		return 0
	}
	s.cur.Store(tx.build())
	for sub := range s.subs {
		sub.notify(tx.changed)
	}
	return tx.changed
}

// Txn collects the changes of one Update. Maps are copied on first write,
// so the snapshot readers hold is never touched.
type Txn struct {
	base      *Snapshot
	workloads map[string]*Workload
	services  map[NamespacedHostname]*Service
	policies  map[string]*authz.Policy
	rejected  map[string]*authz.Policy
	changed   Changed
}

func (t *Txn) wl() map[string]*Workload {
	if t.workloads == nil {
		t.workloads = maps.Clone(t.base.workloads)
		if t.workloads == nil {
			t.workloads = make(map[string]*Workload)
		}
	}
	return t.workloads
}

func (t *Txn) svc() map[NamespacedHostname]*Service {
	if t.services == nil {
		t.services = maps.Clone(t.base.services)
		if t.services == nil {
			t.services = make(map[NamespacedHostname]*Service)
		}
	}
	return t.services
}

func (t *Txn) pol() map[string]*authz.Policy {
	if t.policies == nil {
		t.policies = maps.Clone(t.base.policies)
		if t.policies == nil {
			t.policies = make(map[string]*authz.Policy)
		}
	}
	return t.policies
}

func (t *Txn) rej() map[string]*authz.Policy {
	if t.rejected == nil {
		t.rejected = maps.Clone(t.base.rejectedPolicies)
		if t.rejected == nil {
			t.rejected = make(map[string]*authz.Policy)
		}
	}
	return t.rejected
}

// PutWorkload adds or replaces a workload by UID.
func (t *Txn) PutWorkload(w *Workload) {
	t.wl()[w.UID] = w
	t.changed |= ChangedWorkloads
}

// PutService adds or replaces a service by key.
func (t *Txn) PutService(s *Service) {
	t.svc()[s.Key()] = s
	t.changed |= ChangedServices
}

// PutAuthorization adds or replaces a policy by key (see NewAuthorization).
func (t *Txn) PutAuthorization(p *authz.Policy) {
	k := p.Key()
	t.pol()[k] = p
	t.clearRejection(k)
	t.changed |= ChangedAuthorizations
}

// RejectAuthorization records that the latest version of a policy was
// refused: stand-in, from RejectedAuthorization, is enforced under its key
// in place of any previous version until PutAuthorization or
// RemoveAuthorization. See Snapshot.RejectedAuthorizations.
func (t *Txn) RejectAuthorization(standIn *authz.Policy) {
	t.rej()[standIn.Key()] = standIn
	t.changed |= ChangedAuthorizations
}

func (t *Txn) clearRejection(key string) {
	if _, ok := t.current().rejectedPolicies[key]; ok {
		delete(t.rej(), key)
		t.changed |= ChangedAuthorizations
	}
}

// RemoveWorkload removes a workload and reports whether it existed.
func (t *Txn) RemoveWorkload(uid string) bool {
	if _, ok := t.current().workloads[uid]; !ok {
		return false
	}
	delete(t.wl(), uid)
	t.changed |= ChangedWorkloads
	return true
}

// RemoveService removes a service and reports whether it existed.
func (t *Txn) RemoveService(key NamespacedHostname) bool {
	if _, ok := t.current().services[key]; !ok {
		return false
	}
	delete(t.svc(), key)
	t.changed |= ChangedServices
	return true
}

// RemoveAuthorization removes a policy by key, and any record of its
// rejection, and reports whether the policy existed.
func (t *Txn) RemoveAuthorization(key string) bool {
	t.clearRejection(key)
	if _, ok := t.current().policies[key]; !ok {
		return false
	}
	delete(t.pol(), key)
	t.changed |= ChangedAuthorizations
	return true
}

// RemoveAddress removes whatever an Address resource name refers to: the
// workload with that UID and the service with that "namespace/hostname" key.
func (t *Txn) RemoveAddress(name string) bool {
	removed := t.RemoveWorkload(name)
	if ns, host, ok := strings.Cut(name, "/"); ok {
		removed = t.RemoveService(NamespacedHostname{Namespace: ns, Hostname: host}) || removed
	}
	return removed
}

// current is the transaction's view: its own maps where written, else the
// base snapshot's.
func (t *Txn) current() *Snapshot {
	v := *t.base
	if t.workloads != nil {
		v.workloads = t.workloads
	}
	if t.services != nil {
		v.services = t.services
	}
	if t.policies != nil {
		v.policies = t.policies
	}
	if t.rejected != nil {
		v.rejectedPolicies = t.rejected
	}
	return &v
}

func (t *Txn) build() *Snapshot {
	next := t.current()
	next.generation = t.base.generation + 1
	if t.changed&ChangedWorkloads != 0 {
		next.indexWorkloads()
	}
	if t.changed&ChangedServices != 0 {
		next.indexServices()
	}
	if t.changed&ChangedAuthorizations != 0 {
		enforced := next.policies
		if len(next.rejectedPolicies) > 0 {
			enforced = make(map[string]*authz.Policy, len(next.policies)+len(next.rejectedPolicies))
			maps.Copy(enforced, next.policies)
			maps.Copy(enforced, next.rejectedPolicies) // a stand-in replaces the version it failed to update
		}
		next.policySet = authz.NewPolicies(enforced)
	}
	return next
}

// Subscription reports changes to a Store. Notifications coalesce: however
// many updates happen between two Takes, C delivers one wake-up and Take
// returns the union of what changed with the latest snapshot.
type Subscription struct {
	store *Store
	c     chan struct{}

	mu      sync.Mutex // guards pending
	pending Changed
}

// Subscribe starts reporting changes made after the call. Check the current
// snapshot after subscribing, not before, to miss nothing.
func (s *Store) Subscribe() *Subscription {
	sub := &Subscription{store: s, c: make(chan struct{}, 1)}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.subs == nil {
		s.subs = make(map[*Subscription]struct{})
	}
	s.subs[sub] = struct{}{}
	return sub
}

func (sub *Subscription) notify(c Changed) {
	sub.mu.Lock()
	sub.pending |= c
	sub.mu.Unlock()
	select {
	case sub.c <- struct{}{}:
	default:
	}
}

// C receives a value when there are changes to Take.
func (sub *Subscription) C() <-chan struct{} { return sub.c }

// Take returns the current snapshot and what changed since the last Take.
// The snapshot includes at least those changes.
func (sub *Subscription) Take() (*Snapshot, Changed) {
	sub.mu.Lock()
	c := sub.pending
	sub.pending = 0
	sub.mu.Unlock()
	return sub.store.Load(), c
}

// Wait blocks until there are changes, then Takes them.
func (sub *Subscription) Wait(ctx context.Context) (*Snapshot, Changed, error) {
	for {
		select {
		case <-ctx.Done():
			return nil, 0, ctx.Err()
		case <-sub.c:
			if snap, c := sub.Take(); c != 0 {
				return snap, c, nil
			}
		}
	}
}

// Close stops notifications. It does not close C.
func (sub *Subscription) Close() {
	sub.store.mu.Lock()
	defer sub.store.mu.Unlock()
	delete(sub.store.subs, sub)
}
