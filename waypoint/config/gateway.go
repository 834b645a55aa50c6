package config

import (
	"crypto/tls"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strings"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"

	"github.com/amber-mesh/amber/waypoint/route"
)

// Gateway is one socket listener of an ingress gateway (a router node):
// what istiod builds for the Gateway servers of one port
// (pilot/pkg/networking/core/gateway.go buildGatewayListeners), named
// <bind>_<port>, with one HTTP connection manager whose routes come from
// RDS (gatewayRDSRouteName: http.<port>).
type Gateway struct {
	// Name is the listener's name (0.0.0.0_8080).
	Name string
	// Addresses are where it listens; empty when the listener was refused
	// before its address was read.
	Addresses []netip.AddrPort
	// Chain is its one filter chain: Chain.HTTP when usable, else
	// Chain.Err says why every request is refused.
	Chain *Chain
	// TLS, when set, terminates TLS on the listener (an HTTPS server
	// with credentialName or a Gateway API certificateRefs).
	TLS *GatewayTLS
}

// GatewayTLS is a gateway listener's TLS termination: the certificate of
// the Kubernetes Secret istiod served over SDS.
type GatewayTLS struct {
	// SecretName is the SDS resource: kubernetes://<name> (Istio
	// Gateway credentialName) or kubernetes-gateway://<ns>/<name> (Gateway
	// API certificateRefs).
	SecretName string
	// Certificate is the Secret's chain and key; nil when the Secret is
	// missing or refused (Chain.Err), and every handshake fails.
	Certificate *tls.Certificate
	// ServerNames are the SNI names the chain serves (filter_chain_match);
	// empty: any. Envoy matches no chain for another name and closes.
	ServerNames []string
	// ALPN are the protocols offered (h2, http/1.1).
	ALPN []string
	// MinVersion and MaxVersion are crypto/tls versions; zero: Go's
	// defaults (TLS 1.2 to 1.3, as Envoy's server defaults).
	MinVersion, MaxVersion uint16
}

// MatchesSNI reports whether the chain serves a ClientHello for name:
// exact, or a "*." wildcard for one more label (Envoy's server_names).
func (t *GatewayTLS) MatchesSNI(name string) bool {
	if len(t.ServerNames) == 0 {
		return true
	}
	name = strings.ToLower(strings.TrimSuffix(name, "."))
	for _, n := range t.ServerNames {
		n = strings.ToLower(n)
		if n == name {
			return true
		}
		if suffix, ok := strings.CutPrefix(n, "*"); ok && strings.HasSuffix(name, suffix) && len(name) > len(suffix) {
			return true
		}
	}
	return false
}

// errSecretMissing is a TLS chain's error until SDS delivered its
// Secret (Envoy keeps the listener warming; amber refuses connections).
var errSecretMissing = errors.New("TLS secret not received (yet)")

// compiledSecrets parses every SDS Secret once; each that fails is a
// problem of type SecretType.
func (b *builder) compiledSecrets(secrets []*tlsv3.Secret) func(name string) (*tls.Certificate, error) {
	type result struct {
		cert *tls.Certificate
		err  error
	}
	out := map[string]result{}
	for _, sec := range secrets {
		name := sec.GetName()
		if !b.checkResource(SecretType, name, sec) {
			out[name] = result{err: errors.New("secret refused (see its problems)")}
			continue
		}
		tc := sec.GetTlsCertificate()
		cert, err := tls.X509KeyPair(tc.GetCertificateChain().GetInlineBytes(), tc.GetPrivateKey().GetInlineBytes())
		if err != nil {
			// No key material in the message: the error names only what
			// failed to parse.
			err = fmt.Errorf("certificate chain and private key: %w", err)
			b.problem(SecretType, name, err)
			out[name] = result{err: fmt.Errorf("secret refused: %w", err)}
			continue
		}
		out[name] = result{cert: &cert}
	}
	return func(name string) (*tls.Certificate, error) {
		r, ok := out[name]
		if !ok {
			return nil, errSecretMissing
		}
		return r.cert, r.err
	}
}

