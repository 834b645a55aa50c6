package config

import (
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	sfsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/common/set_filter_state/v3"
	sfshttpv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/set_filter_state/v3"
	hcmv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	tcpv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/tcp_proxy/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	"google.golang.org/protobuf/proto"
)

type protoMessage = proto.Message

// Terminate is connect_terminate: where HBONE from ztunnels ends.
// amber terminates it with its own HBONE server and certificates; these
// are the settings istiod chose for it.
type Terminate struct {
	// Addresses are the listen addresses (0.0.0.0:15008, and [::]:15008
	// on dual-stack nodes).
	Addresses []netip.AddrPort
	// TrustDomains are the trust domains a client certificate's URI SAN
	// may be in (spiffe://<td>/ prefixes); empty accepts any certificate
	// the mesh root signed.
	TrustDomains []string
	// MaxConcurrentStreams bounds CONNECT streams per connection (100).
	MaxConcurrentStreams uint32
	// KeepaliveInterval and KeepaliveTimeout are the HTTP/2 PING settings
	// (10 s, 20 s). Zero: none.
	KeepaliveInterval, KeepaliveTimeout time.Duration
	// StreamIdleTimeout closes idle CONNECT streams; zero: never (istiod's).
	StreamIdleTimeout time.Duration
}

// Originate is connect_originate: HBONE from the waypoint to the chosen
// endpoint's podIP:15008 with the waypoint's own certificate.
type Originate struct {
	// Port is the HBONE port dialled on the endpoint's address (15008).
	Port uint16
	// ConnectTimeout bounds the TCP and TLS handshake; zero: Envoy's 5 s.
	ConnectTimeout time.Duration
	// IdleTimeout closes idle HBONE connections (istiod: 1 h).
	IdleTimeout time.Duration
	// SANPrefixes are what istiod lets Envoy accept as the destination's
	// identity (spiffe://<td>/ns/<waypoint ns>/sa/). amber checks the
	// exact identity WDS gives the destination workload instead, which is
	// stricter (docs/waypoint.md).
	SANPrefixes []string
	// InitialStreamWindow and InitialConnWindow are the HTTP/2 windows;
	// zero: the HBONE client's defaults.
	InitialStreamWindow, InitialConnWindow uint32
}

func (b *builder) listeners(ls []*listenerv3.Listener) {
	for _, l := range ls {
		name := l.GetName()
		switch name {
		case ConnectTerminate:
			if t, err := b.terminate(l); err != nil {
				b.problem(ListenerType, name, err)
			} else {
				b.cfg.Terminate = t
			}
		case MainInternal:
			b.cfg.Dispatch = b.mainInternal(l)
		case ConnectOriginate:
			if err := b.originateListener(l); err != nil {
				b.problem(ListenerType, name, err)
			} else {
				b.originateListenerOK = true
			}
		case InnerConnectOriginate, OuterConnectOriginate:
			// Double HBONE (CONNECT in CONNECT through an east-west gateway)
			// for endpoints on other networks. istiod always sends these;
			// amber accepts them unused and refuses the endpoints that
			// would need them (compileEndpoints).
			b.checkListener(l)
		default:
			b.problem(ListenerType, name, errors.New("unsupported listener"))
		}
	}
	for _, want := range []string{ConnectTerminate, MainInternal, ConnectOriginate} {
		if !slices.ContainsFunc(ls, func(l *listenerv3.Listener) bool { return l.GetName() == want }) {
			b.problem(ListenerType, want, errors.New("missing"))
		}
	}
}

// checkListener validates l and runs the allow-list over it without its
// filter chains, which are checked one by one so that one bad chain fails
// only itself.
func (b *builder) checkListener(l *listenerv3.Listener) bool {
	if err := l.ValidateAll(); err != nil {
		b.problem(ListenerType, l.GetName(), fmt.Errorf("invalid: %w", err))
		return false
	}
	shallow := proto.Clone(l).(*listenerv3.Listener)
	shallow.FilterChains = nil
	return b.checkResource(ListenerType, l.GetName(), shallow)
}

