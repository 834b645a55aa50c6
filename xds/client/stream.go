package client

import (
	"context"
	"fmt"
	"maps"
	"slices"
	"strings"

	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	rpcstatus "google.golang.org/genproto/googleapis/rpc/status"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"

	"github.com/amber-mesh/amber/internal/logkey"
)

// maxResponseSize is the largest response accepted. A full push of a big
// mesh is far above gRPC's 4 MiB default; Istio's ztunnel allows 200 MiB.
const maxResponseSize = 200 << 20

// maxNACKDetail bounds the error_detail message of one NACK; a control
// plane sending thousands of bad resources gets the first ones by name and
// a count of the rest.
const maxNACKDetail = 4096

type adsStream = grpc.BidiStreamingClient[discoveryv3.DeltaDiscoveryRequest, discoveryv3.DeltaDiscoveryResponse]

// runStream runs one ADS stream until it fails or ctx is done. gotResponse
// reports whether the server answered at all, which resets the backoff.
func (c *Client) runStream(ctx context.Context) (gotResponse bool, err error) {
	conn := c.cfg.Conn
	if conn == nil {
		cc, err := c.cfg.Dial(ctx)
		if err != nil {
			return false, fmt.Errorf("dial: %w", err)
		}
		defer cc.Close()
		conn = cc
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	stream, err := discoveryv3.NewAggregatedDiscoveryServiceClient(conn).DeltaAggregatedResources(ctx, grpc.MaxCallRecvMsgSize(maxResponseSize))
	if err != nil {
		return false, fmt.Errorf("open stream: %w", err)
	}
	c.count(func(s *Stats) { s.Connects++ })
	c.setConnected(true)

	for _, sub := range c.types {
		sub.started, sub.names = false, nil
	}
	if err := c.subscribe(stream); err != nil {
		return false, err
	}
	return c.serve(stream)
}

// subscribe sends what the subscriptions need: each type's first request,
// and for named types the names that changed. A wildcard subscription is
// a first request with no names (delta xDS "legacy wildcard", what Istio's
// ztunnel and Envoy send); a named one lists its names. Both announce the
// names and versions already held, so that the server sends only what
// changed and tells what was deleted meanwhile.
func (c *Client) subscribe(stream adsStream) error {
	for _, sub := range c.types {
		var req *discoveryv3.DeltaDiscoveryRequest
		switch {
		case !sub.named():
			if sub.started {
				continue
			}
			req = &discoveryv3.DeltaDiscoveryRequest{InitialResourceVersions: maps.Clone(sub.known)}
		default:
			want := make(map[string]bool)
			for _, n := range sub.Names() {
				if n != "" && n != "*" {
					want[n] = true
				}
			}
			if !sub.started {
				// What an earlier stream held and is no longer named
				// goes; the first request names everything wanted.
				held := make(map[string]bool, len(sub.known))
				for n := range sub.known {
					held[n] = true
				}
				all, _ := nameDiff(want, nil)
				if _, gone := nameDiff(want, held); len(gone) > 0 {
					c.forget(sub, gone)
				}
				if len(all) == 0 {
					continue // no names yet: an empty first request would be a wildcard
				}
				initial := make(map[string]string)
				for _, n := range all {
					if v, ok := sub.known[n]; ok {
						initial[n] = v
					}
				}
				req = &discoveryv3.DeltaDiscoveryRequest{ResourceNamesSubscribe: all, InitialResourceVersions: initial}
			} else {
				added, removed := nameDiff(want, sub.names)
				if len(removed) > 0 {
					c.forget(sub, removed)
				}
				if len(added) == 0 && len(removed) == 0 {
					continue
				}
				req = &discoveryv3.DeltaDiscoveryRequest{ResourceNamesSubscribe: added, ResourceNamesUnsubscribe: removed}
			}
			sub.names = want
		}
		req.TypeUrl = sub.URL
		if !sub.started {
			req.Node = c.node
			sub.started = true
		}
		if err := stream.Send(req); err != nil {
			return fmt.Errorf("send subscription %s: %w", sub.URL, err)
		}
	}
	return nil
}

// forget drops resources the client no longer subscribes to: the server
// sends no removal for them (delta xDS: the client forgets what it
// unsubscribes from).
func (c *Client) forget(sub *subscription, names []string) {
	var held []string
	for _, n := range names {
		if _, ok := sub.known[n]; ok {
			held = append(held, n)
			delete(sub.known, n)
		}
	}
	if len(held) == 0 {
		return
	}
	if rejects := sub.Handler.Apply(nil, held); len(rejects) > 0 {
		c.log.Warn("xds handler refused after unsubscribing", logkey.TypeURL, sub.URL, logkey.Error, nackDetail(rejects))
	}
	c.clearRejected(sub.URL, held)
}

// nameDiff returns, sorted, the names in want but not in have and those in
// have but not in want.
func nameDiff(want, have map[string]bool) (added, removed []string) {
	for n := range want {
		if !have[n] {
			added = append(added, n)
		}
	}
	for n := range have {
		if !want[n] {
			removed = append(removed, n)
		}
	}
	slices.Sort(added)
	slices.Sort(removed)
	return added, removed
}

func (c *Client) serve(stream adsStream) (gotResponse bool, err error) {
	for {
		resp, err := stream.Recv()
		if err != nil {
			return gotResponse, fmt.Errorf("receive: %w", err)
		}
		gotResponse = true
		reply := c.handle(resp)
		if err := stream.Send(reply); err != nil {
			return gotResponse, fmt.Errorf("send ack: %w", err)
		}
		// After the ACK, as Envoy does: the response may name resources
		// of another type (CDS names EDS clusters).
		if err := c.subscribe(stream); err != nil {
			return gotResponse, err
		}
	}
}

// handle applies one response and returns its ACK, or its NACK naming every
// rejected resource. The good resources of a response apply even when some
// are rejected: one bad workload must not freeze the whole mesh view.
func (c *Client) handle(resp *discoveryv3.DeltaDiscoveryResponse) *discoveryv3.DeltaDiscoveryRequest {
	typeURL := resp.GetTypeUrl()
	var rejects []*ResourceError
	var applied, removed int
	sub := c.byURL[typeURL]
	if sub != nil {
		rejects, applied, removed = c.apply(sub, resp)
	} else {
		// Not something we asked for: reject it all rather than ACK state
		// we did not take.
		for _, r := range resp.GetResources() {
			rejects = append(rejects, &ResourceError{TypeURL: typeURL, Name: r.GetName(), Reason: ReasonUnknownType, Err: errUnknownType})
		}
		if len(rejects) == 0 {
			rejects = append(rejects, &ResourceError{TypeURL: typeURL, Reason: ReasonUnknownType, Err: errUnknownType})
		}
	}

	reply := &discoveryv3.DeltaDiscoveryRequest{TypeUrl: typeURL, ResponseNonce: resp.GetNonce()}
	c.mu.Lock()
	c.stats.Responses++
	c.stats.Applied += uint64(applied)
	c.stats.Removed += uint64(removed)
	ts := c.stats.Types[typeURL]
	ts.Responses++
	if len(rejects) == 0 {
		c.stats.ACKs++
		ts.ACKs++
	} else {
		c.stats.NACKs++
		ts.NACKs++
	}
	for _, r := range rejects {
		c.stats.Rejected[r.Reason]++
		if m := c.rejected[typeURL]; m != nil && r.Name != "" {
			m[r.Name] = Rejection{TypeURL: typeURL, Name: r.Name, Reason: r.Reason, Message: r.Err.Error()}
		}
	}
	if sub != nil {
		c.stats.Types[typeURL] = ts
	}
	c.mu.Unlock()

	if len(rejects) > 0 {
		reply.ErrorDetail = &rpcstatus.Status{Code: int32(codes.InvalidArgument), Message: nackDetail(rejects)}
		c.log.Error("xds NACK", logkey.TypeURL, typeURL, logkey.Nonce, resp.GetNonce(), logkey.Rejected, len(rejects), logkey.Error, reply.ErrorDetail.Message)
	} else {
		c.log.Debug("xds ACK", logkey.TypeURL, typeURL, logkey.Nonce, resp.GetNonce(), logkey.Resources, applied, logkey.Removed, removed)
	}
	if sub != nil {
		sub.answered = true
		c.checkSynced()
	}
	return reply
}

// apply hands a response to its type's handler and records what the
// client now holds.
func (c *Client) apply(sub *subscription, resp *discoveryv3.DeltaDiscoveryResponse) (rejects []*ResourceError, applied, removed int) {
	resources := resp.GetResources()
	if sub.named() {
		// A response crossing our unsubscribe may still carry names we
		// dropped; taking them would hold what nobody asked for.
		resources = slices.DeleteFunc(slices.Clone(resources), func(r *discoveryv3.Resource) bool { return !sub.names[r.GetName()] })
	}
	rejects = sub.Handler.Apply(resources, resp.GetRemovedResources())
	refused := make(map[string]bool, len(rejects))
	for _, r := range rejects {
		refused[r.Name] = true
	}
	for _, name := range resp.GetRemovedResources() {
		if _, ok := sub.known[name]; ok {
			delete(sub.known, name)
			removed++
		}
	}
	var good []string
	for _, r := range resources {
		switch name := r.GetName(); {
		case name == "":
		case refused[name]:
			sub.known[name] = ""
		default:
			sub.known[name] = r.GetVersion()
			good = append(good, name)
			applied++
		}
	}
	c.clearRejected(sub.URL, append(good, resp.GetRemovedResources()...))
	return rejects, applied, removed
}

// checkSynced closes Synced once every type that can be answered has been.
func (c *Client) checkSynced() {
	if c.isSynced {
		return
	}
	for _, sub := range c.types {
		if !sub.answered && (!sub.named() || len(sub.names) > 0) {
			return
		}
	}
	c.isSynced = true
	close(c.synced)
}

// clearRejected forgets earlier rejections of resources that are now
// applied or gone.
func (c *Client) clearRejected(typeURL string, names []string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	m := c.rejected[typeURL]
	for _, n := range names {
		delete(m, n)
	}
}

// nackDetail names each rejected resource and why, in the
// "name: reason; name: reason" form Istio's ztunnel uses.
func nackDetail(rejects []*ResourceError) string {
	var b strings.Builder
	for i, r := range rejects {
		part := r.Name + ": " + r.Err.Error()
		if i > 0 {
			part = "; " + part
		}
		if b.Len()+len(part) > maxNACKDetail {
			fmt.Fprintf(&b, "; and %d more", len(rejects)-i)
			break
		}
		b.WriteString(part)
	}
	return b.String()
}
