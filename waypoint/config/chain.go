package config

import (
	"errors"
	"fmt"
	"net/netip"
	"strconv"
	"strings"
	"time"

	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	corsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/cors/v3"
	faultv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/fault/v3"
	rbachttpv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/rbac/v3"
	routerv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/router/v3"
	hcmv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	rbacnetv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/rbac/v3"
	sfsnetv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/set_filter_state/v3"
	tcpv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/tcp_proxy/v3"
	"google.golang.org/protobuf/types/known/anypb"

	"github.com/amber-mesh/amber/waypoint/rbac"
	"github.com/amber-mesh/amber/waypoint/route"
)

// Chain is one filter chain of main_internal.
type Chain struct {
	// Name is istiod's: inbound-vip|<port>|http|<host>,
	// inbound-vip|<port>|tcp|<host>, direct-http, direct-tcp.
	Name string
	// Err is why the chain was refused; the data path closes its streams.
	// Nil: the chain is usable.
	Err error
	// Service is the service a VIP chain serves, from its name; zero for
	// the direct (workload-addressed) chains.
	Service ServiceRef
	// Exactly one of HTTP and TCP is set when Err is nil.
	HTTP *HTTPChain
	TCP  *TCPChain
}

// ServiceRef names a service port.
type ServiceRef struct {
	// Host is the service's hostname (reviews.default.svc.cluster.local).
	Host string
	// Port is the service port.
	Port uint16
}

// HTTPChain is a chain ending in an HTTP connection manager: the request
// pipeline of one service port.
type HTTPChain struct {
	// StatPrefix is the HCM's stat prefix.
	StatPrefix string
	// Path is the normalisation applied to :path before any filter.
	Path route.PathOptions
	// RBAC are the RBAC filters in istiod's order (AUDIT, DENY, ALLOW);
	// the data path stops at the first denial.
	RBAC []*rbac.Filter
	// Routes is the inline route configuration, or a gateway's from RDS.
	Routes *route.Config
	// RouteName is the RDS route configuration's name; empty when inline.
	RouteName string
	// Telemetry names the telemetry-only filters accepted (peer metadata,
	// istio.stats, grpc_stats); amber's data path does their job itself.
	Telemetry []string
	// Stats is istio.stats' configuration; nil without the filter (no
	// metrics provider in the mesh config).
	Stats *Stats
	// UseRemoteAddress and XFFTrustedHops decide the remote address RBAC's
	// remote_ip sees: false/0 (istiod's) takes the last x-forwarded-for
	// entry when there is one (RemoteAddress).
	UseRemoteAddress bool
	XFFTrustedHops   uint32
	// ServerName is the server header of local replies; empty: Envoy's
	// "envoy". ServerHeader is its transformation.
	ServerName   string
	ServerHeader hcmv3.HttpConnectionManager_ServerHeaderTransformation
	// ForwardClientCert is forward_client_cert_details (SANITIZE: drop a
	// client's x-forwarded-client-cert).
	ForwardClientCert hcmv3.HttpConnectionManager_ForwardClientCertDetails
	// GenerateRequestID adds x-request-id when missing (true unless istiod
	// says otherwise); PreserveExternalRequestID keeps a client's.
	GenerateRequestID, PreserveExternalRequestID bool
	// StreamIdleTimeout, RequestTimeout, RequestHeadersTimeout: zero means
	// none.
	StreamIdleTimeout, RequestTimeout, RequestHeadersTimeout time.Duration
	// IdleTimeout closes an idle downstream connection (Envoy: 1 h when
	// unset); MaxConnectionDuration and MaxStreamDuration: zero none.
	IdleTimeout, MaxConnectionDuration, MaxStreamDuration time.Duration
	// MaxRequestHeadersKB bounds the request headers (Envoy's default
	// 60); MaxHeadersCount their number (default 100).
	MaxRequestHeadersKB, MaxHeadersCount uint32
	// HeadersWithUnderscores is what happens to a header with '_' in its
	// name (ALLOW by default).
	HeadersWithUnderscores string
	// AcceptHTTP10 accepts HTTP/1.0 requests.
	AcceptHTTP10 bool
	// Upgrades are the HCM's allowed upgrade types ("websocket").
	Upgrades []string
	// AppendXForwardedPort adds x-forwarded-port.
	AppendXForwardedPort bool
	// Proxy100Continue passes a backend's 100-continue to the client
	// rather than answering Expect: 100-continue itself.
	Proxy100Continue bool
}