// checkChain runs the allow-list over one filter chain of listener l.
func (b *builder) checkChain(l string, i int, fc *listenerv3.FilterChain) error {
	var ch checker
	ch.message("", fmt.Sprintf("filter_chains[%d]", i), fc.ProtoReflect())
	for _, d := range ch.degraded {
		b.cfg.Degraded = append(b.cfg.Degraded, Degradation{Path: "listener " + l + ": " + d.Path, Reason: d.Reason})
	}
	return errors.Join(ch.problems...)
}

func (b *builder) terminate(l *listenerv3.Listener) (*Terminate, error) {
	if !b.checkListener(l) {
		return nil, errors.New("refused (see the problems above)")
	}
	t := &Terminate{}
	var err error
	if t.Addresses, err = listenerAddresses(l); err != nil {
		return nil, err
	}
	if len(l.GetFilterChains()) != 1 || l.GetFilterChainMatcher() != nil {
		return nil, errors.New("want exactly one filter chain")
	}
	fc := l.GetFilterChains()[0]
	if err := b.checkChain(l.GetName(), 0, fc); err != nil {
		return nil, err
	}
	if fc.GetFilterChainMatch() != nil {
		return nil, errors.New("filter_chains[0].filter_chain_match: unsupported")
	}
	tds, err := downstreamTLS(fc.GetTransportSocket())
	if err != nil {
		return nil, fmt.Errorf("filter_chains[0].transport_socket: %w", err)
	}
	t.TrustDomains = tds
	if len(fc.GetFilters()) != 1 {
		return nil, errors.New("filter_chains[0]: want one filter, the HTTP connection manager")
	}
	h, err := unpackHCM(fc.GetFilters()[0])
	if err != nil {
		return nil, fmt.Errorf("filter_chains[0].filters[0]: %w", err)
	}
	if err := terminateHCM(h, t); err != nil {
		return nil, fmt.Errorf("filter_chains[0].filters[0]: %w", err)
	}
	return t, nil
}

// downstreamTLS checks connect_terminate's TLS: a required client
// certificate, TLS 1.3, ALPN h2, the SDS secrets pilot-agent serves
// ("default", "ROOTCA": amber uses its own certificate manager for both),
// and URI SAN prefixes per trust domain, which it returns.
func downstreamTLS(ts *corev3.TransportSocket) ([]string, error) {
	if ts == nil {
		return nil, errors.New("missing: HBONE needs TLS")
	}
	d, err := unpack[*tlsv3.DownstreamTlsContext](ts.GetTypedConfig())
	if err != nil {
		return nil, err
	}
	if !d.GetRequireClientCertificate().GetValue() {
		return nil, errors.New("require_client_certificate is not true")
	}
	c := d.GetCommonTlsContext()
	if err := commonTLS(c); err != nil {
		return nil, err
	}
	var tds []string
	for _, m := range c.GetCombinedValidationContext().GetDefaultValidationContext().GetMatchTypedSubjectAltNames() {
		p := m.GetMatcher().GetPrefix()
		if m.GetSanType() != tlsv3.SubjectAltNameMatcher_URI || p == "" || !strings.HasPrefix(p, "spiffe://") || !strings.HasSuffix(p, "/") || m.GetMatcher().GetIgnoreCase() {
			return nil, fmt.Errorf("subject alt name matcher %v: only URI prefixes spiffe://<trust domain>/", m)
		}
		tds = append(tds, strings.TrimSuffix(strings.TrimPrefix(p, "spiffe://"), "/"))
	}
	return tds, nil
}

// commonTLS checks what istiod's buildCommonConnectTLSContext sets.
func commonTLS(c *tlsv3.CommonTlsContext) error {
	if p := c.GetTlsParams(); p.GetTlsMinimumProtocolVersion() != tlsv3.TlsParameters_TLSv1_3 || p.GetTlsMaximumProtocolVersion() != tlsv3.TlsParameters_TLSv1_3 {
		return fmt.Errorf("tls_params %v: amber's HBONE is TLS 1.3 only", p)
	}
	if !slices.Equal(c.GetAlpnProtocols(), []string{"h2"}) {
		return fmt.Errorf("alpn_protocols %v: want [h2]", c.GetAlpnProtocols())
	}
	certs := c.GetTlsCertificateSdsSecretConfigs()
	if len(certs) != 1 || certs[0].GetName() != "default" {
		return errors.New("tls_certificate_sds_secret_configs: want the workload certificate \"default\"")
	}
	if n := c.GetCombinedValidationContext().GetValidationContextSdsSecretConfig().GetName(); n != "ROOTCA" {
		return fmt.Errorf("validation context secret %q: want ROOTCA", n)
	}
	return nil
}

