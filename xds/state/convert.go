package state

import (
	"cmp"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strings"

	"github.com/amber-mesh/amber/tunnel/authz"
	"github.com/amber-mesh/amber/xds/workloadapi"
	"github.com/amber-mesh/amber/xds/workloadapi/security"
)

// ErrInvalid is wrapped by every *ValidationError.
var ErrInvalid = errors.New("invalid resource")

// ValidationError says why a resource cannot be used. The xDS client NACKs
// the resource with its text.
type ValidationError struct {
	// Kind is "workload", "service" or "authorization".
	Kind string
	// Name identifies the resource as far as it could be read.
	Name string
	// Field is the offending field path, e.g. "addresses[1]".
	Field string
	// Reason is what is wrong with it.
	Reason string
}

func (e *ValidationError) Error() string {
	return fmt.Sprintf("invalid %s %q: %s: %s", e.Kind, e.Name, e.Field, e.Reason)
}

func (e *ValidationError) Unwrap() error { return ErrInvalid }

// checker collects the first validation failure of one resource.
type checker struct {
	kind, name string
	err        *ValidationError
}

func (c *checker) fail(field, format string, args ...any) {
	if c.err == nil {
		c.err = &ValidationError{Kind: c.kind, Name: c.name, Field: field, Reason: fmt.Sprintf(format, args...)}
	}
}

func (c *checker) result() error {
	if c.err == nil {
		return nil
	}
	return c.err
}

// segment checks a name that is joined into "a/b" keys, so it cannot hold '/'.
func (c *checker) segment(field, v string) {
	switch {
	case v == "":
		c.fail(field, "empty")
	case strings.Contains(v, "/"):
		c.fail(field, "%q contains '/'", v)
	}
}

func (c *checker) port(field string, v uint32, allowZero bool) uint16 {
	if v > 65535 || (v == 0 && !allowZero) {
		c.fail(field, "port %d out of range", v)
		return 0
	}
	return uint16(v)
}

// addr decodes an address as the workload API sends it: raw network-order
// bytes, 4 for IPv4 and 16 for IPv6. IPv4-mapped IPv6 is unmapped so that a
// lookup by a connection's address finds it either way.
func (c *checker) addr(field string, b []byte) netip.Addr {
	a, ok := netip.AddrFromSlice(b)
	if !ok {
		c.fail(field, "%d bytes, want 4 (IPv4) or 16 (IPv6)", len(b))
		return netip.Addr{}
	}
	a = a.Unmap()
	if a.IsUnspecified() || a.IsMulticast() {
		c.fail(field, "%s is not a unicast address", a)
		return netip.Addr{}
	}
	return a
}

func (c *checker) enum(field string, d interface{ String() string }, known bool) {
	if !known {
		c.fail(field, "unknown value %s", d)
	}
}

func (c *checker) networkPrefix(field string, na *workloadapi.NetworkAddress) NetworkPrefix {
	if na == nil {
		c.fail(field, "missing")
		return NetworkPrefix{}
	}
	a := c.addr(field+".address", na.GetAddress())
	if !a.IsValid() {
		return NetworkPrefix{}
	}
	bits := a.BitLen()
	if na.Length != nil {
		if int(na.GetLength()) > a.BitLen() {
			c.fail(field+".length", "prefix length %d longer than %d", na.GetLength(), a.BitLen())
			return NetworkPrefix{}
		}
		bits = int(na.GetLength())
	}
	return NetworkPrefix{Network: na.GetNetwork(), Prefix: netip.PrefixFrom(a, bits).Masked()}
}

func (c *checker) gateway(field string, g *workloadapi.GatewayAddress) *GatewayAddress {
	if g == nil {
		return nil
	}
	out := &GatewayAddress{HBONEPort: c.port(field+".hbone_mtls_port", g.GetHboneMtlsPort(), true)}
	switch d := g.GetDestination().(type) {
	case *workloadapi.GatewayAddress_Hostname:
		if strings.Contains(d.Hostname.GetNamespace(), "/") {
			c.fail(field+".hostname.namespace", "%q contains '/'", d.Hostname.GetNamespace())
		}
		if d.Hostname.GetHostname() == "" {
			c.fail(field+".hostname.hostname", "empty")
		}
		out.Hostname = NamespacedHostname{Namespace: d.Hostname.GetNamespace(), Hostname: d.Hostname.GetHostname()}
	case *workloadapi.GatewayAddress_Address:
		a := c.addr(field+".address.address", d.Address.GetAddress())
		out.Address = NetworkAddr{Network: d.Address.GetNetwork(), Addr: a}
	default:
		c.fail(field, "neither hostname nor address")
	}
	return out
}