// RemoteAddress is the downstream remote address Envoy's HCM derives for
// a request whose direct peer is peer and whose x-forwarded-for header
// values are xff: with use_remote_address false, the entry
// xff_num_trusted_hops from the right, when there is one and it parses
// (source/common/http/conn_manager_utility.cc, Utility::getLastAddressFromXFF).
func (h *HTTPChain) RemoteAddress(peer netip.Addr, xff []string) netip.Addr {
	if h.UseRemoteAddress {
		return peer
	}
	var entries []string
	for _, v := range xff {
		for _, e := range strings.Split(v, ",") {
			entries = append(entries, strings.TrimSpace(e))
		}
	}
	i := len(entries) - 1 - int(h.XFFTrustedHops)
	if i < 0 {
		return peer
	}
	a, err := netip.ParseAddr(entries[i])
	if err != nil {
		return peer
	}
	return a
}

// TCPChain is a chain ending in tcp_proxy.
type TCPChain struct {
	StatPrefix string
	// RBAC are the network RBAC filters in order.
	RBAC []*rbac.Filter
	// Cluster is the upstream cluster, or Weighted the weighted ones
	// (TCPRoute/TLSRoute and VirtualService tcp routes).
	Cluster  string
	Weighted []TCPWeightedCluster
	// IdleTimeout closes an idle connection (Envoy: 1 h when unset, zero
	// disables); MaxConnectionDuration bounds it (zero: none).
	IdleTimeout, MaxConnectionDuration time.Duration
	// Telemetry names the telemetry-only filters accepted.
	Telemetry []string
	// Stats is istio.stats' configuration; nil without the filter.
	Stats *Stats
}

// TCPWeightedCluster is one weighted tcp_proxy cluster.
type TCPWeightedCluster struct {
	Name   string
	Weight uint32
}

// Pick is route.Forward.Pick for TCP.
func (t *TCPChain) Pick(random uint64) (string, bool) {
	if t.Cluster != "" {
		return t.Cluster, true
	}
	var total uint64
	for _, w := range t.Weighted {
		total += uint64(w.Weight)
	}
	if total == 0 {
		return "", false
	}
	v, end := random%total, uint64(0)
	for _, w := range t.Weighted {
		end += uint64(w.Weight)
		if v < end {
			return w.Name, true
		}
	}
	return "", false
}

// Type names of the Any types the compiler looks at.
const (
	typedStructType = "xds.type.v3.TypedStruct"
	udpaStructType  = "udpa.type.v1.TypedStruct"
	routerType      = "envoy.extensions.filters.http.router.v3.Router"
	sfsHTTPType     = "envoy.extensions.filters.http.set_filter_state.v3.Config"
	sfsNetworkType  = "envoy.extensions.filters.network.set_filter_state.v3.Config"
	hcmType         = "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
	tcpProxyType    = "envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy"
	rbacHTTPType    = "envoy.extensions.filters.http.rbac.v3.RBAC"
	rbacNetworkType = "envoy.extensions.filters.network.rbac.v3.RBAC"
	statsType       = "stats.PluginConfig"
	grpcStatsType   = "envoy.extensions.filters.http.grpc_stats.v3.FilterConfig"
	faultType       = "envoy.extensions.filters.http.fault.v3.HTTPFault"
	corsType        = "envoy.extensions.filters.http.cors.v3.Cors"
	alpnType        = "istio.envoy.config.filter.http.alpn.v2alpha1.FilterConfig"
)

func typeName(a *anypb.Any) string {
	return strings.TrimPrefix(a.GetTypeUrl(), "type.googleapis.com/")
}

