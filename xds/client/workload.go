package client

import (
	"errors"
	"fmt"
	"log/slog"
	"strings"

	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"

	"github.com/amber-mesh/amber/internal/logkey"
	"github.com/amber-mesh/amber/tunnel/authz"
	"github.com/amber-mesh/amber/xds/state"
	"github.com/amber-mesh/amber/xds/workloadapi"
	"github.com/amber-mesh/amber/xds/workloadapi/security"
)

// WorkloadAPI is what a ztunnel subscribes to: the workload API's
// policies and addresses, both wildcard, applied to store. Policies go
// first so that, on a fresh stream, a workload rarely arrives before the
// policies it names. A rejected update keeps the resource's previous
// version in store.
func WorkloadAPI(store *state.Store, log *slog.Logger) []Type {
	return []Type{
		{URL: workloadapi.AuthorizationTypeURL, Handler: &authorizations{store: store, log: log}},
		{URL: workloadapi.AddressTypeURL, Handler: addresses{store: store}},
	}
}

// Workloads is the Workload type Envoy waypoints subscribe to for their
// workload discovery (istio pilot/pkg/xds/workload.go appendAddress): the
// workloads of the Address type without the services, keyed by uid,
// applied to store. A rejected update keeps the previous version.
func Workloads(store *state.Store) Type {
	return Type{URL: workloadapi.WorkloadTypeURL, Handler: workloads{store: store}}
}

type addresses struct{ store *state.Store }

type addressOp struct {
	name     string
	workload *state.Workload
	service  *state.Service
}

// Apply validates each Address on its own and applies the good ones and
// the removals as one store update.
func (h addresses) Apply(resources []*discoveryv3.Resource, removed []string) (rejects []*ResourceError) {
	const typeURL = workloadapi.AddressTypeURL
	var ops []addressOp
	for _, r := range resources {
		reject := func(reason Reason, err error) {
			rejects = append(rejects, &ResourceError{TypeURL: typeURL, Name: r.GetName(), Reason: reason, Err: err})
		}
		var a workloadapi.Address
		if rerr := Decode(typeURL, r, &a); rerr != nil {
			rejects = append(rejects, rerr)
			continue
		}
		op := addressOp{name: r.GetName()}
		switch t := a.GetType().(type) {
		case *workloadapi.Address_Workload:
			w, err := workload(t.Workload, op.name)
			if err != nil {
				reject(reasonOf(err), err)
				continue
			}
			op.workload = w
		case *workloadapi.Address_Service:
			s, err := state.NewService(t.Service)
			if err != nil {
				reject(ReasonInvalid, err)
				continue
			}
			if k := s.Key().String(); k != op.name {
				reject(ReasonNameMismatch, fmt.Errorf("service key is %q", k))
				continue
			}
			op.service = s
		default:
			reject(ReasonInvalid, errors.New("address is neither a workload nor a service"))
			continue
		}
		ops = append(ops, op)
	}

	h.store.Update(func(tx *state.Txn) {
		for _, name := range removed {
			tx.RemoveAddress(name)
		}
		for _, op := range ops {
			// One name is one resource: if it changed kind, drop the old one.
			if op.workload != nil {
				if ns, host, ok := strings.Cut(op.name, "/"); ok {
					tx.RemoveService(state.NamespacedHostname{Namespace: ns, Hostname: host})
				}
				tx.PutWorkload(op.workload)
			} else {
				tx.RemoveWorkload(op.name)
				tx.PutService(op.service)
			}
		}
	})
	return rejects
}

// errNameMismatch marks a resource whose name is not its key.
var errNameMismatch = errors.New("name mismatch")

func reasonOf(err error) Reason {
	if errors.Is(err, errNameMismatch) {
		return ReasonNameMismatch
	}
	return ReasonInvalid
}

// workload converts a Workload whose resource name must be its uid: a
// later removal by name would miss it otherwise.
func workload(w *workloadapi.Workload, name string) (*state.Workload, error) {
	sw, err := state.NewWorkload(w)
	if err != nil {
		return nil, err
	}
	if sw.UID != name {
		return nil, fmt.Errorf("%w: workload uid is %q", errNameMismatch, sw.UID)
	}
	return sw, nil
}

type workloads struct{ store *state.Store }

// Apply validates each Workload on its own and applies the good ones and
// the removals as one store update.
func (h workloads) Apply(resources []*discoveryv3.Resource, removed []string) (rejects []*ResourceError) {
	const typeURL = workloadapi.WorkloadTypeURL
	var ws []*state.Workload
	for _, r := range resources {
		var w workloadapi.Workload
		if rerr := Decode(typeURL, r, &w); rerr != nil {
			rejects = append(rejects, rerr)
			continue
		}
		sw, err := workload(&w, r.GetName())
		if err != nil {
			rejects = append(rejects, &ResourceError{TypeURL: typeURL, Name: r.GetName(), Reason: reasonOf(err), Err: err})
			continue
		}
		ws = append(ws, sw)
	}
	h.store.Update(func(tx *state.Txn) {
		for _, name := range removed {
			tx.RemoveWorkload(name)
		}
		for _, w := range ws {
			tx.PutWorkload(w)
		}
	})
	return rejects
}

type authorizations struct {
	store *state.Store
	log   *slog.Logger
}

// Apply validates each policy on its own and applies the good ones and the
// removals as one store update.
func (h *authorizations) Apply(resources []*discoveryv3.Resource, removed []string) (rejects []*ResourceError) {
	const typeURL = workloadapi.AuthorizationTypeURL
	var policies []*authz.Policy
	// The enforcer must know a policy exists that it cannot read, or a
	// malformed DENY would silently allow: what could be read of each
	// rejected policy stands in for it, fail-closed.
	var standIns []*authz.Policy
	for _, r := range resources {
		var a security.Authorization
		rejectRead := func(rerr *ResourceError, read *security.Authorization) {
			rejects = append(rejects, rerr)
			if r.GetName() != "" {
				standIns = append(standIns, state.RejectedAuthorization(r.GetName(), read, rerr.Err.Error()))
			}
		}
		reject := func(reason Reason, err error) {
			rejectRead(&ResourceError{TypeURL: typeURL, Name: r.GetName(), Reason: reason, Err: err}, &a)
		}
		if rerr := Decode(typeURL, r, &a); rerr != nil {
			rejectRead(rerr, nil)
			continue
		}
		p, err := state.NewAuthorization(&a)
		if err != nil {
			reject(ReasonInvalid, err)
			continue
		}
		if k := p.Key(); k != r.GetName() {
			reject(ReasonNameMismatch, fmt.Errorf("policy key is %q", k))
			continue
		}
		if err := p.Err(); err != nil {
			// Well formed, so ACKed, but enforced as its most restrictive
			// reading.
			h.log.Warn("authorization policy enforced fail-closed", logkey.Error, err)
		}
		policies = append(policies, p)
	}

	h.store.Update(func(tx *state.Txn) {
		for _, name := range removed {
			tx.RemoveAuthorization(name)
		}
		for _, p := range policies {
			tx.PutAuthorization(p)
		}
		for _, p := range standIns {
			tx.RejectAuthorization(p)
		}
	})
	return rejects
}
