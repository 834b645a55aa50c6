// Package discovery holds the configuration istiod sends a waypoint over
// delta ADS (listeners, clusters, endpoints), compiles the whole set again
// on every change, NACKs what the compiler refuses, and names the endpoint
// subscriptions the clusters imply, as Envoy does.
package discovery

import (
	"cmp"
	"fmt"
	"maps"
	"slices"
	"sync"
	"time"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	endpointv3 "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	hcmv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"google.golang.org/protobuf/proto"

	"github.com/amber-mesh/amber/waypoint/config"
	"github.com/amber-mesh/amber/xds/client"
)

// Resource is one resource as held: the message istiod sent, its version
// and when it arrived.
type Resource[M proto.Message] struct {
	Message M
	Version string
	Updated time.Time
}

// Set is a waypoint's listeners, clusters and endpoints. Its Types are
// the subscriptions of an xds/client; every change is compiled with
// config.Compile and handed to the publish function given to New, from
// the client's goroutine, in order.
//
// A resource that cannot be decoded (or whose name is not its own) is
// NACKed and dropped, not kept in its earlier version: like what the
// compiler refuses (docs/waypoint.md, "The compiler"), what it configured
// then fails closed, since the version amber cannot read may forbid what
// the earlier one allowed.
type Set struct {
	publish func(*config.Config)
	now     func() time.Time
	// router: an ingress gateway's set (NewRouter).
	router bool

	mu        sync.Mutex // guards the fields below
	listeners map[string]Resource[*listenerv3.Listener]
	clusters  map[string]Resource[*clusterv3.Cluster]
	endpoints map[string]Resource[*endpointv3.ClusterLoadAssignment]
	routes    map[string]Resource[*routev3.RouteConfiguration]
	secrets   map[string]Resource[*tlsv3.Secret]
	edsNames  []string // sorted
	rdsNames  []string // sorted; a router's
	sdsNames  []string // sorted; a router's
	compiled  *config.Config
	compiles  uint64
	updates   map[string]Updates
}

// Updates counts the responses of one type the set took, as Envoy's
// update_success and update_rejected stats do (pilot-agent's readiness
// reads those): Success when every resource was taken, Rejected when the
// NACK named at least one.
type Updates struct {
	Success, Rejected uint64
}

// New returns an empty set whose compiled configurations go to publish.
// publish must not block for long: the xDS stream waits for it.
func New(publish func(*config.Config)) *Set {
	return &Set{
		publish:   publish,
		now:       time.Now,
		listeners: map[string]Resource[*listenerv3.Listener]{},
		clusters:  map[string]Resource[*clusterv3.Cluster]{},
		endpoints: map[string]Resource[*endpointv3.ClusterLoadAssignment]{},
		routes:    map[string]Resource[*routev3.RouteConfiguration]{},
		secrets:   map[string]Resource[*tlsv3.Secret]{},
		updates:   map[string]Updates{},
	}
}

// NewRouter returns an empty set of an ingress gateway (node type
// router): its listeners name route configurations, which it asks RDS
// for, and it asks EDS only for the clusters those routes send to (CDS
// holds every Service of the mesh).
func NewRouter(publish func(*config.Config)) *Set {
	s := New(publish)
	s.router = true
	return s
}

// Updates returns the response counts of typeURL.
func (s *Set) Updates(typeURL string) Updates {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.updates[typeURL]
}

// Types are the set's subscriptions, in the order Envoy sends them: CDS
// and LDS as wildcards, EDS by the names of the EDS clusters CDS holds.
func (s *Set) Types() []client.Type {
	types := []client.Type{
		{URL: config.ClusterType, Handler: handler[*clusterv3.Cluster]{s: s, typeURL: config.ClusterType, held: s.clusters, name: clusterName}},
		{URL: config.ListenerType, Handler: handler[*listenerv3.Listener]{s: s, typeURL: config.ListenerType, held: s.listeners, name: listenerName}},
	}
	if s.router {
		types = append(types,
			client.Type{URL: config.RouteType, Handler: handler[*routev3.RouteConfiguration]{s: s, typeURL: config.RouteType, held: s.routes, name: routeName}, Names: s.RDSNames},
			client.Type{URL: config.SecretType, Handler: handler[*tlsv3.Secret]{s: s, typeURL: config.SecretType, held: s.secrets, name: secretName}, Names: s.SDSNames})
	}
	return append(types, client.Type{URL: config.EndpointType, Handler: handler[*endpointv3.ClusterLoadAssignment]{s: s, typeURL: config.EndpointType, held: s.endpoints, name: endpointsName}, Names: s.EDSNames})
}

