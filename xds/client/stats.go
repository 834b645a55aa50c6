package client

import (
	"cmp"
	"maps"
	"slices"
	"strings"
)

// Stats are the client's counters, for metrics and the admin endpoint.
type Stats struct {
	// Connected is true while a stream is open.
	Connected bool
	// Connects counts streams opened.
	Connects uint64
	// Reconnects counts stream attempts after the first.
	Reconnects uint64
	// Disconnects counts streams that failed to open or ended.
	Disconnects uint64
	// Responses counts responses received.
	Responses uint64
	// Applied counts resources added or updated.
	Applied uint64
	// Removed counts resources removed.
	Removed uint64
	// ACKs and NACKs count replies; a NACK names every rejected resource
	// of its response.
	ACKs  uint64
	NACKs uint64
	// Rejected counts rejected resources by reason.
	Rejected map[Reason]uint64
	// Rejections lists the resources whose latest version was rejected and
	// not since replaced or removed, ordered by type and name. What a
	// handler holds for them is its rule (the workload API's keep the
	// previous good version).
	Rejections []Rejection
	// Types has the counters of each subscribed type that was answered,
	// by type URL.
	Types map[string]TypeStats
}

// Counters are the stream's event counters by name (connects,
// disconnects, responses, acks, nacks), for a labelled metric family.
func (s Stats) Counters() map[string]uint64 {
	return map[string]uint64{"connects": s.Connects, "disconnects": s.Disconnects, "responses": s.Responses, "acks": s.ACKs, "nacks": s.NACKs}
}

// TypeStats are one type's counters.
type TypeStats struct {
	// Responses counts the type's responses; ACKs and NACKs the replies.
	// An ACK means every resource of its response was taken (Envoy's
	// update_success), a NACK that at least one was refused.
	Responses, ACKs, NACKs uint64
}

// Rejection is a resource whose latest version the client refused.
type Rejection struct {
	TypeURL string
	Name    string
	Reason  Reason
	Message string
}

// Stats returns a copy of the counters.
func (c *Client) Stats() Stats {
	c.mu.Lock()
	defer c.mu.Unlock()
	s := c.stats
	s.Connected = c.connected
	s.Rejected = maps.Clone(c.stats.Rejected)
	s.Types = maps.Clone(c.stats.Types)
	s.Rejections = nil
	for _, m := range c.rejected {
		for _, r := range m {
			s.Rejections = append(s.Rejections, r)
		}
	}
	slices.SortFunc(s.Rejections, func(a, b Rejection) int {
		return cmp.Or(strings.Compare(a.TypeURL, b.TypeURL), strings.Compare(a.Name, b.Name))
	})
	return s
}
