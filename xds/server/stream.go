package server

import (
	"cmp"
	"context"
	"errors"
	"io"
	"maps"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/amber-mesh/amber/internal/logkey"
)

type deltaStream = grpc.BidiStreamingServer[discoveryv3.DeltaDiscoveryRequest, discoveryv3.DeltaDiscoveryResponse]

// ads adapts Server to the generated service interface without putting
// the gRPC methods into Server's API.
type ads struct {
	discoveryv3.UnimplementedAggregatedDiscoveryServiceServer
	s *Server
}

func (a ads) DeltaAggregatedResources(st deltaStream) error {
	return a.s.serveStream(st)
}

// ClientStatus is what the server knows about one connected client, like
// istiod's sync status: which pushes it has acknowledged or rejected.
type ClientStatus struct {
	// NodeID is the node id of the client's first request.
	NodeID    string
	Connected time.Time
	// Types is keyed by type URL.
	Types map[string]TypeStatus
}

// TypeStatus is the sync state of one type on one stream.
type TypeStatus struct {
	// InitialResources is how many names the client announced in
	// initial_resource_versions when it subscribed.
	InitialResources int
	// Responses counts responses sent; SentNonce is the latest one's nonce.
	Responses uint64
	SentNonce string
	// AckedNonce is the nonce of the latest ACKed response.
	AckedNonce string
	// NACKedNonce and NACK are the nonce and error_detail message of the
	// latest NACK.
	NACKedNonce string
	NACK        string
	ACKs, NACKs uint64
	// Resources is how many resources the client holds as far as the
	// server knows.
	Resources int
}

// Clients returns the status of every connected client, by node id.
func (s *Server) Clients() []ClientStatus {
	s.mu.Lock()
	streams := slices.Collect(maps.Keys(s.streams))
	s.mu.Unlock()
	out := make([]ClientStatus, 0, len(streams))
	for _, st := range streams {
		st.mu.Lock()
		cs := ClientStatus{NodeID: st.nodeID, Connected: st.connected, Types: make(map[string]TypeStatus, len(st.subs))}
		for t, sub := range st.subs {
			ts := sub.status
			ts.Resources = len(sub.known)
			cs.Types[t] = ts
		}
		st.mu.Unlock()
		out = append(out, cs)
	}
	slices.SortFunc(out, func(a, b ClientStatus) int {
		return cmp.Or(strings.Compare(a.NodeID, b.NodeID), a.Connected.Compare(b.Connected))
	})
	return out
}

// stream is one client's ADS stream.
type stream struct {
	connected time.Time

	mu     sync.Mutex // guards the fields below
	nodeID string
	subs   map[string]*subscription
}

// subscription is one type on one stream, as the delta protocol defines
// it: the names asked for and the versions the client holds.
type subscription struct {
	wildcard bool
	names    map[string]bool
	known    map[string]string
	// answer is set when the client is owed a response even if nothing
	// changed: the first request of a type is always answered, so the
	// client knows when it has the initial state.
	answer bool
	status TypeStatus
}

func (sub *subscription) wants(name string) bool { return sub.wildcard || sub.names[name] }

func (s *Server) serveStream(st deltaStream) error {
	ctx, cancel := context.WithCancel(st.Context())
	defer cancel()
	str := &stream{connected: time.Now(), subs: make(map[string]*subscription)}
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return status.Error(codes.Unavailable, "server closed")
	}
	s.streams[str] = struct{}{}
	s.mu.Unlock()
	defer func() {
		s.mu.Lock()
		delete(s.streams, str)
		s.mu.Unlock()
	}()

	reqs := make(chan *discoveryv3.DeltaDiscoveryRequest)
	errc := make(chan error, 1)
	go receiveRequests(ctx, st, reqs, errc)
	for {
		s.mu.Lock()
		changed := s.changed
		s.mu.Unlock()
		// Read changed before diffing: a change after this point closes
		// it and the loop diffs again, so no push is lost.
		if err := s.push(str, st); err != nil {
			return err
		}
		select {
		case req := <-reqs:
			s.handleRequest(str, req)
		case <-changed:
		case err := <-errc:
			if errors.Is(err, io.EOF) {
				return nil
			}
			return err
		case <-ctx.Done():
			return ctx.Err()
		case <-s.done:
			return status.Error(codes.Unavailable, "server closed")
		}
	}
}

// receiveRequests feeds the stream's requests to its serving goroutine.
func receiveRequests(ctx context.Context, st deltaStream, reqs chan<- *discoveryv3.DeltaDiscoveryRequest, errc chan<- error) {
	for {
		req, err := st.Recv()
		if err != nil {
			errc <- err
			return
		}
		select {
		case reqs <- req:
		case <-ctx.Done():
			return
		}
	}
}

