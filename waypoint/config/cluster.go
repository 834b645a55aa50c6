package config

import (
	"errors"
	"fmt"
	"net/netip"
	"strconv"
	"strings"
	"time"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	endpointv3 "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	internalv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/internal_upstream/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	httpv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/upstreams/http/v3"
)

// LBPolicy is a cluster's load-balancing policy.
type LBPolicy uint8

const (
	// LeastRequest picks the endpoint with fewer active requests among
	// ChoiceCount random ones (Envoy's default 2): Istio's default.
	LeastRequest LBPolicy = iota + 1
	RoundRobin
	Random
)

func (p LBPolicy) String() string {
	switch p {
	case LeastRequest:
		return "LEAST_REQUEST"
	case RoundRobin:
		return "ROUND_ROBIN"
	case Random:
		return "RANDOM"
	}
	return "LBPolicy(" + strconv.Itoa(int(p)) + ")"
}

// UpstreamProtocol is the HTTP version spoken to the endpoints.
type UpstreamProtocol uint8

const (
	// UpstreamAsDownstream speaks the client's version (istiod's default
	// for waypoints: "waypoint-auto-http2").
	UpstreamAsDownstream UpstreamProtocol = iota
	UpstreamHTTP1
	UpstreamHTTP2
)

// Cluster is one upstream service cluster: inbound-vip|<port>|<proto>[/<subset>]|<host>
// for services this waypoint serves, outbound|<port>|<subset>|<host> for
// others a route sends to.
type Cluster struct {
	Name string
	// Err is why the cluster was refused; requests routed to it get 503.
	Err error
	// Service, Port and Subset come from the name; Subset is "" or the
	// DestinationRule subset.
	Service string
	Port    uint16
	Subset  string
	// LB is the load-balancing policy; ChoiceCount is least request's.
	LB          LBPolicy
	ChoiceCount uint32
	// ConnectTimeout bounds connecting to an endpoint (HBONE included).
	ConnectTimeout time.Duration
	// Limits are the circuit breakers of the default priority.
	Limits Limits
	// MaxRequestsPerConnection closes an upstream connection after that
	// many requests; zero: unlimited.
	MaxRequestsPerConnection uint32
	// IdleTimeout closes idle upstream connections (Envoy: 1 h);
	// MaxConnectionDuration bounds them (zero: none).
	IdleTimeout, MaxConnectionDuration time.Duration
	// Protocol is the HTTP version to the endpoints.
	Protocol UpstreamProtocol
	// Endpoints come from EDS; nil until they arrive (then every request
	// gets 503 no healthy upstream).
	Endpoints []Endpoint
	// ServiceMeta is the istio metadata's first service: what telemetry
	// reports as destination_service.
	ServiceMeta ServiceMeta
	// SidecarMTLS is set on a gateway's cluster whose transport socket
	// matches send endpoints labelled tlsMode=istio (sidecar pods) in
	// Istio's legacy mTLS, which amber does not speak: those endpoints
	// are refused (Endpoint.Err) rather than reached in plain text.
	SidecarMTLS bool
}

// Limits are the circuit-breaker thresholds of the default priority.
// Unset ones take Envoy's defaults (1024 connections, pending and active
// requests, 3 concurrent retries); istiod sets all four to 2^32-1 unless
// a DestinationRule says otherwise.
type Limits struct {
	MaxConnections, MaxPendingRequests, MaxRequests, MaxRetries uint32
}

// ServiceMeta is one entry of the istio cluster metadata's services.
type ServiceMeta struct {
	Host, Name, Namespace string
}

// Endpoint is one EDS endpoint.
type Endpoint struct {
	// Address is the workload's address and port: the inner CONNECT's
	// :authority and where the app connection goes.
	Address netip.AddrPort
	// HBONE is true for endpoints istiod routes through connect_originate
	// (mesh workloads): the data path opens HBONE to Address's IP on
	// Originate.Port. False for endpoints outside the mesh, which Envoy
	// reaches in plain TCP (no mTLS, as istiod configures it).
	HBONE bool
	// Weight is the load-balancing weight (1 when unset).
	Weight uint32
	// Healthy is false for endpoints EDS marks unhealthy, draining or
	// timed out; the load balancer skips them.
	Healthy bool
	// Locality and Priority are what EDS sends; amber balances over the
	// lowest priority with healthy endpoints and ignores locality.
	Locality Locality
	Priority uint32
	// Workload is istiod's "istio" endpoint metadata "workload" value
	// (name;namespace;canonical name;revision;cluster) for telemetry.
	Workload string
	// Via is set for a gateway's endpoint that is a Service's waypoint
	// (istio.io/ingress-use-waypoint): HBONE goes to Via (the waypoint's
	// podIP:15008) with CONNECT Address (the Service's VIP:port).
	Via netip.AddrPort
	// Err is why the data path must refuse this endpoint: Istio mTLS to a
	// sidecar (Cluster.SidecarMTLS).
	Err error
}

