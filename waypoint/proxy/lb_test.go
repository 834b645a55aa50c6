package proxy

import (
	"net/netip"
	"testing"

	"github.com/amber-mesh/amber/waypoint/config"
)

func ep(a string, w uint32, healthy bool, prio uint32) config.Endpoint {
	return config.Endpoint{Address: netip.MustParseAddrPort(a), Weight: w, Healthy: healthy, Priority: prio, HBONE: true}
}

func TestPick(t *testing.T) {
	a, b, c := "10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"
	count := func(cl *config.Cluster, n int, avoid map[netip.AddrPort]bool, cs *clusterState) map[string]int {
		if cs == nil {
			cs = &clusterState{inflight: map[netip.AddrPort]int{}}
		}
		out := map[string]int{}
		for range n {
			e, ok := cs.pick(cl, avoid)
			if !ok {
				t.Fatal("no endpoint")
			}
			out[e.Address.String()]++
		}
		return out
	}
	t.Run("round robin, weighted", func(t *testing.T) {
		cl := &config.Cluster{LB: config.RoundRobin, Endpoints: []config.Endpoint{ep(a, 1, true, 0), ep(b, 3, true, 0)}}
		if got := count(cl, 400, nil, nil); got[a] != 100 || got[b] != 300 {
			t.Errorf("%v", got)
		}
	})
	t.Run("unhealthy and lower priority skipped", func(t *testing.T) {
		cl := &config.Cluster{LB: config.Random, Endpoints: []config.Endpoint{ep(a, 1, false, 0), ep(b, 1, true, 0), ep(c, 1, true, 1)}}
		if got := count(cl, 100, nil, nil); got[b] != 100 {
			t.Errorf("%v", got)
		}
		cl.Endpoints[1].Healthy = false
		if got := count(cl, 100, nil, nil); got[c] != 100 {
			t.Errorf("failover to priority 1: %v", got)
		}
		cl.Endpoints[2].Healthy = false
		if _, ok := (&clusterState{inflight: map[netip.AddrPort]int{}}).pick(cl, nil); ok {
			t.Error("picked from no healthy endpoint")
		}
	})
	t.Run("previous hosts avoided while others remain", func(t *testing.T) {
		cl := &config.Cluster{LB: config.LeastRequest, ChoiceCount: 2, Endpoints: []config.Endpoint{ep(a, 1, true, 0), ep(b, 1, true, 0)}}
		avoid := map[netip.AddrPort]bool{netip.MustParseAddrPort(a): true}
		if got := count(cl, 50, avoid, nil); got[b] != 50 {
			t.Errorf("%v", got)
		}
		avoid[netip.MustParseAddrPort(b)] = true
		if got := count(cl, 50, avoid, nil); got[a]+got[b] != 50 {
			t.Errorf("all tried: %v", got)
		}
	})
	t.Run("least request prefers the idle endpoint", func(t *testing.T) {
		cl := &config.Cluster{LB: config.LeastRequest, ChoiceCount: 2, Endpoints: []config.Endpoint{ep(a, 1, true, 0), ep(b, 1, true, 0)}}
		cs := &clusterState{inflight: map[netip.AddrPort]int{}}
		for range 10 {
			cs.begin(netip.MustParseAddrPort(a))
		}
		// Two random choices among two endpoints include b three times in
		// four; a wins only when both choices are a.
		got := count(cl, 4000, nil, cs)
		if got[b] < 2700 || got[b] > 3300 {
			t.Errorf("%v, want about 3000 to the idle endpoint", got)
		}
	})
}
