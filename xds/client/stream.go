package client

import (
	"context"
	"fmt"
	"maps"
	"strings"

	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	rpcstatus "google.golang.org/genproto/googleapis/rpc/status"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"

	"github.com/amber-mesh/amber/internal/logkey"
	"github.com/amber-mesh/amber/xds/workloadapi"
)

// maxResponseSize is the largest response accepted. A full push of a big
// mesh is far above gRPC's 4 MiB default; Istio's ztunnel allows 200 MiB.
const maxResponseSize = 200 << 20

// maxNACKDetail bounds the error_detail message of one NACK; a control
// plane sending thousands of bad resources gets the first ones by name and
// a count of the rest.
const maxNACKDetail = 4096

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

	// A wildcard subscription is an initial request with no resource names
	// (delta xDS "legacy wildcard", what Istio's ztunnel sends). The names
	// and versions we already hold let the server send only what changed
	// and tell us what was deleted while we were away.
	for _, typeURL := range subscribedTypes {
		req := &discoveryv3.DeltaDiscoveryRequest{
			Node:                    c.node,
			TypeUrl:                 typeURL,
			InitialResourceVersions: maps.Clone(c.known[typeURL]),
		}
		if err := stream.Send(req); err != nil {
			return false, fmt.Errorf("send subscription %s: %w", typeURL, err)
		}
	}
	return c.serve(stream)
}

func (c *Client) serve(stream grpc.BidiStreamingClient[discoveryv3.DeltaDiscoveryRequest, discoveryv3.DeltaDiscoveryResponse]) (gotResponse bool, err error) {
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
	}
}

// handle applies one response and returns its ACK, or its NACK naming every
// rejected resource. The good resources of a response apply even when some
// are rejected: one bad workload must not freeze the whole mesh view.
func (c *Client) handle(resp *discoveryv3.DeltaDiscoveryResponse) *discoveryv3.DeltaDiscoveryRequest {
	typeURL := resp.GetTypeUrl()
	var rejects []*ResourceError
	var applied, removed int
	switch typeURL {
	case workloadapi.AddressTypeURL:
		rejects, applied, removed = c.applyAddresses(resp)
	case workloadapi.AuthorizationTypeURL:
		rejects, applied, removed = c.applyAuthorizations(resp)
	default:
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
	if len(rejects) == 0 {
		c.stats.ACKs++
	} else {
		c.stats.NACKs++
	}
	for _, r := range rejects {
		c.stats.Rejected[r.Reason]++
		if m := c.rejected[typeURL]; m != nil {
			m[r.Name] = Rejection{TypeURL: typeURL, Name: r.Name, Reason: r.Reason, Message: r.Err.Error()}
		}
	}
	c.mu.Unlock()

	if len(rejects) > 0 {
		reply.ErrorDetail = &rpcstatus.Status{Code: int32(codes.InvalidArgument), Message: nackDetail(rejects)}
		c.log.Error("xds NACK", logkey.TypeURL, typeURL, logkey.Nonce, resp.GetNonce(), logkey.Rejected, len(rejects), logkey.Error, reply.ErrorDetail.Message)
	} else {
		c.log.Debug("xds ACK", logkey.TypeURL, typeURL, logkey.Nonce, resp.GetNonce(), logkey.Resources, applied, logkey.Removed, removed)
	}
	if _, ok := c.known[typeURL]; ok && !c.syncedSeen[typeURL] {
		c.syncedSeen[typeURL] = true
		if len(c.syncedSeen) == len(subscribedTypes) {
			close(c.synced)
		}
	}
	return reply
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