// compileChain fills ch from fc, which passed the allow-list.
func compileChain(ch *Chain, fc *listenerv3.FilterChain) error {
	if fc.GetFilterChainMatch() != nil || fc.GetTransportSocket() != nil {
		return errors.New("filter_chain_match and transport_socket: unsupported on an internal listener")
	}
	ch.Service = parseChainName(ch.Name)
	fs := fc.GetFilters()
	if len(fs) == 0 {
		return errors.New("no filters")
	}
	last := fs[len(fs)-1]
	switch typeName(last.GetTypedConfig()) {
	case hcmType:
		h, err := unpackHCM(last)
		if err != nil {
			return err
		}
		if err := preFilters(fs[:len(fs)-1]); err != nil {
			return err
		}
		ch.HTTP, err = compileHCM(h, nil)
		if err != nil {
			return fmt.Errorf("filters[%d]: %w", len(fs)-1, err)
		}
	case tcpProxyType:
		t := &TCPChain{}
		for i, f := range fs[:len(fs)-1] {
			switch typeName(f.GetTypedConfig()) {
			case rbacNetworkType:
				cfg, err := unpack[*rbacnetv3.RBAC](f.GetTypedConfig())
				if err != nil {
					return fmt.Errorf("filters[%d]: %w", i, err)
				}
				r, err := rbac.NewNetwork(cfg)
				if err != nil {
					return fmt.Errorf("filters[%d] %s: %w", i, f.GetName(), err)
				}
				t.RBAC = append(t.RBAC, r)
			case statsType:
				st, err := statsConfig(f.GetTypedConfig())
				if err != nil {
					return fmt.Errorf("filters[%d]: %w", i, err)
				}
				t.Stats = st
				t.Telemetry = append(t.Telemetry, f.GetName())
			case typedStructType, udpaStructType:
				if err := telemetryTypedStruct(f.GetTypedConfig()); err != nil {
					return fmt.Errorf("filters[%d]: %w", i, err)
				}
				t.Telemetry = append(t.Telemetry, f.GetName())
			case sfsNetworkType:
				if err := preFilters(fs[i : i+1]); err != nil {
					return fmt.Errorf("filters[%d]: %w", i, err)
				}
			default:
				return fmt.Errorf("filters[%d] %s: unsupported before tcp_proxy", i, f.GetName())
			}
		}
		tp, err := unpack[*tcpv3.TcpProxy](last.GetTypedConfig())
		if err != nil {
			return err
		}
		if err := compileTCPProxy(tp, t); err != nil {
			return fmt.Errorf("filters[%d]: %w", len(fs)-1, err)
		}
		ch.TCP = t
	default:
		return fmt.Errorf("filters[%d]: the last filter is neither the HTTP connection manager nor tcp_proxy", len(fs)-1)
	}
	return nil
}

// preFilters accepts the network filters istiod puts before an HCM: the
// direct chains' connect_authority (set_filter_state).
func preFilters(fs []*listenerv3.Filter) error {
	for i, f := range fs {
		if typeName(f.GetTypedConfig()) != sfsNetworkType {
			return fmt.Errorf("filters[%d] %s: unsupported before the HTTP connection manager", i, f.GetName())
		}
		cfg, err := unpack[*sfsnetv3.Config](f.GetTypedConfig())
		if err != nil {
			return fmt.Errorf("filters[%d]: %w", i, err)
		}
		if err := knownFilterState(cfg.GetOnNewConnection()); err != nil {
			return fmt.Errorf("filters[%d] %s: %w", i, f.GetName(), err)
		}
	}
	return nil
}

func compileTCPProxy(tp *tcpv3.TcpProxy, t *TCPChain) error {
	t.StatPrefix = tp.GetStatPrefix()
	switch cs := tp.GetClusterSpecifier().(type) {
	case *tcpv3.TcpProxy_Cluster:
		t.Cluster = cs.Cluster
	case *tcpv3.TcpProxy_WeightedClusters:
		for _, c := range cs.WeightedClusters.GetClusters() {
			if c.GetMetadataMatch() != nil {
				return errors.New("weighted_clusters: metadata_match: unsupported")
			}
			t.Weighted = append(t.Weighted, TCPWeightedCluster{Name: c.GetName(), Weight: c.GetWeight()})
		}
	default:
		return fmt.Errorf("cluster specifier %T: unsupported", cs)
	}
	t.IdleTimeout = time.Hour
	if it := tp.GetIdleTimeout(); it != nil {
		t.IdleTimeout = it.AsDuration()
	}
	t.MaxConnectionDuration = tp.GetMaxDownstreamConnectionDuration().AsDuration()
	if tp.GetTunnelingConfig() != nil {
		return errors.New("tunneling_config: unsupported on a service chain")
	}
	return nil
}

// routeSource returns the compiled route configuration of a name RDS
// delivered, or why there is none.
type routeSource func(name string) (*route.Config, error)