// serviceKey parses "namespace/hostname".
func (c *checker) serviceKey(field, k string) NamespacedHostname {
	ns, host, ok := strings.Cut(k, "/")
	if !ok || ns == "" || host == "" {
		c.fail(field, "%q is not namespace/hostname", k)
	}
	return NamespacedHostname{Namespace: ns, Hostname: host}
}

func knownEnum[E interface{ ~int32 }](m map[int32]string, v E) bool {
	_, ok := m[int32(v)]
	return ok
}

// NewWorkload validates a workload resource and converts it. The error is a
// *ValidationError naming the first problem found.
func NewWorkload(w *workloadapi.Workload) (*Workload, error) {
	c := &checker{kind: "workload", name: w.GetUid()}
	if w.GetUid() == "" {
		c.fail("uid", "empty")
	}
	c.segment("namespace", w.GetNamespace())
	if w.GetName() == "" {
		c.fail("name", "empty")
	}
	out := &Workload{
		UID:               w.GetUid(),
		Name:              w.GetName(),
		Namespace:         w.GetNamespace(),
		ServiceAccount:    cmp.Or(w.GetServiceAccount(), DefaultServiceAccount),
		TrustDomain:       cmp.Or(w.GetTrustDomain(), DefaultTrustDomain),
		Node:              w.GetNode(),
		Network:           w.GetNetwork(),
		ClusterID:         cmp.Or(w.GetClusterId(), DefaultClusterID),
		Hostname:          w.GetHostname(),
		HostNetwork:       w.GetNetworkMode() == workloadapi.NetworkMode_HOST_NETWORK,
		NativeTunnel:      w.GetNativeTunnel(),
		Healthy:           w.GetStatus() == workloadapi.WorkloadStatus_HEALTHY,
		Capacity:          1,
		CanonicalName:     w.GetCanonicalName(),
		CanonicalRevision: w.GetCanonicalRevision(),
		WorkloadName:      w.GetWorkloadName(),
		WorkloadType:      strings.ToLower(w.GetWorkloadType().String()),
	}
	if strings.Contains(out.ServiceAccount, "/") {
		c.fail("service_account", "%q contains '/'", out.ServiceAccount)
	}
	// Something must say how to reach the workload: its addresses, a
	// hostname, or (for workloads in another network, which istiod sends
	// without either) a network gateway.
	if len(w.GetAddresses()) == 0 && w.GetHostname() == "" && w.GetNetworkGateway() == nil {
		c.fail("addresses", "no addresses, hostname or network gateway")
	}
	for i, b := range w.GetAddresses() {
		a := c.addr(fmt.Sprintf("addresses[%d]", i), b)
		if a.IsValid() && slices.Contains(out.Addresses, a) {
			c.fail(fmt.Sprintf("addresses[%d]", i), "duplicate address %s", a)
		}
		out.Addresses = append(out.Addresses, a)
	}

	// An unknown protocol is one we cannot speak: reject rather than guess.
	switch p := w.GetTunnelProtocol(); p {
	case workloadapi.TunnelProtocol_NONE:
		out.Protocol = ProtocolTCP
	case workloadapi.TunnelProtocol_HBONE:
		out.Protocol = ProtocolHBONE
	case workloadapi.TunnelProtocol_LEGACY_ISTIO_MTLS:
		out.Protocol = ProtocolLegacyIstioMTLS
	default:
		c.fail("tunnel_protocol", "unknown value %d", int32(p))
	}
	c.enum("network_mode", w.GetNetworkMode(), knownEnum(workloadapi.NetworkMode_name, w.GetNetworkMode()))
	c.enum("status", w.GetStatus(), knownEnum(workloadapi.WorkloadStatus_name, w.GetStatus()))

	out.Waypoint = c.gateway("waypoint", w.GetWaypoint())
	out.NetworkGateway = c.gateway("network_gateway", w.GetNetworkGateway())

	if at := w.GetApplicationTunnel(); at != nil {
		c.enum("application_tunnel.protocol", at.GetProtocol(), knownEnum(workloadapi.ApplicationTunnel_Protocol_name, at.GetProtocol()))
		out.ApplicationTunnel = &ApplicationTunnel{
			PROXY: at.GetProtocol() == workloadapi.ApplicationTunnel_PROXY,
			Port:  c.port("application_tunnel.port", at.GetPort(), true),
		}
	}

	if len(w.GetServices()) > 0 {
		out.Services = make(map[NamespacedHostname]map[uint16]uint16, len(w.GetServices()))
		for k, pl := range w.GetServices() {
			field := fmt.Sprintf("services[%q]", k)
			key := c.serviceKey(field, k)
			ports := make(map[uint16]uint16, len(pl.GetPorts()))
			for i, p := range pl.GetPorts() {
				pf := fmt.Sprintf("%s.ports[%d]", field, i)
				sp := c.port(pf+".service_port", p.GetServicePort(), false)
				ports[sp] = c.port(pf+".target_port", p.GetTargetPort(), true)
			}
			out.Services[key] = ports
		}
	}

	for i, k := range w.GetAuthorizationPolicies() {
		if ns, name, ok := strings.Cut(k, "/"); !ok || ns == "" || name == "" {
			c.fail(fmt.Sprintf("authorization_policies[%d]", i), "%q is not namespace/name", k)
		}
	}
	out.AuthorizationPolicies = slices.Clone(w.GetAuthorizationPolicies())

	if l := w.GetLocality(); l != nil {
		out.Locality = Locality{Region: l.GetRegion(), Zone: l.GetZone(), Subzone: l.GetSubzone()}
	}
	if w.GetCapacity() != nil {
		out.Capacity = w.GetCapacity().GetValue()
	}
	if err := c.result(); err != nil {
		return nil, err
	}
	return out, nil
}