// Router reports whether s is an ingress gateway's set.
func (s *Set) Router() bool { return s.router }

// SDSNames are the Kubernetes Secrets a router's TLS listeners name.
func (s *Set) SDSNames() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return slices.Clone(s.sdsNames)
}

// RDSNames are the route configurations a router's listeners name.
func (s *Set) RDSNames() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return slices.Clone(s.rdsNames)
}

// EDSNames are the endpoint resources the clusters need: each EDS
// cluster's eds_cluster_config.service_name, else its name.
func (s *Set) EDSNames() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return slices.Clone(s.edsNames)
}

// EndpointsWarm reports whether every EDS cluster has its endpoints (an
// empty assignment counts): Envoy's cluster warming, which an Envoy's
// readiness waits for at start.
func (s *Set) EndpointsWarm() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, n := range s.edsNames {
		if _, ok := s.endpoints[n]; !ok {
			return false
		}
	}
	return true
}

// Snapshot is the set at one moment.
type Snapshot struct {
	// Listeners, Clusters and Endpoints are the held resources, sorted by
	// name.
	Listeners []Resource[*listenerv3.Listener]
	Clusters  []Resource[*clusterv3.Cluster]
	Endpoints []Resource[*endpointv3.ClusterLoadAssignment]
	// Routes are a router's route configurations.
	Routes []Resource[*routev3.RouteConfiguration]
	// Config is their compilation; nil before the first change.
	Config *config.Config
	// Compiles counts compilations.
	Compiles uint64
}

// Snapshot returns the held resources and their compilation.
func (s *Set) Snapshot() Snapshot {
	s.mu.Lock()
	defer s.mu.Unlock()
	return Snapshot{
		Listeners: sorted(s.listeners, listenerName),
		Clusters:  sorted(s.clusters, clusterName),
		Endpoints: sorted(s.endpoints, endpointsName),
		Routes:    sorted(s.routes, routeName),
		Config:    s.compiled,
		Compiles:  s.compiles,
	}
}

// The name of each type's resources: Envoy's resource names.
var (
	listenerName  = (*listenerv3.Listener).GetName
	clusterName   = (*clusterv3.Cluster).GetName
	endpointsName = (*endpointv3.ClusterLoadAssignment).GetClusterName
	routeName     = (*routev3.RouteConfiguration).GetName
	secretName    = (*tlsv3.Secret).GetName
)

func sorted[M proto.Message](m map[string]Resource[M], name func(M) string) []Resource[M] {
	out := slices.Collect(maps.Values(m))
	slices.SortFunc(out, func(a, b Resource[M]) int { return cmp.Compare(name(a.Message), name(b.Message)) })
	return out
}

func messages[M proto.Message](rs []Resource[M]) []M {
	out := make([]M, len(rs))
	for i, r := range rs {
		out[i] = r.Message
	}
	return out
}

// handler is one type's client.Handler.
type handler[M proto.Message] struct {
	s       *Set
	typeURL string
	held    map[string]Resource[M] // guarded by s.mu
	name    func(M) string
}

// Apply decodes each resource, applies the response to the set, compiles
// the whole set and returns the decode failures and the compiler's
// problems of this type: the NACK (config.Config.Err of the type).
func (h handler[M]) Apply(resources []*discoveryv3.Resource, removed []string) []*client.ResourceError {
	var rejects []*client.ResourceError
	s := h.s
	s.mu.Lock()
	held := h.held
	changed := false
	now := s.now()
	for _, r := range resources {
		var zero M
		m := zero.ProtoReflect().New().Interface().(M)
		rerr := client.Decode(h.typeURL, r, m)
		if rerr == nil && h.name(m) != r.GetName() {
			rerr = &client.ResourceError{TypeURL: h.typeURL, Name: r.GetName(), Reason: client.ReasonNameMismatch, Err: fmt.Errorf("the resource is named %q", h.name(m))}
		}
		if rerr != nil {
			rejects = append(rejects, rerr)
			if _, ok := held[r.GetName()]; ok {
				delete(held, r.GetName())
				changed = true
			}
			continue
		}
		held[r.GetName()] = Resource[M]{Message: m, Version: r.GetVersion(), Updated: now}
		changed = true
	}
	for _, n := range removed {
		if _, ok := held[n]; ok {
			delete(held, n)
			changed = true
		}
	}
	if !changed {
		s.countLocked(h.typeURL, rejects)
		s.mu.Unlock()
		return rejects
	}
	if s.router && h.typeURL == config.ListenerType {
		s.followListeners()
	}
	if h.typeURL == config.ClusterType || (s.router && h.typeURL != config.EndpointType) {
		s.followClusters()
	}
	cfg := config.Compile(config.Resources{
		Listeners: messages(sorted(s.listeners, listenerName)),
		Clusters:  messages(sorted(s.clusters, clusterName)),
		Endpoints: messages(sorted(s.endpoints, endpointsName)),
		Routes:    messages(sorted(s.routes, routeName)),
		Secrets:   messages(sorted(s.secrets, secretName)),
		Router:    s.router,
	})
	for _, p := range cfg.Problems {
		if p.TypeURL == h.typeURL {
			rejects = append(rejects, &client.ResourceError{TypeURL: h.typeURL, Name: p.Resource, Reason: client.ReasonRefused, Err: p.Err})
		}
	}
	s.compiled = cfg
	s.compiles++
	s.countLocked(h.typeURL, rejects)
	s.mu.Unlock()

	if s.publish != nil {
		s.publish(cfg)
	}
	return rejects
}