// compileHCM compiles a chain's HTTP connection manager. rds is nil on a
// waypoint, whose routes are inline; a gateway's come from RDS.
func compileHCM(h *hcmv3.HttpConnectionManager, rds routeSource) (*HTTPChain, error) {
	c := &HTTPChain{
		StatPrefix:                h.GetStatPrefix(),
		UseRemoteAddress:          h.GetUseRemoteAddress().GetValue(),
		XFFTrustedHops:            h.GetXffNumTrustedHops(),
		ServerName:                h.GetServerName(),
		ServerHeader:              h.GetServerHeaderTransformation(),
		ForwardClientCert:         h.GetForwardClientCertDetails(),
		GenerateRequestID:         h.GetGenerateRequestId() == nil || h.GetGenerateRequestId().GetValue(),
		PreserveExternalRequestID: h.GetPreserveExternalRequestId(),
		StreamIdleTimeout:         5 * time.Minute,
		RequestTimeout:            h.GetRequestTimeout().AsDuration(),
		RequestHeadersTimeout:     h.GetRequestHeadersTimeout().AsDuration(),
		IdleTimeout:               time.Hour,
		MaxRequestHeadersKB:       60,
		MaxHeadersCount:           100,
		HeadersWithUnderscores:    "ALLOW",
		AcceptHTTP10:              h.GetHttpProtocolOptions().GetAcceptHttp_10(),
		AppendXForwardedPort:      h.GetAppendXForwardedPort(),
		Proxy100Continue:          h.GetProxy_100Continue(),
	}
	if h.GetCodecType() != hcmv3.HttpConnectionManager_AUTO {
		return nil, fmt.Errorf("codec_type %v: unsupported", h.GetCodecType())
	}
	fcc := h.GetForwardClientCertDetails()
	if fcc == hcmv3.HttpConnectionManager_SANITIZE_SET && rds != nil {
		// A gateway's: drop a client's header, then set one from the
		// client certificate, of which a plain HTTP listener has none.
		// amber's gateway listeners never ask for client certificates
		// (gateway.go), so this is SANITIZE.
		fcc = hcmv3.HttpConnectionManager_SANITIZE
		c.ForwardClientCert = fcc
	}
	if fcc != hcmv3.HttpConnectionManager_SANITIZE {
		// Anything else forwards or builds x-forwarded-client-cert from a
		// peer certificate the inner connection does not have.
		return nil, fmt.Errorf("forward_client_cert_details %v: unsupported", h.GetForwardClientCertDetails())
	}
	if d := h.GetStreamIdleTimeout(); d != nil {
		c.StreamIdleTimeout = d.AsDuration()
	}
	if n := h.GetMaxRequestHeadersKb(); n != nil {
		c.MaxRequestHeadersKB = n.GetValue()
	}
	if o := h.GetCommonHttpProtocolOptions(); o != nil {
		if d := o.GetIdleTimeout(); d != nil {
			c.IdleTimeout = d.AsDuration()
		}
		c.MaxConnectionDuration = o.GetMaxConnectionDuration().AsDuration()
		c.MaxStreamDuration = o.GetMaxStreamDuration().AsDuration()
		if n := o.GetMaxHeadersCount(); n != nil {
			c.MaxHeadersCount = n.GetValue()
		}
		c.HeadersWithUnderscores = o.GetHeadersWithUnderscoresAction().String()
	}
	c.Path.Normalize = h.GetNormalizePath().GetValue()
	c.Path.MergeSlashes = h.GetMergeSlashes()
	switch h.GetPathWithEscapedSlashesAction() {
	case hcmv3.HttpConnectionManager_IMPLEMENTATION_SPECIFIC_DEFAULT, hcmv3.HttpConnectionManager_KEEP_UNCHANGED:
		c.Path.EscapedSlashes = route.KeepEscapedSlashes
	case hcmv3.HttpConnectionManager_REJECT_REQUEST:
		c.Path.EscapedSlashes = route.RejectEscapedSlashes
	case hcmv3.HttpConnectionManager_UNESCAPE_AND_REDIRECT:
		c.Path.EscapedSlashes = route.UnescapeAndRedirect
	case hcmv3.HttpConnectionManager_UNESCAPE_AND_FORWARD:
		c.Path.EscapedSlashes = route.UnescapeAndForward
	default:
		return nil, fmt.Errorf("path_with_escaped_slashes_action %v: unsupported", h.GetPathWithEscapedSlashesAction())
	}
	for i, u := range h.GetUpgradeConfigs() {
		if len(u.GetFilters()) > 0 || (u.GetEnabled() != nil && !u.GetEnabled().GetValue()) {
			return nil, fmt.Errorf("upgrade_configs[%d]: only an enabled upgrade type", i)
		}
		c.Upgrades = append(c.Upgrades, strings.ToLower(u.GetUpgradeType()))
	}
	var err error
	switch rc := h.GetRouteConfig(); {
	case rc != nil:
		if c.Routes, err = route.New(rc); err != nil {
			return nil, fmt.Errorf("route_config %s: %w", rc.GetName(), err)
		}
	case h.GetRds() != nil && rds != nil:
		c.RouteName = h.GetRds().GetRouteConfigName()
		if c.Routes, err = rds(c.RouteName); err != nil {
			return nil, fmt.Errorf("rds %s: %w", c.RouteName, err)
		}
	case rds == nil:
		return nil, errors.New("no inline route_config (RDS is not used for waypoints)")
	default:
		return nil, errors.New("neither route_config nor rds")
	}
	fs := h.GetHttpFilters()
	for i, f := range fs {
		if err := c.httpFilter(f, i == len(fs)-1); err != nil {
			return nil, fmt.Errorf("http_filters[%d] %s: %w", i, f.GetName(), err)
		}
	}
	return c, nil
}

