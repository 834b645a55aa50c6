package proxy

import (
	"errors"

	"github.com/amber-mesh/amber/tunnel/authz"
)

// Why a connection was refused or ended early; the access log's "error"
// field carries these texts.
var (
	errUnknownSource = errors.New("source address is not a local workload")
	errUnknownDest   = errors.New("destination address is not a local workload")
	errNoEndpoint    = errors.New("service has no usable endpoint")
	errWaypoint      = errors.New("waypoint cannot be resolved")
	errReservedPort  = errors.New("destination port is reserved for the ztunnel")
	errBadTarget     = errors.New("destination address may not be tunnelled to")
	errAuthority     = errors.New("CONNECT authority does not match the connection's destination")
	errDestRemoved   = errors.New("destination workload removed")
	// errCancelled: the client reset its CONNECT stream (or its HBONE
	// connection ended) before the answer. Nothing failed upstream.
	errCancelled = errors.New("client cancelled the CONNECT before it was answered")
)

// DeniedError is an authorization decision that refused a connection.
type DeniedError struct {
	Decision authz.Decision
	// Revoked is true when the connection was allowed when it started and
	// a later policy change closed it.
	Revoked bool
}

func (e *DeniedError) Error() string {
	if e.Revoked {
		return "connection revoked by policy change: " + e.Decision.String()
	}
	return "connection denied by policy: " + e.Decision.String()
}