// errRouteMissing is a gateway chain's error until RDS delivered its
// route configuration: Envoy keeps such a listener warming, amber refuses
// its requests (fail closed) and does not NACK the listener.
var errRouteMissing = errors.New("route configuration not received (yet)")

// compiledRoutes compiles every RDS route configuration once; each that
// fails is a problem of type RouteType.
func (b *builder) compiledRoutes(rcs []*routev3.RouteConfiguration) routeSource {
	type result struct {
		cfg *route.Config
		err error
	}
	out := map[string]result{}
	for _, rc := range rcs {
		name := rc.GetName()
		if !b.checkResource(RouteType, name, rc) {
			out[name] = result{err: errors.New("refused (see its problems)")}
			continue
		}
		c, err := route.New(rc)
		if err != nil {
			b.problem(RouteType, name, err)
			out[name] = result{err: fmt.Errorf("refused: %w", err)}
			continue
		}
		out[name] = result{cfg: c}
	}
	return func(name string) (*route.Config, error) {
		r, ok := out[name]
		if !ok {
			return nil, errRouteMissing
		}
		return r.cfg, r.err
	}
}

// routerListeners compiles a router's listeners: connect_originate as a
// waypoint's, every other one as a gateway socket listener.
func (b *builder) routerListeners(ls []*listenerv3.Listener, rcs []*routev3.RouteConfiguration, secrets []*tlsv3.Secret) {
	routes := b.compiledRoutes(rcs)
	b.secrets = b.compiledSecrets(secrets)
	for _, l := range ls {
		name := l.GetName()
		if name == ConnectOriginate {
			if err := b.originateListener(l); err != nil {
				b.problem(ListenerType, name, err)
			} else {
				b.originateListenerOK = true
			}
			continue
		}
		g := &Gateway{Name: name, Chain: &Chain{Name: name}}
		b.cfg.Gateways[name] = g
		if err := b.gatewayListener(l, g, routes); err != nil {
			g.Chain.HTTP = nil
			g.Chain.Err = err
			if !errors.Is(err, errRouteMissing) && !errors.Is(err, errSecretMissing) {
				b.problem(ListenerType, name, err)
			}
		}
	}
}

// gatewayListener compiles one socket listener: its addresses, one
// plain-text filter chain holding only the HTTP connection manager.
func (b *builder) gatewayListener(l *listenerv3.Listener, g *Gateway, routes routeSource) error {
	if !b.checkListener(l) {
		return errors.New("refused (see the problems above)")
	}
	if l.GetInternalListener() != nil || l.GetFilterChainMatcher() != nil {
		return errors.New("want a socket listener without filter chain matcher")
	}
	for i, lf := range l.GetListenerFilters() {
		// tls_inspector reads the SNI Envoy's chain match needs; amber's
		// TLS server reads it itself.
		if typeName(lf.GetTypedConfig()) != "envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector" {
			return fmt.Errorf("listener_filters[%d] %s: unsupported on a gateway listener", i, lf.GetName())
		}
	}
	var err error
	if g.Addresses, err = listenerAddresses(l); err != nil {
		return err
	}
	if len(l.GetFilterChains()) != 1 {
		return fmt.Errorf("%d filter chains: want one (several servers on one port by SNI are not supported)", len(l.GetFilterChains()))
	}
	fc := l.GetFilterChains()[0]
	if err := b.checkChain(l.GetName(), 0, fc); err != nil {
		return err
	}
	if ts := fc.GetTransportSocket(); ts != nil {
		t, err := gatewayTLS(ts, fc.GetFilterChainMatch().GetServerNames())
		if err != nil {
			return fmt.Errorf("filter_chains[0].transport_socket: %w", err)
		}
		// Set even without its certificate: the data path then refuses
		// the handshake rather than speak plain text on a TLS port.
		g.TLS = t
		if t.Certificate, err = b.secrets(t.SecretName); err != nil {
			return fmt.Errorf("filter_chains[0]: %s: %w", t.SecretName, err)
		}
	} else if fc.GetFilterChainMatch() != nil {
		return errors.New("filter_chains[0].filter_chain_match: only with TLS (SNI)")
	}
	fs := fc.GetFilters()
	if len(fs) != 1 || typeName(fs[0].GetTypedConfig()) != hcmType {
		return errors.New("filter_chains[0]: want one filter, the HTTP connection manager")
	}
	h, err := unpackHCM(fs[0])
	if err != nil {
		return fmt.Errorf("filter_chains[0].filters[0]: %w", err)
	}
	hc, err := compileHCM(h, routes)
	if err != nil {
		if errors.Is(err, errRouteMissing) {
			return err
		}
		return fmt.Errorf("filter_chains[0].filters[0]: %w", err)
	}
	g.Chain.HTTP = hc
	return nil
}

