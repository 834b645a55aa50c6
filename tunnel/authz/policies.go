package authz

import (
	"maps"
	"slices"
)

// Policies is an immutable set of compiled policies, indexed the way
// ztunnel's PolicyStore is: GLOBAL ones together, NAMESPACE ones by
// namespace, every one by key for workload references. A new version of
// the set is a new Policies (xds/state builds one per snapshot), so
// readers never block and never see half an update. The zero value is an
// empty set.
type Policies struct {
	byKey         map[string]*Policy
	global        policyList
	byNamespace   map[string]*policyList
	unenforceable int
	rejected      int
}

// policyList splits policies by action so that every DENY can be checked
// before the first ALLOW; unknown actions count as DENY.
type policyList struct{ deny, allow []*Policy }

// NewPolicies indexes byKey, which maps each policy's Key to it. The set
// keeps byKey: it must not be modified afterwards.
func NewPolicies(byKey map[string]*Policy) *Policies {
	s := &Policies{byKey: byKey, byNamespace: make(map[string]*policyList)}
	// Sorted so that the policy named in a decision does not depend on map
	// order.
	for _, k := range slices.Sorted(maps.Keys(byKey)) {
		pol := byKey[k]
		switch {
		case pol.rejected:
			s.rejected++
		case pol.unenforceable != "":
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
	return s
}

// Len returns the number of policies in the set.
func (p *Policies) Len() int { return len(p.byKey) }

// Unenforceable returns how many policies in the set are enforced
// fail-closed because part of them cannot be evaluated.
func (p *Policies) Unenforceable() int { return p.unenforceable }

// Rejected returns how many policies in the set stand in, fail-closed, for
// policies the client rejected (see Rejected).
func (p *Policies) Rejected() int { return p.rejected }

// Get returns the policy stored under key ("namespace/name"), or nil.
func (p *Policies) Get(key string) *Policy { return p.byKey[key] }

// All returns copies of every policy, sorted by key (for config dumps).
func (p *Policies) All() []Authorization {
	out := make([]Authorization, 0, len(p.byKey))
	for _, k := range slices.Sorted(maps.Keys(p.byKey)) {
		out = append(out, p.byKey[k].Authorization())
	}
	return out
}

// Applicable returns the keys of the policies that apply to w, in the
// order Evaluate considers them: w's namespace, global, then w's own
// references (including ones not in the set, which deny).
func (p *Policies) Applicable(w Workload) []string {
	var out []string
	for _, l := range []*policyList{p.byNamespace[w.Namespace], &p.global} {
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