// NewService validates a service resource and converts it.
func NewService(s *workloadapi.Service) (*Service, error) {
	c := &checker{kind: "service", name: s.GetNamespace() + "/" + s.GetHostname()}
	c.segment("namespace", s.GetNamespace())
	if s.GetHostname() == "" {
		c.fail("hostname", "empty")
	}
	out := &Service{
		Name:               s.GetName(),
		Namespace:          s.GetNamespace(),
		Hostname:           s.GetHostname(),
		SubjectAltNames:    slices.Clone(s.GetSubjectAltNames()),
		IPFamilies:         s.GetIpFamilies(),
		Canonical:          s.GetCanonical(),
		IngressUseWaypoint: s.GetIngressUseWaypoint(),
		NamespaceOnly:      s.GetVisibility() == workloadapi.Service_NAMESPACE,
		Ports:              make(map[uint16]Port, len(s.GetPorts())),
	}
	for i, na := range s.GetAddresses() {
		field := fmt.Sprintf("addresses[%d]", i)
		p := c.networkPrefix(field, na)
		if p.Prefix.IsValid() && slices.Contains(out.VIPs, p) {
			c.fail(field, "duplicate address %s", p)
		}
		out.VIPs = append(out.VIPs, p)
	}
	for i, p := range s.GetPorts() {
		field := fmt.Sprintf("ports[%d]", i)
		sp := c.port(field+".service_port", p.GetServicePort(), false)
		c.enum(field+".app_protocol", p.GetAppProtocol(), knownEnum(workloadapi.AppProtocol_name, p.GetAppProtocol()))
		port := Port{
			ServicePort: sp,
			TargetPort:  c.port(field+".target_port", p.GetTargetPort(), true),
			AppProtocol: p.GetAppProtocol(),
		}
		// The API has no L4 protocol: istiod lists a port a Service has
		// for both UDP and TCP (DNS's 53) twice, the app protocols told
		// from the port names. The same target is one port (the first
		// entry's protocol); different targets are ambiguous.
		if prev, dup := out.Ports[sp]; dup && sp != 0 {
			if prev.TargetPort != port.TargetPort {
				c.fail(field+".service_port", "port %d listed twice with different targets (%d, %d)", sp, prev.TargetPort, port.TargetPort)
			}
			continue
		}
		out.Ports[sp] = port
	}
	out.Waypoint = c.gateway("waypoint", s.GetWaypoint())
	for i, ww := range s.GetWeightedWaypoints() {
		field := fmt.Sprintf("weighted_waypoints[%d]", i)
		g := c.gateway(field+".destination", ww.GetDestination())
		if g == nil {
			c.fail(field+".destination", "missing")
			continue
		}
		out.WeightedWaypoints = append(out.WeightedWaypoints, WeightedWaypoint{Waypoint: *g, Weight: ww.GetWeight()})
	}
	if lb := s.GetLoadBalancing(); lb != nil {
		c.enum("load_balancing.mode", lb.GetMode(), knownEnum(workloadapi.LoadBalancing_Mode_name, lb.GetMode()))
		c.enum("load_balancing.health_policy", lb.GetHealthPolicy(), knownEnum(workloadapi.LoadBalancing_HealthPolicy_name, lb.GetHealthPolicy()))
		out.LoadBalancing = &LoadBalancing{
			RoutingPreference: slices.Clone(lb.GetRoutingPreference()),
			Mode:              lb.GetMode(),
			HealthPolicy:      lb.GetHealthPolicy(),
		}
	}
	c.enum("ip_families", s.GetIpFamilies(), knownEnum(workloadapi.IPFamilies_name, s.GetIpFamilies()))
	c.enum("visibility", s.GetVisibility(), knownEnum(workloadapi.Service_Visibility_name, s.GetVisibility()))
	if err := c.result(); err != nil {
		return nil, err
	}
	return out, nil
}

