package client

import (
	"errors"
	"fmt"

	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"google.golang.org/protobuf/proto"
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
	// ReasonRefused: the resource is well formed but asks for something
	// its consumer refuses (the waypoint's compiler: a field outside its
	// allow-list); what it configures fails closed.
	ReasonRefused Reason = "refused"
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

// Decode unpacks one resource of typeURL into m: the resource must have a
// name and a body of exactly that type. Handlers use it first.
func Decode(typeURL string, r *discoveryv3.Resource, m proto.Message) *ResourceError {
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
