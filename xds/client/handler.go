package client

import (
	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
)

// Handler validates and applies the resources of one type. The client
// calls it from one goroutine, in the order the responses arrive.
type Handler interface {
	// Apply takes one response of its type: the resources added or
	// updated, and the names removed (a name it does not hold is not an
	// error: istiod lists removals of names it never sent, e.g. services
	// on the Workload type). The client also calls it with removals only
	// when it unsubscribes from names, which forgets them as the delta
	// protocol says. Apply validates each resource on its own, applies
	// the good ones and the removals, and returns the rejected ones, each
	// naming its resource: their text is the NACK's. What becomes of a
	// rejected resource's earlier version is the handler's rule (the
	// workload API's keep it; the waypoint's drop it, failing closed).
	Apply(resources []*discoveryv3.Resource, removed []string) []*ResourceError
}

// Type is one resource type on the stream.
type Type struct {
	// URL is the type URL, both the request's and the resources' Any's.
	URL string
	// Handler applies the type's responses. Required.
	Handler Handler
	// Names, if not nil, makes the subscription named rather than
	// wildcard: the client subscribes to exactly the names it returns,
	// asking again after every response it handles, so that one type's
	// resources can name another's (Envoy subscribes to the endpoints of
	// the EDS clusters CDS lists). Until it returns a name, nothing of the
	// type is asked for: a first request without names would be a
	// wildcard (delta xDS's "legacy wildcard"). Resources of names not
	// subscribed (in flight across an unsubscribe) are ignored.
	Names func() []string
}

func (t Type) named() bool { return t.Names != nil }