func unpackHCM(f *listenerv3.Filter) (*hcmv3.HttpConnectionManager, error) {
	if f.GetTypedConfig() == nil {
		return nil, errors.New("no typed_config")
	}
	return unpack[*hcmv3.HttpConnectionManager](f.GetTypedConfig())
}

// terminateHCM checks connect_terminate's connection manager: HTTP/2
// CONNECT only, routed to main_internal, with the filters istiod puts
// there, and fills t.
func terminateHCM(h *hcmv3.HttpConnectionManager, t *Terminate) error {
	o := h.GetHttp2ProtocolOptions()
	if !o.GetAllowConnect() {
		return errors.New("http2_protocol_options.allow_connect is not true")
	}
	t.MaxConcurrentStreams = o.GetMaxConcurrentStreams().GetValue()
	t.KeepaliveInterval = o.GetConnectionKeepalive().GetInterval().AsDuration()
	t.KeepaliveTimeout = o.GetConnectionKeepalive().GetTimeout().AsDuration()
	t.StreamIdleTimeout = h.GetStreamIdleTimeout().AsDuration()
	if !slices.ContainsFunc(h.GetUpgradeConfigs(), func(u *hcmv3.HttpConnectionManager_UpgradeConfig) bool {
		return u.GetUpgradeType() == "CONNECT"
	}) {
		return errors.New("upgrade_configs: no CONNECT")
	}
	rc := h.GetRouteConfig()
	if rc == nil {
		return errors.New("no inline route_config")
	}
	vhs := rc.GetVirtualHosts()
	if len(vhs) != 1 || !slices.Equal(vhs[0].GetDomains(), []string{"*"}) || len(vhs[0].GetRoutes()) != 1 {
		return errors.New("route_config: want one virtual host \"*\" with one route")
	}
	r := vhs[0].GetRoutes()[0]
	if r.GetMatch().GetConnectMatcher() == nil || r.GetRoute().GetCluster() != MainInternal {
		return errors.New("route_config: want CONNECT routed to main_internal")
	}
	if !slices.ContainsFunc(r.GetRoute().GetUpgradeConfigs(), func(u *routev3.RouteAction_UpgradeConfig) bool {
		return u.GetUpgradeType() == "CONNECT" && u.GetConnectConfig() != nil
	}) {
		return errors.New("route: CONNECT is not terminated (upgrade_configs connect_config)")
	}
	for i, f := range h.GetHttpFilters() {
		if err := terminateFilter(f, i == len(h.GetHttpFilters())-1); err != nil {
			return fmt.Errorf("http_filters[%d] %s: %w", i, f.GetName(), err)
		}
	}
	return nil
}

// terminateFilter accepts what istiod puts on connect_terminate: the peer
// metadata filter (telemetry), connect_authority (state amber's HBONE
// server records natively) and the router, last.
func terminateFilter(f *hcmv3.HttpFilter, last bool) error {
	tn := typeName(f.GetTypedConfig())
	switch {
	case tn == routerType:
		if !last {
			return errors.New("router is not last")
		}
		return nil
	case last:
		return errors.New("the last filter is not the router")
	case tn == typedStructType || tn == udpaStructType:
		return telemetryTypedStruct(f.GetTypedConfig())
	case tn == sfsHTTPType:
		cfg, err := unpack[*sfshttpv3.Config](f.GetTypedConfig())
		if err != nil {
			return err
		}
		return knownFilterState(cfg.GetOnRequestHeaders())
	}
	return fmt.Errorf("unsupported filter %s on connect_terminate", tn)
}

