package state

import (
	"cmp"
	"errors"
	"maps"
	"slices"
	"strings"

	"github.com/amber-mesh/amber/tunnel/authz"
)

// Snapshot is one consistent, immutable view of the mesh. Everything
// reachable from it is shared and must not be modified. All methods are
// safe for concurrent use.
type Snapshot struct {
	generation uint64

	workloads map[string]*Workload
	services  map[NamespacedHostname]*Service
	policies  map[string]*authz.Policy
	// rejectedPolicies maps the keys of policies whose latest version was
	// refused to the stand-ins enforced in their place (authz.Rejected).
	rejectedPolicies map[string]*authz.Policy

	// Derived from workloads.
	byAddr    map[NetworkAddr][]*Workload
	endpoints map[NamespacedHostname][]Endpoint
	// Derived from services.
	vips      map[NetworkAddr]*Service
	vipRanges []vipRange
	// Derived from policies.
	policySet *authz.Policies
}

type vipRange struct {
	prefix NetworkPrefix
	svc    *Service
}

var emptySnapshot = &Snapshot{policySet: new(authz.Policies)}

// Generation counts the updates that produced this snapshot; it only grows.
func (s *Snapshot) Generation() uint64 { return s.generation }

// Workload returns the workload with the given UID, or nil.
func (s *Snapshot) Workload(uid string) *Workload { return s.workloads[uid] }

// WorkloadByAddr returns the workload at a network address, or nil.
// Host-network workloads are never returned. When several workloads claim
// one address, pods win over other kinds and HBONE over plain TCP, as in
// Istio's ztunnel: a pod's IP is assigned by the node and hard to spoof.
func (s *Snapshot) WorkloadByAddr(a NetworkAddr) *Workload {
	a.Addr = a.Addr.Unmap()
	if ws := s.byAddr[a]; len(ws) > 0 {
		return ws[0]
	}
	return nil
}

// Workloads returns all workloads ordered by UID.
func (s *Snapshot) Workloads() []*Workload {
	return sortedValues(s.workloads, func(a, b *Workload) int { return strings.Compare(a.UID, b.UID) })
}

// Service returns the service with the given key, or nil.
func (s *Snapshot) Service(key NamespacedHostname) *Service { return s.services[key] }

// ServiceByAddr returns the service owning a VIP (or the narrowest VIP
// range containing it), or nil.
func (s *Snapshot) ServiceByAddr(a NetworkAddr) *Service {
	a.Addr = a.Addr.Unmap()
	if svc := s.vips[a]; svc != nil {
		return svc
	}
	for _, r := range s.vipRanges {
		if r.prefix.Network == a.Network && r.prefix.Prefix.Contains(a.Addr) {
			return r.svc
		}
	}
	return nil
}

// ServiceByVIP returns the service reached at VIP a and service port, or nil
// if there is none or it does not expose that port.
func (s *Snapshot) ServiceByVIP(a NetworkAddr, port uint16) *Service {
	svc := s.ServiceByAddr(a)
	if svc == nil {
		return nil
	}
	if _, ok := svc.Ports[port]; !ok {
		return nil
	}
	return svc
}

// Services returns all services ordered by key.
func (s *Snapshot) Services() []*Service {
	return sortedValues(s.services, func(a, b *Service) int {
		return cmp.Or(strings.Compare(a.Namespace, b.Namespace), strings.Compare(a.Hostname, b.Hostname))
	})
}

// Endpoints returns the workloads backing a service, ordered by UID. A
// workload may name a service that is not (yet) known; its endpoints are
// still returned.
func (s *Snapshot) Endpoints(key NamespacedHostname) []Endpoint { return s.endpoints[key] }

// Policies returns the authorization policies of this snapshot, compiled
// and indexed for evaluation. A connection is authorized against the
// policies of the snapshot its destination workload was found in, so the
// workload's policy list and the policies agree. A policy whose latest
// version was rejected is enforced, fail-closed, by its stand-in
// (authz.Rejected) in place of any earlier version; see
// RejectedAuthorizations.
func (s *Snapshot) Policies() *authz.Policies { return s.policySet }

// RejectedPolicy is a policy whose latest version was refused.
type RejectedPolicy struct {
	// Key is the policy's resource name, "namespace/name".
	Key    string
	Reason string
}

// RejectedAuthorizations lists, by key, the policies whose latest version
// the client refused. A refused policy cannot be enforced as written, and
// an absent DENY (or ALLOW) changes decisions, so Policies enforces its
// stand-in instead until a good version arrives or it is removed.
func (s *Snapshot) RejectedAuthorizations() []RejectedPolicy {
	out := make([]RejectedPolicy, 0, len(s.rejectedPolicies))
	for k, p := range s.rejectedPolicies {
		r := RejectedPolicy{Key: k}
		if pe := (*authz.PolicyError)(nil); errors.As(p.Err(), &pe) {
			r.Reason = pe.Reason
		}
		out = append(out, r)
	}
	slices.SortFunc(out, func(a, b RejectedPolicy) int { return strings.Compare(a.Key, b.Key) })
	return out
}

func sortedValues[K comparable, V any](m map[K]V, cmp func(a, b V) int) []V {
	return slices.SortedFunc(maps.Values(m), cmp)
}

// indexWorkloads derives the address and endpoint indexes.
func (s *Snapshot) indexWorkloads() {
	s.byAddr = make(map[NetworkAddr][]*Workload)
	s.endpoints = make(map[NamespacedHostname][]Endpoint)
	for _, w := range s.workloads {
		if !w.HostNetwork {
			for _, a := range w.Addresses {
				k := NetworkAddr{Network: w.Network, Addr: a}
				s.byAddr[k] = append(s.byAddr[k], w)
			}
		}
		for key, ports := range w.Services {
			s.endpoints[key] = append(s.endpoints[key], Endpoint{Workload: w, Ports: ports})
		}
	}
	for _, ws := range s.byAddr {
		slices.SortFunc(ws, rankWorkloads)
	}
	for _, eps := range s.endpoints {
		slices.SortFunc(eps, func(a, b Endpoint) int { return strings.Compare(a.Workload.UID, b.Workload.UID) })
	}
}

// rankWorkloads orders workloads sharing an address, best first.
func rankWorkloads(a, b *Workload) int {
	rank := func(w *Workload) int {
		r := 0
		if strings.Contains(w.UID, "//Pod/") {
			r += 2
		}
		if w.Protocol == ProtocolHBONE {
			r++
		}
		return r
	}
	return cmp.Or(rank(b)-rank(a), strings.Compare(a.UID, b.UID))
}

// indexServices derives the VIP indexes. Two services claiming one VIP is a
// control-plane conflict; the lower key wins so every ztunnel agrees.
func (s *Snapshot) indexServices() {
	s.vips = make(map[NetworkAddr]*Service)
	s.vipRanges = nil
	for _, svc := range s.Services() {
		for _, v := range svc.VIPs {
			if v.Prefix.IsSingleIP() {
				k := NetworkAddr{Network: v.Network, Addr: v.Prefix.Addr()}
				if _, taken := s.vips[k]; !taken {
					s.vips[k] = svc
				}
				continue
			}
			s.vipRanges = append(s.vipRanges, vipRange{prefix: v, svc: svc})
		}
	}
	// Narrowest range first; stable, so ties keep key order.
	slices.SortStableFunc(s.vipRanges, func(a, b vipRange) int { return b.prefix.Prefix.Bits() - a.prefix.Prefix.Bits() })
}
