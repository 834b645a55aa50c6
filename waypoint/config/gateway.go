package config

import (
	"errors"
	"fmt"
	"net/netip"
	"slices"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"

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
func (b *builder) routerListeners(ls []*listenerv3.Listener, rcs []*routev3.RouteConfiguration) {
	routes := b.compiledRoutes(rcs)
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
			if !errors.Is(err, errRouteMissing) {
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
	if l.GetInternalListener() != nil || l.GetFilterChainMatcher() != nil || len(l.GetListenerFilters()) > 0 {
		return errors.New("want a socket listener without listener filters or filter chain matcher")
	}
	addrs := []*corev3.Address{l.GetAddress()}
	for _, a := range l.GetAdditionalAddresses() {
		addrs = append(addrs, a.GetAddress())
	}
	for _, a := range addrs {
		ap, err := socketAddress(a)
		if err != nil {
			return fmt.Errorf("address: %w", err)
		}
		g.Addresses = append(g.Addresses, ap)
	}
	if len(l.GetFilterChains()) != 1 {
		return fmt.Errorf("%d filter chains: want one (several servers on one port by SNI are not supported)", len(l.GetFilterChains()))
	}
	fc := l.GetFilterChains()[0]
	if err := b.checkChain(l.GetName(), 0, fc); err != nil {
		return err
	}
	if fc.GetFilterChainMatch() != nil {
		return errors.New("filter_chains[0].filter_chain_match: unsupported")
	}
	if fc.GetTransportSocket() != nil {
		return errors.New("filter_chains[0].transport_socket: TLS on a gateway listener is not supported")
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
