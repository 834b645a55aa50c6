package authz

import (
	"errors"
	"fmt"
)

var (
	// ErrUnenforceable is wrapped by every PolicyError.
	ErrUnenforceable = errors.New("policy cannot be enforced at L4")
)

// PolicyError reports a policy that is kept but enforced fail-closed
// because part of it cannot be evaluated: the data plane keeps denying what
// the policy could deny.
type PolicyError struct {
	Key    string // "namespace/name"
	Reason string // what could not be evaluated
}

func (e *PolicyError) Error() string {
	return fmt.Sprintf("upsert policy %s: %s: %v (enforced fail-closed)", e.Key, e.Reason, ErrUnenforceable)
}

func (e *PolicyError) Unwrap() error { return ErrUnenforceable }