// NewAuthorization validates a workload API policy and compiles it for
// evaluation. A malformed policy is an error (the client NACKs it): an
// enforcer given one could only guess. Content the policy model has no
// field for (extensions, dry-run) is not an error: the policy is compiled
// fail-closed rather than silently widened, and its Err says why.
func NewAuthorization(a *security.Authorization) (*authz.Policy, error) {
	c := &checker{kind: "authorization", name: a.GetNamespace() + "/" + a.GetName()}
	c.segment("namespace", a.GetNamespace())
	c.segment("name", a.GetName())
	c.enum("scope", a.GetScope(), knownEnum(security.Scope_name, a.GetScope()))
	c.enum("action", a.GetAction(), knownEnum(security.Action_name, a.GetAction()))
	out := authz.Authorization{
		Name:      a.GetName(),
		Namespace: a.GetNamespace(),
		Scope:     authz.Scope(a.GetScope()),
		Action:    authz.Action(a.GetAction()),
	}
	switch {
	case len(a.GetExtensions()) > 0:
		out.Unsupported = "policy extensions"
	case a.GetDryRun():
		// A dry-run policy must not change traffic; istiod does not send
		// them to ztunnels today. Fail closed if one arrives anyway.
		out.Unsupported = "dry-run policy"
	}
	for gi, g := range a.GetGroups() {
		var og authz.Group
		for ri, r := range g.GetRules() {
			var or authz.Rules
			for mi, m := range r.GetMatches() {
				if len(m.GetExtensions()) > 0 && out.Unsupported == "" {
					out.Unsupported = "match extensions"
				}
				or.Matches = append(or.Matches, c.match(fmt.Sprintf("groups[%d].rules[%d].matches[%d]", gi, ri, mi), m))
			}
			og.Rules = append(og.Rules, or)
		}
		out.Groups = append(out.Groups, og)
	}
	if err := c.result(); err != nil {
		return nil, err
	}
	return authz.Compile(out), nil
}