func (c *HTTPChain) httpFilter(f *hcmv3.HttpFilter, last bool) error {
	a := f.GetTypedConfig()
	tn := typeName(a)
	if f.GetDisabled() {
		// A filter disabled by default is only enabled per route, which
		// amber does not support: refuse rather than skip.
		return errors.New("disabled (per-route enabling): unsupported")
	}
	switch {
	case tn == routerType:
		if !last {
			return errors.New("router is not the last filter")
		}
		r, err := unpack[*routerv3.Router](a)
		if err != nil {
			return err
		}
		if len(r.GetUpstreamHttpFilters()) > 0 {
			return errors.New("upstream_http_filters: unsupported")
		}
		return nil
	case last:
		return errors.New("the last filter is not the router")
	case tn == rbacHTTPType:
		cfg, err := unpack[*rbachttpv3.RBAC](a)
		if err != nil {
			return err
		}
		r, err := rbac.NewHTTP(cfg)
		if err != nil {
			return err
		}
		c.RBAC = append(c.RBAC, r)
	case tn == typedStructType || tn == udpaStructType:
		if err := telemetryTypedStruct(a); err != nil {
			return err
		}
		c.Telemetry = append(c.Telemetry, f.GetName())
	case tn == statsType:
		st, err := statsConfig(a)
		if err != nil {
			return err
		}
		c.Stats = st
		c.Telemetry = append(c.Telemetry, f.GetName())
	case tn == grpcStatsType:
		c.Telemetry = append(c.Telemetry, f.GetName())
	case tn == faultType:
		// istiod's fault filter carries no configuration of its own; a
		// route's fault injection (typed_per_filter_config) is refused.
		cfg, err := unpack[*faultv3.HTTPFault](a)
		if err != nil {
			return err
		}
		if cfg.GetDelay() != nil || cfg.GetAbort() != nil {
			return errors.New("fault injection: unsupported")
		}
	case tn == alpnType:
		// istio.alpn picks the ALPN of Istio mTLS to sidecar endpoints,
		// which amber's gateway refuses (cluster.go): nothing to do.
		c.Telemetry = append(c.Telemetry, f.GetName())
	case tn == corsType:
		if _, err := unpack[*corsv3.Cors](a); err != nil {
			return err
		}
	default:
		return fmt.Errorf("unsupported filter type.googleapis.com/%s", tn)
	}
	return nil
}

// parseChainName reads the service from inbound-vip|<port>|<proto>|<host>.
func parseChainName(name string) ServiceRef {
	parts := strings.Split(name, "|")
	if len(parts) != 4 || parts[0] != "inbound-vip" {
		return ServiceRef{}
	}
	p, err := strconv.ParseUint(parts[1], 10, 16)
	if err != nil {
		return ServiceRef{}
	}
	return ServiceRef{Host: parts[3], Port: uint16(p)}
}