// GatewayAddresses lists every address a gateway listens on, sorted,
// each with its listener's name.
func (c *Config) GatewayAddresses() map[netip.AddrPort]string {
	out := map[netip.AddrPort]string{}
	names := make([]string, 0, len(c.Gateways))
	for n := range c.Gateways {
		names = append(names, n)
	}
	slices.Sort(names)
	for _, n := range names {
		for _, a := range c.Gateways[n].Addresses {
			if _, ok := out[a]; !ok {
				out[a] = n
			}
		}
	}
	return out
}

// gatewayTLS checks a gateway chain's TLS (pilot/pkg/networking/core
// gateway.go buildGatewayListenerTLSContext): one certificate from a
// Kubernetes Secret over SDS, no client certificate (MUTUAL and
// OPTIONAL_MUTUAL are not supported), ALPN and protocol versions.
func gatewayTLS(ts *corev3.TransportSocket, serverNames []string) (*GatewayTLS, error) {
	d, err := unpack[*tlsv3.DownstreamTlsContext](ts.GetTypedConfig())
	if err != nil {
		return nil, err
	}
	if d.GetRequireClientCertificate().GetValue() {
		return nil, errors.New("require_client_certificate: mutual TLS on a gateway is not supported")
	}
	c := d.GetCommonTlsContext()
	if c.GetCombinedValidationContext() != nil {
		return nil, errors.New("validation context: client certificates on a gateway are not supported")
	}
	certs := c.GetTlsCertificateSdsSecretConfigs()
	if len(certs) != 1 {
		return nil, fmt.Errorf("%d certificates: want one", len(certs))
	}
	name := certs[0].GetName()
	if !strings.HasPrefix(name, "kubernetes://") && !strings.HasPrefix(name, "kubernetes-gateway://") {
		return nil, fmt.Errorf("certificate %q: only Kubernetes Secrets istiod serves (kubernetes://, kubernetes-gateway://)", name)
	}
	if certs[0].GetSdsConfig().GetAds() == nil {
		return nil, fmt.Errorf("certificate %q: not over ADS", name)
	}
	t := &GatewayTLS{SecretName: name, ServerNames: serverNames, ALPN: c.GetAlpnProtocols()}
	versions := map[tlsv3.TlsParameters_TlsProtocol]uint16{
		tlsv3.TlsParameters_TLS_AUTO: 0, tlsv3.TlsParameters_TLSv1_2: tls.VersionTLS12, tlsv3.TlsParameters_TLSv1_3: tls.VersionTLS13,
	}
	var ok bool
	if t.MinVersion, ok = versions[c.GetTlsParams().GetTlsMinimumProtocolVersion()]; !ok {
		return nil, fmt.Errorf("tls_minimum_protocol_version %v: only TLS 1.2 and 1.3", c.GetTlsParams().GetTlsMinimumProtocolVersion())
	}
	if t.MaxVersion, ok = versions[c.GetTlsParams().GetTlsMaximumProtocolVersion()]; !ok {
		return nil, fmt.Errorf("tls_maximum_protocol_version %v: only TLS 1.2 and 1.3", c.GetTlsParams().GetTlsMaximumProtocolVersion())
	}
	if len(c.GetTlsParams().GetCipherSuites()) > 0 || len(c.GetTlsParams().GetEcdhCurves()) > 0 {
		return nil, errors.New("tls_params cipher_suites, ecdh_curves: not supported")
	}
	return t, nil
}