// RejectedAuthorization returns the stand-in enforced for policy key when
// the client refused its latest version for reason (see
// Txn.RejectAuthorization): read holds what decoded of it, or is nil when
// nothing did. Its scope and action are taken from read even when they
// are values this proto does not know (authz treats those fail-closed);
// without read they are unknown, which applies the stand-in to key's
// namespace and denies there.
func RejectedAuthorization(key string, read *security.Authorization, reason string) *authz.Policy {
	scope, action := authz.ScopeUnknown, authz.ActionUnknown
	if read != nil {
		scope, action = authz.Scope(read.GetScope()), authz.Action(read.GetAction())
	}
	return authz.Rejected(key, scope, action, reason)
}

// match converts one Match. Fields are read in the order their failures
// are reported.
func (c *checker) match(field string, m *security.Match) authz.Match {
	return authz.Match{
		Namespaces:          c.stringMatches(field+".namespaces", m.GetNamespaces()),
		NotNamespaces:       c.stringMatches(field+".not_namespaces", m.GetNotNamespaces()),
		Principals:          c.stringMatches(field+".principals", m.GetPrincipals()),
		NotPrincipals:       c.stringMatches(field+".not_principals", m.GetNotPrincipals()),
		ServiceAccounts:     c.accounts(field+".service_accounts", m.GetServiceAccounts()),
		NotServiceAccounts:  c.accounts(field+".not_service_accounts", m.GetNotServiceAccounts()),
		SourceIPs:           c.cidrs(field+".source_ips", m.GetSourceIps()),
		NotSourceIPs:        c.cidrs(field+".not_source_ips", m.GetNotSourceIps()),
		DestinationIPs:      c.cidrs(field+".destination_ips", m.GetDestinationIps()),
		NotDestinationIPs:   c.cidrs(field+".not_destination_ips", m.GetNotDestinationIps()),
		DestinationPorts:    c.ports(field+".destination_ports", m.GetDestinationPorts()),
		NotDestinationPorts: c.ports(field+".not_destination_ports", m.GetNotDestinationPorts()),
	}
}

func (c *checker) stringMatches(field string, in []*security.StringMatch) []authz.StringMatch {
	var out []authz.StringMatch
	for i, s := range in {
		var sm authz.StringMatch
		switch t := s.GetMatchType().(type) {
		case *security.StringMatch_Exact:
			sm = authz.Exact(t.Exact)
		case *security.StringMatch_Prefix:
			sm = authz.Prefix(t.Prefix)
		case *security.StringMatch_Suffix:
			sm = authz.Suffix(t.Suffix)
		case *security.StringMatch_Presence:
			sm = authz.Presence()
		default:
			c.fail(fmt.Sprintf("%s[%d]", field, i), "no match type")
		}
		out = append(out, sm)
	}
	return out
}

func (c *checker) accounts(field string, in []*security.ServiceAccountMatch) []authz.ServiceAccountMatch {
	var out []authz.ServiceAccountMatch
	for i, sa := range in {
		f := fmt.Sprintf("%s[%d]", field, i)
		c.segment(f+".namespace", sa.GetNamespace())
		c.segment(f+".serviceAccount", sa.GetServiceAccount())
		out = append(out, authz.ServiceAccountMatch{Namespace: sa.GetNamespace(), ServiceAccount: sa.GetServiceAccount()})
	}
	return out
}

// cidrs checks prefixes against the address as sent, not unmapped as
// c.addr would: ::ffff:10.0.0.0/104 is a valid prefix (authz matches it as
// 10.0.0.0/8).
func (c *checker) cidrs(field string, in []*security.Address) []authz.Address {
	var out []authz.Address
	for i, a := range in {
		f := fmt.Sprintf("%s[%d]", field, i)
		if ip, ok := netip.AddrFromSlice(a.GetAddress()); !ok {
			c.fail(f+".address", "%d bytes, want 4 (IPv4) or 16 (IPv6)", len(a.GetAddress()))
		} else if int(a.GetLength()) > ip.BitLen() {
			c.fail(f+".length", "prefix length %d longer than %d", a.GetLength(), ip.BitLen())
		}
		out = append(out, authz.Address{Address: append([]byte(nil), a.GetAddress()...), Length: a.GetLength()})
	}
	return out
}

func (c *checker) ports(field string, in []uint32) []uint32 {
	for i, p := range in {
		c.port(fmt.Sprintf("%s[%d]", field, i), p, true)
	}
	return append([]uint32(nil), in...)
}