func (s *Server) handleRequest(str *stream, req *discoveryv3.DeltaDiscoveryRequest) {
	typeURL := req.GetTypeUrl()
	str.mu.Lock()
	defer str.mu.Unlock()
	if str.nodeID == "" && req.GetNode() != nil {
		str.nodeID = req.GetNode().GetId()
	}
	if typeURL == "" {
		s.log.Warn("xds request without type_url", logkey.Node, str.nodeID)
		return
	}
	sub := str.subs[typeURL]
	if sub == nil {
		// First request of a type: no names means wildcard (the legacy
		// form Istio's ztunnel uses); initial_resource_versions tells what
		// the client already holds from an earlier stream.
		sub = &subscription{
			wildcard: len(req.GetResourceNamesSubscribe()) == 0,
			names:    make(map[string]bool),
			known:    maps.Clone(req.GetInitialResourceVersions()),
			answer:   true,
		}
		if sub.known == nil {
			sub.known = make(map[string]string)
		}
		sub.status.InitialResources = len(sub.known)
		str.subs[typeURL] = sub
		s.log.Info("xds subscribe", logkey.Node, str.nodeID, logkey.TypeURL, typeURL, logkey.InitialResources, len(sub.known))
	}
	for _, n := range req.GetResourceNamesSubscribe() {
		if n == "*" {
			sub.wildcard = true
		} else {
			sub.names[n] = true
		}
	}
	for _, n := range req.GetResourceNamesUnsubscribe() {
		if n == "*" {
			sub.wildcard = false
		} else {
			delete(sub.names, n)
		}
	}
	// A client forgets what it unsubscribes from; so do we, so that a
	// later subscribe sends it again.
	for n := range sub.known {
		if !sub.wants(n) {
			delete(sub.known, n)
		}
	}
	if nonce := req.GetResponseNonce(); nonce != "" {
		if d := req.GetErrorDetail(); d != nil {
			sub.status.NACKs++
			sub.status.NACKedNonce = nonce
			sub.status.NACK = d.GetMessage()
			s.log.Warn("xds NACK", logkey.Node, str.nodeID, logkey.TypeURL, typeURL, logkey.Nonce, nonce, logkey.Error, d.GetMessage())
		} else {
			sub.status.ACKs++
			sub.status.AckedNonce = nonce
		}
	}
}

// push sends each subscribed type's difference between what the server
// has and what the client holds. Authorization sorts before Address, so a
// fresh client gets policies before the workloads that name them.
func (s *Server) push(str *stream, st deltaStream) error {
	str.mu.Lock()
	types := slices.Sorted(maps.Keys(str.subs))
	str.mu.Unlock()
	for _, typeURL := range types {
		resp := s.diff(str, typeURL)
		if resp == nil {
			continue
		}
		if err := st.Send(resp); err != nil {
			return err
		}
	}
	return nil
}

// diff builds the next response for one type, or nil if none is due, and
// records its contents as held by the client. Resources a client NACKs
// stay recorded: like istiod, the server resends only on the next change.
func (s *Server) diff(str *stream, typeURL string) *discoveryv3.DeltaDiscoveryResponse {
	str.mu.Lock()
	defer str.mu.Unlock()
	sub := str.subs[typeURL]
	s.mu.Lock()
	have := s.resources[typeURL]
	version := s.version
	resp := &discoveryv3.DeltaDiscoveryResponse{TypeUrl: typeURL}
	for name, r := range have {
		if !sub.wants(name) {
			continue
		}
		if v, ok := sub.known[name]; ok && v == r.version {
			continue
		}
		resp.Resources = append(resp.Resources, &discoveryv3.Resource{Name: name, Version: r.version, Resource: r.body})
		sub.known[name] = r.version
	}
	for name := range sub.known {
		if _, ok := have[name]; !ok {
			resp.RemovedResources = append(resp.RemovedResources, name)
			delete(sub.known, name)
		}
	}
	s.mu.Unlock()
	if len(resp.Resources) == 0 && len(resp.RemovedResources) == 0 && !sub.answer {
		return nil
	}
	sub.answer = false
	slices.SortFunc(resp.Resources, func(a, b *discoveryv3.Resource) int { return strings.Compare(a.Name, b.Name) })
	slices.Sort(resp.RemovedResources)
	resp.SystemVersionInfo = strconv.FormatUint(version, 10)
	resp.Nonce = strconv.FormatUint(s.nonce.Add(1), 10)
	sub.status.Responses++
	sub.status.SentNonce = resp.Nonce
	return resp
}