// ErrSidecarMTLS is an Endpoint's Err for a sidecar endpoint a gateway
// would reach in Istio's legacy mTLS.
var ErrSidecarMTLS = errors.New("endpoint needs Istio mTLS to a sidecar (tlsMode=istio), which amber's gateway does not speak")

// BlackHole is the cluster istiod gives routers for traffic to nowhere:
// STATIC without endpoints.
const BlackHole = "BlackHoleCluster"

// Locality is an endpoint's region, zone and subzone.
type Locality struct{ Region, Zone, Subzone string }

func (b *builder) clusters(cs []*clusterv3.Cluster) {
	seen := map[string]bool{}
	for _, c := range cs {
		name := c.GetName()
		if seen[name] {
			b.problem(ClusterType, name, errors.New("repeated"))
			continue
		}
		seen[name] = true
		switch name {
		case MainInternal, Encap:
			if !b.checkResource(ClusterType, name, c) {
				continue
			}
			if err := internalCluster(c); err != nil {
				b.problem(ClusterType, name, err)
			}
			continue
		case InnerConnectOriginate, OuterConnectOriginate:
			b.checkResource(ClusterType, name, c) // see listeners
			continue
		case BlackHole:
			if !b.router {
				break
			}
			cl := &Cluster{Name: name, LB: RoundRobin, Endpoints: []Endpoint{}}
			if !b.checkResource(ClusterType, name, c) {
				cl.Err = errors.New("refused by the allow-list")
			} else if c.GetType() != clusterv3.Cluster_STATIC || c.GetLoadAssignment() != nil {
				cl.Err = errors.New("want STATIC without endpoints")
				b.problem(ClusterType, name, cl.Err)
			}
			b.cfg.Clusters[name] = cl
			continue
		case ConnectOriginate:
			if !b.checkResource(ClusterType, name, c) {
				continue
			}
			o, err := originateCluster(c)
			if err != nil {
				b.problem(ClusterType, name, err)
				continue
			}
			b.originate = o
			continue
		}
		cl := &Cluster{Name: name}
		if !b.checkResource(ClusterType, name, c) {
			cl.Err = errors.New("refused by the allow-list")
		} else if err := b.compileCluster(cl, c); err != nil {
			cl.Err = err
			b.problem(ClusterType, name, err)
		}
		b.cfg.Clusters[name] = cl
	}
}

// internalCluster checks main_internal and encap: static clusters to an
// internal listener, which amber's data path replaces with direct calls.
func internalCluster(c *clusterv3.Cluster) error {
	if c.GetType() != clusterv3.Cluster_STATIC {
		return fmt.Errorf("type %v: want STATIC", c.GetType())
	}
	eps := c.GetLoadAssignment().GetEndpoints()
	if len(eps) != 1 || len(eps[0].GetLbEndpoints()) != 1 {
		return errors.New("want one internal endpoint")
	}
	want := map[string]string{MainInternal: MainInternal, Encap: ConnectOriginate}[c.GetName()]
	if got := eps[0].GetLbEndpoints()[0].GetEndpoint().GetAddress().GetEnvoyInternalAddress().GetServerListenerName(); got != want {
		return fmt.Errorf("endpoint listener %q, want %q", got, want)
	}
	return internalTransport(c.GetTransportSocket())
}

