package proxy

import (
	"github.com/amber-mesh/amber/tunnel/authz"
	"github.com/amber-mesh/amber/xds/state"
	"github.com/amber-mesh/amber/xds/workloadapi/security"
)

// convertPolicy copies a workload API policy into authz's form. Anything
// authz has no field for (extensions, dry-run) is reported as Unsupported,
// so the policy is enforced fail-closed rather than silently widened.
func convertPolicy(a *security.Authorization) authz.Authorization {
	out := authz.Authorization{
		Name:      a.GetName(),
		Namespace: a.GetNamespace(),
		Scope:     authz.Scope(a.GetScope()),
		Action:    authz.Action(a.GetAction()),
	}
	switch {
	case len(a.GetExtensions()) > 0:
		out.Unsupported = "policy extensions"
	case a.GetDryRun():
		// A dry-run policy must not change traffic; istiod does not send
		// them to ztunnels today. Fail closed if one arrives anyway.
		out.Unsupported = "dry-run policy"
	}
	for _, g := range a.GetGroups() {
		var og authz.Group
		for _, r := range g.GetRules() {
			var or authz.Rules
			for _, m := range r.GetMatches() {
				om, unsupported := convertMatch(m)
				if unsupported != "" && out.Unsupported == "" {
					out.Unsupported = unsupported
				}
				or.Matches = append(or.Matches, om)
			}
			og.Rules = append(og.Rules, or)
		}
		out.Groups = append(out.Groups, og)
	}
	return out
}

func convertMatch(m *security.Match) (authz.Match, string) {
	var unsupported string
	if len(m.GetExtensions()) > 0 {
		unsupported = "match extensions"
	}
	return authz.Match{
		Namespaces:          stringMatches(m.GetNamespaces()),
		NotNamespaces:       stringMatches(m.GetNotNamespaces()),
		Principals:          stringMatches(m.GetPrincipals()),
		NotPrincipals:       stringMatches(m.GetNotPrincipals()),
		SourceIPs:           addresses(m.GetSourceIps()),
		NotSourceIPs:        addresses(m.GetNotSourceIps()),
		DestinationIPs:      addresses(m.GetDestinationIps()),
		NotDestinationIPs:   addresses(m.GetNotDestinationIps()),
		DestinationPorts:    append([]uint32(nil), m.GetDestinationPorts()...),
		NotDestinationPorts: append([]uint32(nil), m.GetNotDestinationPorts()...),
		ServiceAccounts:     accounts(m.GetServiceAccounts()),
		NotServiceAccounts:  accounts(m.GetNotServiceAccounts()),
	}, unsupported
}

func stringMatches(in []*security.StringMatch) []authz.StringMatch {
	var out []authz.StringMatch
	for _, s := range in {
		// A StringMatch without a match type stays MatchUnset, which authz
		// enforces fail-closed.
		var sm authz.StringMatch
		switch t := s.GetMatchType().(type) {
		case *security.StringMatch_Exact:
			sm = authz.Exact(t.Exact)
		case *security.StringMatch_Prefix:
			sm = authz.Prefix(t.Prefix)
		case *security.StringMatch_Suffix:
			sm = authz.Suffix(t.Suffix)
		case *security.StringMatch_Presence:
			sm = authz.Presence()
		}
		out = append(out, sm)
	}
	return out
}

func addresses(in []*security.Address) []authz.Address {
	var out []authz.Address
	for _, a := range in {
		out = append(out, authz.Address{Address: append([]byte(nil), a.GetAddress()...), Length: a.GetLength()})
	}
	return out
}

func accounts(in []*security.ServiceAccountMatch) []authz.ServiceAccountMatch {
	var out []authz.ServiceAccountMatch
	for _, a := range in {
		out = append(out, authz.ServiceAccountMatch{Namespace: a.GetNamespace(), ServiceAccount: a.GetServiceAccount()})
	}
	return out
}

// authzWorkload is the part of w that selects its policies.
func authzWorkload(w *state.Workload) authz.Workload {
	return authz.Workload{Namespace: w.Namespace, Name: w.Name, Policies: w.AuthorizationPolicies}
}

// syncPolicies makes the enforced policy set the snapshot's.
func (p *Proxy) syncPolicies(snap *state.Snapshot) {
	all := snap.Authorizations()
	pols := make([]authz.Authorization, 0, len(all))
	for _, a := range all {
		pols = append(pols, convertPolicy(a))
	}
	if err := p.policies.Replace(pols); err != nil {
		p.log.Warn("authorization policies enforced fail-closed", "error", err)
	}
}

// watchPolicies keeps the policy set in step with the store and re-checks
// live inbound connections whenever policies or workloads change (a
// workload's policy list is part of its resource).
func (p *Proxy) watchPolicies(sub *state.Subscription) {
	defer p.wg.Done()
	defer sub.Close()
	for {
		changed := p.policies.Changed()
		select {
		case <-p.ctx.Done():
			return
		case <-sub.C():
			snap, what := sub.Take()
			if what&state.ChangedAuthorizations != 0 {
				p.syncPolicies(snap)
			}
			// changed, taken above, was closed by syncPolicies if it
			// changed the set; this iteration handles that change.
			if what&(state.ChangedAuthorizations|state.ChangedWorkloads) != 0 {
				p.recheck(snap)
			}
		case <-changed:
			p.recheck(p.cfg.Store.Load())
		}
	}
}

// recheck closes the live inbound connections the current policies no
// longer allow.
func (p *Proxy) recheck(snap *state.Snapshot) {
	p.mu.Lock()
	var live []*tracked
	for t := range p.conns {
		if t.inbound {
			live = append(live, t)
		}
	}
	p.mu.Unlock()
	for _, t := range live {
		w := p.localWorkload(snap, t.authz.DstIP)
		if w == nil {
			t.close(errDestRemoved)
			continue
		}
		c := t.authz
		c.DstWorkload = authzWorkload(w)
		if d := p.policies.Evaluate(c); !d.Allowed {
			if d.Reason == authz.ReasonUnknownPolicy {
				// The workload names a policy the store does not hold
				// yet: istiod pushes workloads before policies, so a
				// workload that gained a policy names it first (seen
				// with istiod in test/e2e). New connections are refused
				// in that window; a live one waits for the policy's own
				// update, which re-checks it, rather than being closed
				// on a decision no policy took: that would end the
				// connections the policy, once known, allows.
				continue
			}
			p.stats.AuthzRevoked.Add(1)
			t.close(&DeniedError{Decision: d, Revoked: true})
		}
	}
}
