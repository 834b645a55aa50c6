package route

import (
	"fmt"
	"slices"
	"strings"
	"time"

	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
)

// Retry conditions of retry_on that the data path can observe (Envoy's
// x-envoy-retry-on and x-envoy-retry-grpc-on values).
var retryConditions = []string{
	"5xx", "gateway-error", "reset", "reset-before-request", "connect-failure",
	"retriable-4xx", "refused-stream", "retriable-status-codes",
	"cancelled", "deadline-exceeded", "internal", "resource-exhausted", "unavailable",
}

// DefaultRetryBackOff is Envoy's back-off when retry_back_off is unset:
// base 25 ms, maximum ten times the base.
const DefaultRetryBackOff = 25 * time.Millisecond

// RetryPolicy is a compiled envoy.config.route.v3.RetryPolicy. istiod's
// default for waypoints (pilot/pkg/networking/core/route/retry/retry.go
// DefaultPolicy) is 2 retries on connect-failure, refused-stream,
// unavailable, cancelled and retriable-status-codes, on another host
// (previous_hosts, 5 host selection attempts). That policy lists no status
// codes: Envoy would take them from a client's
// x-envoy-retriable-status-codes header; amber honours no x-envoy-*
// request header, so only the policy's own codes count.
type RetryPolicy struct {
	// On are the retry_on conditions.
	On []string
	// NumRetries is the number of retries (Envoy's default 1 when unset).
	NumRetries uint32
	// PerTryTimeout and PerTryIdleTimeout bound each attempt; zero: the
	// route's timeout only.
	PerTryTimeout, PerTryIdleTimeout time.Duration
	// RetriableStatusCodes are the codes retriable-status-codes retries.
	RetriableStatusCodes []uint32
	// PreviousHosts avoids hosts already tried (retry_host_predicate
	// envoy.retry_host_predicates.previous_hosts), trying up to
	// HostSelectionAttempts times to find another.
	PreviousHosts         bool
	HostSelectionAttempts int64
	// BackOffBase and BackOffMax are the exponential back-off's bounds.
	BackOffBase, BackOffMax time.Duration
}

func newRetryPolicy(p *routev3.RetryPolicy) (*RetryPolicy, error) {
	r := &RetryPolicy{NumRetries: 1, HostSelectionAttempts: p.GetHostSelectionRetryMaxAttempts(),
		BackOffBase: DefaultRetryBackOff, BackOffMax: 10 * DefaultRetryBackOff}
	for _, c := range strings.Split(p.GetRetryOn(), ",") {
		c = strings.TrimSpace(c)
		if c == "" {
			continue
		}
		if !slices.Contains(retryConditions, c) {
			return nil, fmt.Errorf("retry_on %q: %w", c, ErrUnsupported)
		}
		r.On = append(r.On, c)
	}
	if n := p.GetNumRetries(); n != nil {
		r.NumRetries = n.GetValue()
	}
	r.PerTryTimeout = p.GetPerTryTimeout().AsDuration()
	r.PerTryIdleTimeout = p.GetPerTryIdleTimeout().AsDuration()
	r.RetriableStatusCodes = p.GetRetriableStatusCodes()
	for i, hp := range p.GetRetryHostPredicate() {
		if hp.GetName() != "envoy.retry_host_predicates.previous_hosts" {
			return nil, fmt.Errorf("retry_host_predicate[%d] %s: %w", i, hp.GetName(), ErrUnsupported)
		}
		r.PreviousHosts = true
	}
	if b := p.GetRetryBackOff(); b != nil {
		r.BackOffBase = b.GetBaseInterval().AsDuration()
		r.BackOffMax = 10 * r.BackOffBase
		if b.GetMaxInterval() != nil {
			r.BackOffMax = b.GetMaxInterval().AsDuration()
		}
	}
	switch {
	case p.GetRetryPriority() != nil:
		return nil, fmt.Errorf("retry_priority: %w", ErrUnsupported)
	case len(p.GetRetryOptionsPredicates()) > 0:
		return nil, fmt.Errorf("retry_options_predicates: %w", ErrUnsupported)
	case p.GetRateLimitedRetryBackOff() != nil:
		return nil, fmt.Errorf("rate_limited_retry_back_off: %w", ErrUnsupported)
	case len(p.GetRetriableHeaders()) > 0 || len(p.GetRetriableRequestHeaders()) > 0:
		return nil, fmt.Errorf("retriable_headers, retriable_request_headers: %w", ErrUnsupported)
	}
	return r, nil
}

// Outcome is how an upstream attempt ended, as far as retry conditions
// care.
type Outcome struct {
	// ConnectFailure: no connection to the upstream host.
	ConnectFailure bool
	// RefusedStream: the upstream refused the stream (HTTP/2 REFUSED_STREAM).
	RefusedStream bool
	// Reset: the upstream reset or closed before a response, or the
	// per-try timeout fired; RequestSent says whether the request had been
	// sent then.
	Reset, RequestSent bool
	// Status is the response's status, zero without a response.
	Status int
	// GRPCStatus is the response's grpc-status, "" without one.
	GRPCStatus string
}

// Retriable reports whether o meets one of the policy's conditions
// (Envoy router/retry_state_impl.cc wouldRetryFromHeaders/FromReset).
func (p *RetryPolicy) Retriable(o Outcome) bool {
	if p == nil {
		return false
	}
	noResponse := o.ConnectFailure || o.RefusedStream || o.Reset
	for _, c := range p.On {
		switch c {
		case "5xx":
			if noResponse || o.Status >= 500 {
				return true
			}
		case "gateway-error":
			// A reset counts as the 503 it becomes, as with 5xx
			// (wouldRetryFromReset).
			if noResponse || o.Status == 502 || o.Status == 503 || o.Status == 504 {
				return true
			}
		case "reset":
			if noResponse {
				return true
			}
		case "reset-before-request":
			if noResponse && !o.RequestSent {
				return true
			}
		case "connect-failure":
			if o.ConnectFailure {
				return true
			}
		case "refused-stream":
			if o.RefusedStream {
				return true
			}
		case "retriable-4xx":
			if o.Status == 409 {
				return true
			}
		case "retriable-status-codes":
			if o.Status != 0 && slices.Contains(p.RetriableStatusCodes, uint32(o.Status)) {
				return true
			}
		case "cancelled", "deadline-exceeded", "internal", "resource-exhausted", "unavailable":
			if o.GRPCStatus != "" && grpcCodes[c] == o.GRPCStatus {
				return true
			}
		}
	}
	return false
}

var grpcCodes = map[string]string{
	"cancelled": "1", "deadline-exceeded": "4", "resource-exhausted": "8", "internal": "13", "unavailable": "14",
}