// internalTransport accepts the transport istiod gives clusters to
// internal listeners: internal_upstream over raw_buffer. Anything else
// (TLS or PROXY protocol to the application from a DestinationRule) is
// unsupported.
func internalTransport(ts *corev3.TransportSocket) error {
	if ts == nil {
		return errors.New("transport_socket: missing internal_upstream")
	}
	iu, err := unpack[*internalv3.InternalUpstreamTransport](ts.GetTypedConfig())
	if err != nil {
		return fmt.Errorf("transport_socket: %w", err)
	}
	if tn := typeName(iu.GetTransportSocket().GetTypedConfig()); tn != "envoy.extensions.transport_sockets.raw_buffer.v3.RawBuffer" {
		return fmt.Errorf("transport_socket: internal_upstream over %s: unsupported (TLS or PROXY to the application)", tn)
	}
	return nil
}

func originateCluster(c *clusterv3.Cluster) (*Originate, error) {
	if c.GetType() != clusterv3.Cluster_ORIGINAL_DST || c.GetLbPolicy() != clusterv3.Cluster_CLUSTER_PROVIDED {
		return nil, errors.New("want ORIGINAL_DST with CLUSTER_PROVIDED")
	}
	o := &Originate{ConnectTimeout: c.GetConnectTimeout().AsDuration()}
	port := c.GetOriginalDstLbConfig().GetUpstreamPortOverride().GetValue()
	if port == 0 || port > 65535 {
		return nil, fmt.Errorf("original_dst_lb_config.upstream_port_override %d", port)
	}
	o.Port = uint16(port)
	ts := c.GetTransportSocket()
	u, err := unpack[*tlsv3.UpstreamTlsContext](ts.GetTypedConfig())
	if err != nil {
		return nil, fmt.Errorf("transport_socket: %w", err)
	}
	if err := commonTLS(u.GetCommonTlsContext()); err != nil {
		return nil, fmt.Errorf("transport_socket: %w", err)
	}
	for _, m := range u.GetCommonTlsContext().GetCombinedValidationContext().GetDefaultValidationContext().GetMatchTypedSubjectAltNames() {
		if m.GetSanType() != tlsv3.SubjectAltNameMatcher_URI || m.GetMatcher().GetPrefix() == "" {
			return nil, fmt.Errorf("subject alt name matcher %v: only URI prefixes", m)
		}
		o.SANPrefixes = append(o.SANPrefixes, m.GetMatcher().GetPrefix())
	}
	po, err := httpOptions(c)
	if err != nil {
		return nil, err
	}
	h2 := po.GetExplicitHttpConfig().GetHttp2ProtocolOptions()
	if h2 == nil || !h2.GetAllowConnect() {
		return nil, errors.New("want explicit HTTP/2 with allow_connect")
	}
	o.IdleTimeout = po.GetCommonHttpProtocolOptions().GetIdleTimeout().AsDuration()
	o.InitialStreamWindow = h2.GetInitialStreamWindowSize().GetValue()
	o.InitialConnWindow = h2.GetInitialConnectionWindowSize().GetValue()
	return o, nil
}