// filterStates are the filter state values istiod's connect_authority
// filters set (pilot/pkg/xds/filters/filters.go ConnectAuthorityFilter,
// ConnectAuthorityNetworkFilter): the CONNECT :authority as original
// destination, the HBONE peer's address and URI SAN, the waypoint's own
// URI SAN. amber's data path carries the same facts in its own types, so
// these are accepted only with exactly these formats.
var filterStates = map[string][]string{
	"envoy.filters.listener.original_dst.local_ip":  {"%REQ(:AUTHORITY)%", "%FILTER_STATE(envoy.filters.listener.original_dst.local_ip:PLAIN)%"},
	"io.istio.connect_authority":                    {"%REQ(:AUTHORITY)%"},
	"envoy.filters.listener.original_dst.remote_ip": {"%DOWNSTREAM_REMOTE_ADDRESS%"},
	"io.istio.peer_principal":                       {"%DOWNSTREAM_PEER_URI_SAN%"},
	"io.istio.local_principal":                      {"%DOWNSTREAM_LOCAL_URI_SAN%"},
}

func knownFilterState(vals []*sfsv3.FilterStateValue) error {
	for i, v := range vals {
		key := v.GetObjectKey()
		formats, ok := filterStates[key]
		if !ok {
			return fmt.Errorf("[%d]: filter state %q: unsupported", i, key)
		}
		f := v.GetFormatString()
		if len(f.GetFormatters()) > 0 || f.GetTextFormatSource().GetInlineString() == "" {
			return fmt.Errorf("[%d]: filter state %q: only an inline text format", i, key)
		}
		if s := f.GetTextFormatSource().GetInlineString(); !slices.Contains(formats, s) {
			return fmt.Errorf("[%d]: filter state %q from %q: unsupported", i, key, s)
		}
	}
	return nil
}

func (b *builder) originateListener(l *listenerv3.Listener) error {
	if !b.checkListener(l) {
		return errors.New("refused (see the problems above)")
	}
	if l.GetInternalListener() == nil {
		return errors.New("not an internal listener")
	}
	if len(l.GetFilterChains()) != 1 {
		return errors.New("want one filter chain")
	}
	fc := l.GetFilterChains()[0]
	if err := b.checkChain(l.GetName(), 0, fc); err != nil {
		return err
	}
	fs := fc.GetFilters()
	if len(fs) != 1 {
		return errors.New("filter_chains[0]: want one filter, tcp_proxy")
	}
	tp, err := unpack[*tcpv3.TcpProxy](fs[0].GetTypedConfig())
	if err != nil {
		return fmt.Errorf("filter_chains[0].filters[0]: %w", err)
	}
	if tp.GetCluster() != ConnectOriginate || tp.GetTunnelingConfig().GetHostname() != "%DOWNSTREAM_LOCAL_ADDRESS%" {
		return errors.New("filter_chains[0].filters[0]: want tcp_proxy tunnelling to %DOWNSTREAM_LOCAL_ADDRESS% through connect_originate")
	}
	return nil
}

// listenerAddresses are a socket listener's address and additional
// addresses.
func listenerAddresses(l *listenerv3.Listener) ([]netip.AddrPort, error) {
	addrs := []*corev3.Address{l.GetAddress()}
	for _, a := range l.GetAdditionalAddresses() {
		addrs = append(addrs, a.GetAddress())
	}
	var out []netip.AddrPort
	for _, a := range addrs {
		ap, err := socketAddress(a)
		if err != nil {
			return nil, fmt.Errorf("address: %w", err)
		}
		out = append(out, ap)
	}
	return out, nil
}

// socketAddress converts a TCP socket address.
func socketAddress(a *corev3.Address) (netip.AddrPort, error) {
	sa := a.GetSocketAddress()
	if sa == nil || sa.GetProtocol() != corev3.SocketAddress_TCP || sa.GetResolverName() != "" || sa.GetIpv4Compat() {
		return netip.AddrPort{}, fmt.Errorf("%v: want a TCP socket address", a)
	}
	ip, err := netip.ParseAddr(sa.GetAddress())
	if err != nil {
		return netip.AddrPort{}, err
	}
	if sa.GetPortValue() == 0 || sa.GetPortValue() > 65535 {
		return netip.AddrPort{}, fmt.Errorf("port %d", sa.GetPortValue())
	}
	return netip.AddrPortFrom(ip, uint16(sa.GetPortValue())), nil
}
