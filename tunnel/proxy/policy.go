package proxy

import (
	"github.com/amber-mesh/amber/tunnel/authz"
	"github.com/amber-mesh/amber/xds/state"
)

// authzWorkload is the part of w that selects its policies.
func authzWorkload(w *state.Workload) authz.Workload {
	return authz.Workload{Namespace: w.Namespace, Name: w.Name, Policies: w.AuthorizationPolicies}
}

// denied counts a connection refused by decision d.
func (p *Proxy) denied(d authz.Decision) {
	if d.Reason == authz.ReasonRejected {
		p.stats.AuthzRejectedPolicy.Add(1)
		return
	}
	p.stats.AuthzDenied.Add(1)
}

// watchPolicies re-checks live inbound connections whenever policies or
// workloads change (a workload's policy list is part of its resource).
// New subscribes before any connection is accepted.
func (p *Proxy) watchPolicies(sub *state.Subscription) {
	defer p.wg.Done()
	defer sub.Close()
	for {
		select {
		case <-p.ctx.Done():
			return
		case <-sub.C():
			if snap, what := sub.Take(); what&(state.ChangedAuthorizations|state.ChangedWorkloads) != 0 {
				p.recheck(snap)
				if testHookRechecked != nil {
					testHookRechecked(snap.Generation())
				}
			}
		}
	}
}

// recheck closes the live inbound connections the snapshot's policies no
// longer allow.
func (p *Proxy) recheck(snap *state.Snapshot) {
	p.mu.Lock()
	var live []*conn
	for c := range p.conns {
		if c.inbound {
			live = append(live, c)
		}
	}
	p.mu.Unlock()
	for _, c := range live {
		p.check(c, snap)
	}
}

// recheckTracked re-checks an inbound connection just tracked if the
// store moved on since it was authorized, by the snapshot of generation
// gen: a change published in between found it untracked, so its own
// re-check passed it by. (ztunnel registers a connection before its first
// check for the same reason.) Any later change finds it tracked.
func (p *Proxy) recheckTracked(c *conn, gen uint64) {
	if snap := p.cfg.Store.Load(); snap.Generation() != gen {
		p.check(c, snap)
	}
}

// check closes the live inbound connection c if snap's policies no longer
// allow it, or no longer hold its destination.
func (p *Proxy) check(c *conn, snap *state.Snapshot) {
	w := p.localWorkload(snap, c.dst.Addr())
	if w == nil {
		c.close(errDestRemoved)
		return
	}
	if d := snap.Policies().Evaluate(c.authzConn(w)); !d.Allowed {
		if d.Reason == authz.ReasonUnknownPolicy {
			// The workload names a policy the store does not hold
			// yet: istiod pushes workloads before policies, so a
			// workload that gained a policy names it first (seen
			// with istiod in test/e2e). New connections are refused
			// in that window; a live one waits for the policy's own
			// update, which re-checks it, rather than being closed
			// on a decision no policy took: that would end the
			// connections the policy, once known, allows.
			return
		}
		p.stats.AuthzRevoked.Add(1)
		c.close(&DeniedError{Decision: d, Revoked: true})
	}
}

// Test hooks, nil outside tests.
var (
	// testHookAuthorized runs when an inbound connection was authorized,
	// before it is tracked.
	testHookAuthorized func()
	// testHookRechecked runs when the live connections were re-checked
	// against the snapshot of generation gen.
	testHookRechecked func(gen uint64)
)
