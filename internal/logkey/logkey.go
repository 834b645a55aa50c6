// Package logkey holds the slog attribute keys of amber's processes (the
// agent, the ztunnel and the xDS packages), so that a field has one
// spelling in every line an operator searches: "error", never "err".
package logkey

// Keys used across packages.
const (
	Error    = "error"    // the error that caused the line
	Listener = "listener" // a data-plane listener's name or address
	Node     = "node"     // a node name or an xDS node id
	Reason   = "reason"
	Remote   = "remote" // a connection's peer address
	TypeURL  = "type_url"
	Nonce    = "nonce"
)

// Keys of one package's lines, here so that they stay distinct.
const (
	Addresses        = "addresses"      // xds/server: resources loaded
	Authorizations   = "authorizations" // xds/server: resources loaded
	Backoff          = "backoff"
	Errno            = "errno"
	FailedAccepts    = "failed_accepts"
	File             = "file"
	For              = "for" // how long a condition lasted
	Identity         = "identity"
	InitialResources = "initial_resources"
	NotAfter         = "not_after"
	Panic            = "panic"
	PinRoot          = "pin_root"
	Rejected         = "rejected"
	Removed          = "removed"
	Resources        = "resources"
	RetryIn          = "retry_in"
	Stack            = "stack"
	Status           = "status"
	Stream           = "stream"
	Took             = "took"
	Warning          = "warning"
)