// countLocked counts one Apply of typeURL: a response, or the client
// forgetting EDS names it unsubscribed from.
func (s *Set) countLocked(typeURL string, rejects []*client.ResourceError) {
	u := s.updates[typeURL]
	if len(rejects) == 0 {
		u.Success++
	} else {
		u.Rejected++
	}
	s.updates[typeURL] = u
}

// followClusters recomputes the EDS names after a CDS change and drops
// the endpoints no cluster names any more (the client unsubscribes from
// them next; dropping them now keeps the compiler from seeing endpoints
// of a cluster that is gone). Called with s.mu held.
func (s *Set) followClusters() {
	names := map[string]bool{}
	var routed map[string]bool
	if s.router {
		routed = s.routedClusters()
	}
	for name, c := range s.clusters {
		if c.Message.GetType() != clusterv3.Cluster_EDS || (routed != nil && !routed[name]) {
			continue
		}
		if sn := c.Message.GetEdsClusterConfig().GetServiceName(); sn != "" {
			name = sn
		}
		names[name] = true
	}
	s.edsNames = slices.Sorted(maps.Keys(names))
	for n := range s.endpoints {
		if !names[n] {
			delete(s.endpoints, n)
		}
	}
}

// routedClusters names the clusters a router's route configurations send
// to. Called with s.mu held.
func (s *Set) routedClusters() map[string]bool {
	out := map[string]bool{}
	for _, r := range s.routes {
		for _, vh := range r.Message.GetVirtualHosts() {
			for _, rt := range vh.GetRoutes() {
				if c := rt.GetRoute().GetCluster(); c != "" {
					out[c] = true
				}
				for _, wc := range rt.GetRoute().GetWeightedClusters().GetClusters() {
					out[wc.GetName()] = true
				}
			}
		}
	}
	return out
}

// followListeners recomputes a router's RDS and SDS names after an LDS
// change and drops the route configurations and secrets no listener names
// any more. Called with
// s.mu held.
func (s *Set) followListeners() {
	names, secrets := map[string]bool{}, map[string]bool{}
	for _, l := range s.listeners {
		for _, fc := range l.Message.GetFilterChains() {
			d := &tlsv3.DownstreamTlsContext{}
			if ts := fc.GetTransportSocket(); ts != nil && ts.GetTypedConfig().MessageIs(d) && ts.GetTypedConfig().UnmarshalTo(d) == nil {
				for _, sc := range d.GetCommonTlsContext().GetTlsCertificateSdsSecretConfigs() {
					if sc.GetSdsConfig().GetAds() != nil {
						secrets[sc.GetName()] = true
					}
				}
			}
			for _, f := range fc.GetFilters() {
				h := &hcmv3.HttpConnectionManager{}
				if !f.GetTypedConfig().MessageIs(h) || f.GetTypedConfig().UnmarshalTo(h) != nil {
					continue // the compiler reports it
				}
				if n := h.GetRds().GetRouteConfigName(); n != "" {
					names[n] = true
				}
			}
		}
	}
	s.rdsNames = slices.Sorted(maps.Keys(names))
	for n := range s.routes {
		if !names[n] {
			delete(s.routes, n)
		}
	}
	s.sdsNames = slices.Sorted(maps.Keys(secrets))
	for n := range s.secrets {
		if !secrets[n] {
			delete(s.secrets, n)
		}
	}
}
