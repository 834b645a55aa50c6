package authz

import (
	"errors"
	"maps"
	"reflect"
	"slices"
	"sync"
	"sync/atomic"
)

// Policies is the set of authorization policies a ztunnel knows, indexed
// the way ztunnel's PolicyStore is: GLOBAL ones together, NAMESPACE ones by
// namespace, every one by key for workload references.
//
// Readers (Evaluate, Generation) never block: each update publishes a new
// immutable snapshot. The zero value is an empty set ready for use.
type Policies struct {
	mu  sync.Mutex // serialises writers; readers never take it
	cur atomic.Pointer[snapshot]
}

type snapshot struct {
	gen           uint64
	byKey         map[string]*policy
	global        policyList
	byNamespace   map[string]*policyList
	unenforceable int
	// changed is closed when a newer snapshot replaces this one.
	changed chan struct{}
}

// policyList splits policies by action so that every DENY can be checked
// before the first ALLOW; unknown actions count as DENY.
type policyList struct{ deny, allow []*policy }

// emptySnapshot serves readers of a set that was never written. It is
// never published, so its nil changed channel is never closed.
var emptySnapshot = &snapshot{}

func (p *Policies) load() *snapshot {
	if s := p.cur.Load(); s != nil {
		return s
	}
	return emptySnapshot
}

// current returns the published snapshot, publishing an empty one first if
// there is none. Callers hold p.mu.
func (p *Policies) current() *snapshot {
	if s := p.cur.Load(); s != nil {
		return s
	}
	s := &snapshot{changed: make(chan struct{})}
	p.cur.Store(s)
	return s
}

// Generation returns a number that changes whenever the set's content
// changes. Connections authorized at an older generation should be
// evaluated again (DESIGN.md §3: live connections are re-checked).
func (p *Policies) Generation() uint64 { return p.load().gen }

// Changed returns a channel that is closed at the next change of the set.
// Take it before evaluating, so that no change can slip in between.
func (p *Policies) Changed() <-chan struct{} {
	if s := p.cur.Load(); s != nil {
		return s.changed
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.current().changed
}

// Len returns the number of policies in the set.
func (p *Policies) Len() int { return len(p.load().byKey) }

// Unenforceable returns how many policies in the set are enforced
// fail-closed because part of them cannot be evaluated.
func (p *Policies) Unenforceable() int { return p.load().unenforceable }

// Get returns a copy of the policy stored under key ("namespace/name").
func (p *Policies) Get(key string) (Authorization, bool) {
	pol, ok := p.load().byKey[key]
	if !ok {
		return Authorization{}, false
	}
	return cloneAuthorization(pol.src), true
}

// All returns copies of every policy, sorted by key (for config dumps).
func (p *Policies) All() []Authorization {
	s := p.load()
	out := make([]Authorization, 0, len(s.byKey))
	for _, k := range slices.Sorted(maps.Keys(s.byKey)) {
		out = append(out, cloneAuthorization(s.byKey[k].src))
	}
	return out
}

// Applicable returns the keys of the policies that apply to w, in the
// order Evaluate considers them: w's namespace, global, then w's own
// references (including ones not in the set, which deny).
func (p *Policies) Applicable(w Workload) []string {
	s := p.load()
	var out []string
	for _, l := range []*policyList{s.byNamespace[w.Namespace], &s.global} {
		if l == nil {
			continue
		}
		var keys []string
		for _, pol := range slices.Concat(l.deny, l.allow) {
			keys = append(keys, pol.key)
		}
		slices.Sort(keys)
		out = append(out, keys...)
	}
	return append(out, w.Policies...)
}

// Update removes the policies keyed by remove, then inserts or replaces
// upsert, as one change (one delta-xDS response). Policies that cannot be
// evaluated are stored anyway and enforced fail-closed; each is reported in
// the returned error as a *PolicyError wrapping ErrUnenforceable.
func (p *Policies) Update(upsert []Authorization, remove []string) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	old := p.current()
	next := maps.Clone(old.byKey)
	if next == nil {
		next = make(map[string]*policy)
	}
	changed := false
	for _, k := range remove {
		if _, ok := next[k]; ok {
			delete(next, k)
			changed = true
		}
	}
	var errs []error
	for _, a := range upsert {
		pol := compile(a)
		if pol.unenforceable != "" {
			errs = append(errs, &PolicyError{Key: pol.key, Reason: pol.unenforceable})
		}
		if prev, ok := next[pol.key]; ok && reflect.DeepEqual(prev.src, pol.src) {
			continue
		}
		next[pol.key] = pol
		changed = true
	}
	if changed {
		p.publish(old, next)
	}
	return errors.Join(errs...)
}

// Replace sets the whole content of the set to all (a state-of-the-world
// response or a reconnect). Errors are reported as by Update.
func (p *Policies) Replace(all []Authorization) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	old := p.current()
	next := make(map[string]*policy, len(all))
	var errs []error
	for _, a := range all {
		pol := compile(a)
		if pol.unenforceable != "" {
			errs = append(errs, &PolicyError{Key: pol.key, Reason: pol.unenforceable})
		}
		if prev, ok := old.byKey[pol.key]; ok && reflect.DeepEqual(prev.src, pol.src) {
			pol = prev
		}
		next[pol.key] = pol
	}
	if !maps.Equal(next, old.byKey) {
		p.publish(old, next)
	}
	return errors.Join(errs...)
}

// publish indexes byKey into a new snapshot, makes it current and wakes
// the waiters on the old one. Callers hold p.mu.
func (p *Policies) publish(old *snapshot, byKey map[string]*policy) {
	s := &snapshot{
		gen:         old.gen + 1,
		byKey:       byKey,
		byNamespace: make(map[string]*policyList),
		changed:     make(chan struct{}),
	}
	// Sorted so that the policy named in a decision does not depend on map
	// order.
	for _, k := range slices.Sorted(maps.Keys(byKey)) {
		pol := byKey[k]
		if pol.unenforceable != "" {
			s.unenforceable++
		}
		var l *policyList
		switch pol.src.Scope {
		case ScopeGlobal:
			l = &s.global
		case ScopeWorkloadSelector:
			// Reached only through the workloads that list it.
			continue
		default:
			// NAMESPACE, and an unknown scope widened to the widest target
			// a policy outside the root namespace can have: its namespace.
			l = s.byNamespace[pol.src.Namespace]
			if l == nil {
				l = &policyList{}
				s.byNamespace[pol.src.Namespace] = l
			}
		}
		if pol.action == ActionAllow {
			l.allow = append(l.allow, pol)
		} else {
			l.deny = append(l.deny, pol)
		}
	}
	p.cur.Store(s)
	close(old.changed)
}
