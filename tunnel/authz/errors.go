package authz

import (
	"errors"
	"fmt"
)

var (
	// ErrUnenforceable is wrapped by the PolicyError of a policy kept with
	// content that cannot be evaluated.
	ErrUnenforceable = errors.New("policy cannot be enforced at L4")
	// ErrRejected is wrapped by the PolicyError of a rejected policy's
	// stand-in (see Rejected).
	ErrRejected = errors.New("policy was rejected")
)

// PolicyError reports a policy that is enforced fail-closed: the data
// plane keeps denying what the policy could deny. It wraps
// ErrUnenforceable, or ErrRejected for a rejected policy's stand-in.
type PolicyError struct {
	Key      string // "namespace/name"
	Reason   string // what could not be evaluated, or why the policy was rejected
	Rejected bool   // the policy was rejected: only what could be read of it is known
}

func (e *PolicyError) Error() string {
	return fmt.Sprintf("upsert policy %s: %s: %v (enforced fail-closed)", e.Key, e.Reason, e.Unwrap())
}

func (e *PolicyError) Unwrap() error {
	if e.Rejected {
		return ErrRejected
	}
	return ErrUnenforceable
}