// httpOptions is the cluster's HttpProtocolOptions; nil without.
func httpOptions(c *clusterv3.Cluster) (*httpv3.HttpProtocolOptions, error) {
	a, ok := c.GetTypedExtensionProtocolOptions()["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
	if !ok {
		return nil, nil
	}
	return unpack[*httpv3.HttpProtocolOptions](a)
}

func (b *builder) compileCluster(cl *Cluster, c *clusterv3.Cluster) error {
	parts := strings.Split(cl.Name, "|")
	if len(parts) != 4 || (parts[0] != "inbound-vip" && parts[0] != "outbound") {
		return fmt.Errorf("name %q: not inbound-vip|port|subset|host or outbound|port|subset|host", cl.Name)
	}
	p, err := strconv.ParseUint(parts[1], 10, 16)
	if err != nil {
		return fmt.Errorf("name %q: port: %w", cl.Name, err)
	}
	cl.Port, cl.Service = uint16(p), parts[3]
	cl.Subset = parts[2]
	if parts[0] == "inbound-vip" {
		// inbound-vip's subset field is <protocol>[/<subset>].
		proto, subset, _ := strings.Cut(parts[2], "/")
		if proto != "http" && proto != "tcp" {
			return fmt.Errorf("name %q: protocol %q", cl.Name, proto)
		}
		cl.Subset = subset
	}
	if c.GetType() != clusterv3.Cluster_EDS {
		return fmt.Errorf("type %v: only EDS service clusters", c.GetType())
	}
	if sn := c.GetEdsClusterConfig().GetServiceName(); sn != "" && sn != cl.Name {
		return fmt.Errorf("eds_cluster_config.service_name %q: not the cluster's name", sn)
	}
	switch c.GetLbPolicy() {
	case clusterv3.Cluster_LEAST_REQUEST:
		cl.LB, cl.ChoiceCount = LeastRequest, 2
		if n := c.GetLeastRequestLbConfig().GetChoiceCount(); n != nil {
			cl.ChoiceCount = n.GetValue()
		}
		if c.GetLeastRequestLbConfig().GetActiveRequestBias() != nil || c.GetLeastRequestLbConfig().GetSlowStartConfig() != nil {
			return errors.New("least_request_lb_config: active_request_bias, slow_start_config: unsupported")
		}
	case clusterv3.Cluster_ROUND_ROBIN:
		cl.LB = RoundRobin
		if c.GetRoundRobinLbConfig().GetSlowStartConfig() != nil {
			return errors.New("round_robin_lb_config.slow_start_config: unsupported")
		}
	case clusterv3.Cluster_RANDOM:
		cl.LB = Random
	default:
		return fmt.Errorf("lb_policy %v: unsupported (consistent hashing is not implemented)", c.GetLbPolicy())
	}
	// amber never sends to endpoints EDS marks unhealthy: Envoy's panic
	// routing disabled, which is istiod's healthy_panic_threshold of 0.
	// Anything else is accepted as a degradation.
	if pt := c.GetCommonLbConfig().GetHealthyPanicThreshold(); pt != nil && pt.GetValue() > 0 {
		b.cfg.Degraded = append(b.cfg.Degraded, Degradation{
			Path: "cluster " + cl.Name + ": common_lb_config.healthy_panic_threshold", Reason: resilience.String()})
	}
	if c.GetLoadBalancingPolicy() != nil {
		return errors.New("load_balancing_policy: unsupported")
	}
	cl.ConnectTimeout = 5 * time.Second
	if t := c.GetConnectTimeout(); t != nil {
		cl.ConnectTimeout = t.AsDuration()
	}
	cl.Limits = Limits{1024, 1024, 1024, 3}
	for _, t := range c.GetCircuitBreakers().GetThresholds() {
		if t.GetPriority() != corev3.RoutingPriority_DEFAULT {
			continue // HIGH priority routes do not exist on a waypoint
		}
		set := func(dst *uint32, v interface{ GetValue() uint32 }) {
			if v != nil {
				*dst = v.GetValue()
			}
		}
		if t.MaxConnections != nil {
			set(&cl.Limits.MaxConnections, t.MaxConnections)
		}
		if t.MaxPendingRequests != nil {
			set(&cl.Limits.MaxPendingRequests, t.MaxPendingRequests)
		}
		if t.MaxRequests != nil {
			set(&cl.Limits.MaxRequests, t.MaxRequests)
		}
		if t.MaxRetries != nil {
			set(&cl.Limits.MaxRetries, t.MaxRetries)
		}
	}
	if b.router {
		if err := b.gatewayTransport(cl, c); err != nil {
			return err
		}
	} else if err := internalTransport(c.GetTransportSocket()); err != nil {
		return err
	}
	if len(c.GetFilters()) > 0 && !b.router {
		return errors.New("filters: unsupported on a waypoint's cluster")
	}
	for i, f := range c.GetFilters() {
		if err := telemetryTypedStruct(f.GetTypedConfig()); err != nil {
			return fmt.Errorf("filters[%d] %s: %w", i, f.GetName(), err)
		}
	}
	cl.IdleTimeout = time.Hour
	po, err := httpOptions(c)
	if err != nil {
		return err
	}
	if po != nil {
		common := po.GetCommonHttpProtocolOptions()
		if d := common.GetIdleTimeout(); d != nil {
			cl.IdleTimeout = d.AsDuration()
		}
		cl.MaxConnectionDuration = common.GetMaxConnectionDuration().AsDuration()
		cl.MaxRequestsPerConnection = common.GetMaxRequestsPerConnection().GetValue()
		switch pc := po.GetUpstreamProtocolOptions().(type) {
		case nil:
			cl.Protocol = UpstreamHTTP1
		case *httpv3.HttpProtocolOptions_UseDownstreamProtocolConfig:
			cl.Protocol = UpstreamAsDownstream
		case *httpv3.HttpProtocolOptions_ExplicitHttpConfig_:
			switch pc.ExplicitHttpConfig.GetProtocolConfig().(type) {
			case *httpv3.HttpProtocolOptions_ExplicitHttpConfig_Http2ProtocolOptions:
				cl.Protocol = UpstreamHTTP2
			case *httpv3.HttpProtocolOptions_ExplicitHttpConfig_HttpProtocolOptions:
				cl.Protocol = UpstreamHTTP1
			default:
				return errors.New("explicit_http_config: only HTTP/1.1 or HTTP/2")
			}
		default:
			return fmt.Errorf("upstream protocol %T: unsupported", pc)
		}
	} else {
		cl.Protocol = UpstreamHTTP1
	}
	if md := c.GetMetadata().GetFilterMetadata()["istio"]; md != nil {
		if svcs := md.GetFields()["services"].GetListValue().GetValues(); len(svcs) > 0 {
			f := svcs[0].GetStructValue().GetFields()
			cl.ServiceMeta = ServiceMeta{Host: f["host"].GetStringValue(), Name: f["name"].GetStringValue(), Namespace: f["namespace"].GetStringValue()}
		}
	}
	return nil
}

func (b *builder) endpoints(las []*endpointv3.ClusterLoadAssignment) {
	for _, la := range las {
		name := la.GetClusterName()
		if !b.checkResource(EndpointType, name, la) {
			if c := b.cfg.Clusters[name]; c != nil && c.Err == nil {
				c.Err = errors.New("its endpoints were refused")
			}
			continue
		}
		eps, err := compileEndpoints(la, b.router)
		if err != nil {
			b.problem(EndpointType, name, err)
			if c := b.cfg.Clusters[name]; c != nil && c.Err == nil {
				c.Err = fmt.Errorf("endpoints: %w", err)
			}
			continue
		}
		c := b.cfg.Clusters[name]
		if c == nil {
			b.problem(EndpointType, name, errors.New("no such cluster"))
			continue
		}
		for i := range eps {
			if eps[i].Err != nil && !c.SidecarMTLS {
				eps[i].Err = nil // no tlsMode-istio match: Envoy sends plain text
			}
		}
		c.Endpoints = eps
	}
}

// compileEndpoints compiles one assignment; router accepts what istiod
// sends gateways only (endpoints that are waypoints, sidecar endpoints).
func compileEndpoints(la *endpointv3.ClusterLoadAssignment, router bool) ([]Endpoint, error) {
	out := []Endpoint{}
	for i, lle := range la.GetEndpoints() {
		loc := Locality{lle.GetLocality().GetRegion(), lle.GetLocality().GetZone(), lle.GetLocality().GetSubZone()}
		for j, le := range lle.GetLbEndpoints() {
			var ap netip.AddrPort
			hbone := false
			switch a := le.GetEndpoint().GetAddress(); {
			case a.GetEnvoyInternalAddress() != nil:
				ia := a.GetEnvoyInternalAddress()
				if ia.GetServerListenerName() != ConnectOriginate {
					// inner_connect_originate: double HBONE to another network.
					return nil, fmt.Errorf("endpoints[%d].lb_endpoints[%d]: internal address of %q: only connect_originate", i, j, ia.GetServerListenerName())
				}
				var err error
				if ap, err = netip.ParseAddrPort(ia.GetEndpointId()); err != nil {
					return nil, fmt.Errorf("endpoints[%d].lb_endpoints[%d]: endpoint_id: %w", i, j, err)
				}
				hbone = true
			case a.GetSocketAddress() != nil:
				var err error
				if ap, err = socketAddress(a); err != nil {
					return nil, fmt.Errorf("endpoints[%d].lb_endpoints[%d]: %w", i, j, err)
				}
			default:
				return nil, fmt.Errorf("endpoints[%d].lb_endpoints[%d]: no address", i, j)
			}
			if len(le.GetEndpoint().GetAdditionalAddresses()) > 0 {
				return nil, fmt.Errorf("endpoints[%d].lb_endpoints[%d]: additional_addresses: unsupported", i, j)
			}
			md := le.GetMetadata().GetFilterMetadata()
			var via netip.AddrPort
			if od := md["envoy.filters.listener.original_dst"]; od != nil {
				l := od.GetFields()["local"].GetStringValue()
				switch w := od.GetFields()["waypoint"]; {
				case w != nil && (!router || !hbone):
					return nil, fmt.Errorf("endpoints[%d].lb_endpoints[%d]: sending through another waypoint (%s): unsupported", i, j, w.GetStringValue())
				case w != nil:
					// A gateway sending to a Service's waypoint
					// (endpoint_builder.go waypointEndpoints): HBONE to the
					// waypoint, CONNECT to the Service's address.
					wp, err := netip.ParseAddrPort(w.GetStringValue())
					if err != nil || wp != ap {
						return nil, fmt.Errorf("endpoints[%d].lb_endpoints[%d]: waypoint %q is not endpoint_id %s", i, j, w.GetStringValue(), ap)
					}
					vip, err := netip.ParseAddrPort(l)
					if err != nil {
						return nil, fmt.Errorf("endpoints[%d].lb_endpoints[%d]: original destination %q: %w", i, j, l, err)
					}
					via, ap = wp, vip
				case l != "" && l != ap.String():
					return nil, fmt.Errorf("endpoints[%d].lb_endpoints[%d]: original destination %s differs from endpoint_id %s", i, j, l, ap)
				}
			}
			ep := Endpoint{Address: ap, HBONE: hbone, Via: via, Weight: 1, Locality: loc, Priority: lle.GetPriority()}
			if router && !hbone && md["envoy.transport_socket_match"].GetFields()["tlsMode"].GetStringValue() == "istio" {
				ep.Err = ErrSidecarMTLS
			}
			if w := le.GetLoadBalancingWeight(); w != nil {
				ep.Weight = w.GetValue()
			}
			switch le.GetHealthStatus() {
			case corev3.HealthStatus_UNKNOWN, corev3.HealthStatus_HEALTHY:
				ep.Healthy = true
			}
			if im := md["istio"]; im != nil {
				ep.Workload = im.GetFields()["workload"].GetStringValue()
			}
			out = append(out, ep)
		}
	}
	return out, nil
}

// link ties listeners to clusters: connect_originate needs both halves.
func (b *builder) link() {
	if b.originate != nil && b.originateListenerOK {
		b.cfg.Originate = b.originate
	}
}

// gatewayTransport checks the transports of a gateway's cluster: istiod's
// transport socket matches (cluster_tls.go
// applyHBONETransportSocketMatches) pick HBONE through connect_originate
// for endpoints marked {tunnel: http}, Istio mTLS for sidecar endpoints
// ({tlsMode: istio}, refused per endpoint), plain text for the rest. A
// cluster without matches or transport socket is plain text.
func (b *builder) gatewayTransport(cl *Cluster, c *clusterv3.Cluster) error {
	if ts := c.GetTransportSocket(); ts != nil {
		if tn := typeName(ts.GetTypedConfig()); tn != "envoy.extensions.transport_sockets.raw_buffer.v3.RawBuffer" {
			return fmt.Errorf("transport_socket %s: only plain text (TLS origination to a Service is not supported)", tn)
		}
	}
	for i, m := range c.GetTransportSocketMatches() {
		match := m.GetMatch().GetFields()
		tn := typeName(m.GetTransportSocket().GetTypedConfig())
		switch {
		case len(match) == 1 && match["tunnel"].GetStringValue() == "http":
			if err := internalTransport(m.GetTransportSocket()); err != nil {
				return fmt.Errorf("transport_socket_matches[%d] %s: %w", i, m.GetName(), err)
			}
		case len(match) == 1 && match["tlsMode"].GetStringValue() == "istio":
			if tn != "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext" {
				return fmt.Errorf("transport_socket_matches[%d] %s: %s for tlsMode istio", i, m.GetName(), tn)
			}
			cl.SidecarMTLS = true
		case len(match) == 0:
			if tn != "envoy.extensions.transport_sockets.raw_buffer.v3.RawBuffer" {
				return fmt.Errorf("transport_socket_matches[%d] %s: only plain text for the other endpoints, not %s", i, m.GetName(), tn)
			}
		default:
			return fmt.Errorf("transport_socket_matches[%d] %s: match %v: unsupported", i, m.GetName(), m.GetMatch())
		}
	}
	return nil
}
