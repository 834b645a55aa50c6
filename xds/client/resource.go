package client

import (
	"errors"
	"fmt"
	"strings"

	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"google.golang.org/protobuf/proto"

	"github.com/amber-mesh/amber/internal/logkey"
	"github.com/amber-mesh/amber/tunnel/authz"
	"github.com/amber-mesh/amber/xds/state"
	"github.com/amber-mesh/amber/xds/workloadapi"
	"github.com/amber-mesh/amber/xds/workloadapi/security"
)

// Reason classifies why a resource was rejected; it is the label of the
// Stats.Rejected counters.
type Reason string

const (
	// ReasonMissingBody: the Resource carried no Any.
	ReasonMissingBody Reason = "missing_body"
	// ReasonTypeMismatch: the Any's type URL is not the response's.
	ReasonTypeMismatch Reason = "type_mismatch"
	// ReasonDecode: the bytes are not a valid protobuf of the type.
	ReasonDecode Reason = "decode"
	// ReasonInvalid: the message decoded but fails validation.
	ReasonInvalid Reason = "invalid"
	// ReasonNameMismatch: the resource name is not the message's key
	// (workload uid, "namespace/hostname", "namespace/name"), so a later
	// removal by name would miss it.
	ReasonNameMismatch Reason = "name_mismatch"
	// ReasonUnknownType: a response of a type the client did not ask for.
	ReasonUnknownType Reason = "unknown_type"
)

// ResourceError is the rejection of one resource; its text goes into the
// NACK's error_detail.
type ResourceError struct {
	TypeURL string
	Name    string
	Reason  Reason
	Err     error
}

func (e *ResourceError) Error() string {
	return fmt.Sprintf("%s %q: %s: %v", e.TypeURL, e.Name, e.Reason, e.Err)
}

func (e *ResourceError) Unwrap() error { return e.Err }

// decode unpacks one resource into m.
func decode(typeURL string, r *discoveryv3.Resource, m proto.Message) *ResourceError {
	fail := func(reason Reason, err error) *ResourceError {
		return &ResourceError{TypeURL: typeURL, Name: r.GetName(), Reason: reason, Err: err}
	}
	switch body := r.GetResource(); {
	case r.GetName() == "":
		return fail(ReasonInvalid, errors.New("resource has no name"))
	case body == nil:
		return fail(ReasonMissingBody, errors.New("resource has no body"))
	case body.GetTypeUrl() != typeURL:
		return fail(ReasonTypeMismatch, fmt.Errorf("body is %q", body.GetTypeUrl()))
	}
	if err := proto.Unmarshal(r.GetResource().GetValue(), m); err != nil {
		return fail(ReasonDecode, err)
	}
	return nil
}

type addressOp struct {
	name, version string
	workload      *state.Workload
	service       *state.Service
}

// applyAddresses validates each Address resource on its own and applies the
// good ones and the removals as one store update.
func (c *Client) applyAddresses(resp *discoveryv3.DeltaDiscoveryResponse) (rejects []*ResourceError, applied, removed int) {
	const typeURL = workloadapi.AddressTypeURL
	var ops []addressOp
	for _, r := range resp.GetResources() {
		reject := func(reason Reason, err error) {
			rejects = append(rejects, &ResourceError{TypeURL: typeURL, Name: r.GetName(), Reason: reason, Err: err})
		}
		var a workloadapi.Address
		if rerr := decode(typeURL, r, &a); rerr != nil {
			rejects = append(rejects, rerr)
			continue
		}
		op := addressOp{name: r.GetName(), version: r.GetVersion()}
		switch t := a.GetType().(type) {
		case *workloadapi.Address_Workload:
			w, err := state.NewWorkload(t.Workload)
			if err != nil {
				reject(ReasonInvalid, err)
				continue
			}
			if w.UID != op.name {
				reject(ReasonNameMismatch, fmt.Errorf("workload uid is %q", w.UID))
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

	known := c.known[typeURL]
	c.store.Update(func(tx *state.Txn) {
		for _, name := range resp.GetRemovedResources() {
			if tx.RemoveAddress(name) {
				removed++
			}
			delete(known, name)
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
			known[op.name] = op.version
			applied++
		}
	})
	names := make([]string, len(ops))
	for i, op := range ops {
		names[i] = op.name
	}
	c.clearRejected(typeURL, resp.GetRemovedResources(), names)
	return rejects, applied, removed
}

// applyAuthorizations validates each policy on its own and applies the good
// ones and the removals as one store update.
func (c *Client) applyAuthorizations(resp *discoveryv3.DeltaDiscoveryResponse) (rejects []*ResourceError, applied, removed int) {
	const typeURL = workloadapi.AuthorizationTypeURL
	type op struct {
		name, version string
		policy        *authz.Policy
	}
	var ops []op
	// The enforcer must know a policy exists that it cannot read, or a
	// malformed DENY would silently allow: what could be read of each
	// rejected policy stands in for it, fail-closed.
	var standIns []*authz.Policy
	for _, r := range resp.GetResources() {
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
		if rerr := decode(typeURL, r, &a); rerr != nil {
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
			c.log.Warn("authorization policy enforced fail-closed", logkey.Error, err)
		}
		ops = append(ops, op{name: r.GetName(), version: r.GetVersion(), policy: p})
	}

	known := c.known[typeURL]
	c.store.Update(func(tx *state.Txn) {
		for _, name := range resp.GetRemovedResources() {
			if tx.RemoveAuthorization(name) {
				removed++
			}
			delete(known, name)
		}
		for _, op := range ops {
			tx.PutAuthorization(op.policy)
			known[op.name] = op.version
			applied++
		}
		for _, p := range standIns {
			tx.RejectAuthorization(p)
		}
	})
	names := make([]string, len(ops))
	for i, op := range ops {
		names[i] = op.name
	}
	c.clearRejected(typeURL, resp.GetRemovedResources(), names)
	return rejects, applied, removed
}

// clearRejected forgets earlier rejections of resources that are now
// applied or gone.
func (c *Client) clearRejected(typeURL string, removed, applied []string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	m := c.rejected[typeURL]
	for _, n := range removed {
		delete(m, n)
	}
	for _, n := range applied {
		delete(m, n)
	}
}
