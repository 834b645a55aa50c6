package server

import (
	"bytes"
	"cmp"
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strconv"
	"strings"

	"google.golang.org/protobuf/types/known/emptypb"
	"sigs.k8s.io/yaml"

	"github.com/amber-mesh/amber/xds/workloadapi"
	"github.com/amber-mesh/amber/xds/workloadapi/security"
)

// Defaults of the mesh file.
const (
	defaultNamespace     = "default"
	defaultRootNamespace = "istio-system"
	defaultTrustDomain   = "cluster.local"
	defaultClusterID     = "Kubernetes"
	defaultHBONEPort     = 15008
)

// Resources is a parsed mesh file: workload API resources by resource name.
type Resources struct {
	// Addresses are workloads (by uid) and services (by
	// "namespace/hostname").
	Addresses map[string]*workloadapi.Address
	// Authorizations are policies by "namespace/name".
	Authorizations map[string]*security.Authorization
	// Warnings are accepted-but-surprising constructs, such as HTTP fields
	// that the ztunnel cannot enforce.
	Warnings []string
}

// The YAML schema. Field names follow Kubernetes and Istio spelling so that
// rules can be pasted from an AuthorizationPolicy.
type meshFile struct {
	RootNamespace string         `json:"rootNamespace"`
	Workloads     []workloadSpec `json:"workloads"`
	Services      []serviceSpec  `json:"services"`
	Policies      []policySpec   `json:"policies"`
}

type workloadSpec struct {
	Name              string            `json:"name"`
	Namespace         string            `json:"namespace"`
	UID               string            `json:"uid"`
	ServiceAccount    string            `json:"serviceAccount"`
	TrustDomain       string            `json:"trustDomain"`
	Addresses         []string          `json:"addresses"`
	Hostname          string            `json:"hostname"`
	Network           string            `json:"network"`
	Node              string            `json:"node"`
	Protocol          string            `json:"protocol"`
	Labels            map[string]string `json:"labels"`
	Services          []serviceRef      `json:"services"`
	Waypoint          *waypointSpec     `json:"waypoint"`
	WorkloadName      string            `json:"workloadName"`
	CanonicalName     string            `json:"canonicalName"`
	CanonicalRevision string            `json:"canonicalRevision"`
}

type serviceRef struct {
	Service string     `json:"service"`
	Ports   []portSpec `json:"ports"`
}

type portSpec struct {
	Port        uint16 `json:"port"`
	TargetPort  uint16 `json:"targetPort"`
	AppProtocol string `json:"appProtocol"`
}

type waypointSpec struct {
	Address   string `json:"address"`
	Network   string `json:"network"`
	Hostname  string `json:"hostname"`
	Namespace string `json:"namespace"`
	Port      uint16 `json:"port"`
}

type serviceSpec struct {
	Name      string        `json:"name"`
	Namespace string        `json:"namespace"`
	Hostname  string        `json:"hostname"`
	Addresses []string      `json:"addresses"`
	Network   string        `json:"network"`
	Ports     []portSpec    `json:"ports"`
	Waypoint  *waypointSpec `json:"waypoint"`
}

type policySpec struct {
	Name      string        `json:"name"`
	Namespace string        `json:"namespace"`
	Scope     string        `json:"scope"`
	Selector  *selectorSpec `json:"selector"`
	Action    string        `json:"action"`
	DryRun    bool          `json:"dryRun"`
	Rules     []ruleSpec    `json:"rules"`
}

type selectorSpec struct {
	MatchLabels map[string]string `json:"matchLabels"`
}

type ruleSpec struct {
	From []fromSpec      `json:"from"`
	To   []toSpec        `json:"to"`
	When []conditionSpec `json:"when"`
}

type fromSpec struct {
	Source sourceSpec `json:"source"`
}

type toSpec struct {
	Operation operationSpec `json:"operation"`
}

type sourceSpec struct {
	Principals         []string `json:"principals"`
	NotPrincipals      []string `json:"notPrincipals"`
	Namespaces         []string `json:"namespaces"`
	NotNamespaces      []string `json:"notNamespaces"`
	ServiceAccounts    []string `json:"serviceAccounts"`
	NotServiceAccounts []string `json:"notServiceAccounts"`
	IPBlocks           []string `json:"ipBlocks"`
	NotIPBlocks        []string `json:"notIpBlocks"`
	// HTTP-only (need a waypoint).
	RequestPrincipals    []string `json:"requestPrincipals"`
	NotRequestPrincipals []string `json:"notRequestPrincipals"`
	RemoteIPBlocks       []string `json:"remoteIpBlocks"`
	NotRemoteIPBlocks    []string `json:"notRemoteIpBlocks"`
}

type operationSpec struct {
	Ports    []scalar `json:"ports"`
	NotPorts []scalar `json:"notPorts"`
	// HTTP-only (need a waypoint).
	Hosts      []string `json:"hosts"`
	NotHosts   []string `json:"notHosts"`
	Methods    []string `json:"methods"`
	NotMethods []string `json:"notMethods"`
	Paths      []string `json:"paths"`
	NotPaths   []string `json:"notPaths"`
}

type conditionSpec struct {
	Key       string   `json:"key"`
	Values    []scalar `json:"values"`
	NotValues []scalar `json:"notValues"`
}

// scalar is a string that may be written as a YAML number: Istio spells
// ports as strings, people write `ports: [8080]`.
type scalar string

func (s *scalar) UnmarshalJSON(b []byte) error {
	if len(b) > 0 && b[0] == '"' {
		var v string
		if err := json.Unmarshal(b, &v); err != nil {
			return err
		}
		*s = scalar(v)
		return nil
	}
	var n json.Number
	d := json.NewDecoder(bytes.NewReader(b))
	d.UseNumber()
	if err := d.Decode(&n); err != nil {
		return fmt.Errorf("want a string or a number, got %s", b)
	}
	*s = scalar(n.String())
	return nil
}

// ParseMesh parses a mesh file (format in the package doc) into workload API
// resources. It is strict: unknown fields, duplicate keys and bad values
// are errors, and every problem found is reported.
func ParseMesh(data []byte) (*Resources, error) {
	var f meshFile
	if err := yaml.UnmarshalStrict(data, &f); err != nil {
		return nil, fmt.Errorf("parse mesh file: %w", err)
	}
	p := &meshParser{
		root:        cmp.Or(f.RootNamespace, defaultRootNamespace),
		out:         &Resources{Addresses: make(map[string]*workloadapi.Address), Authorizations: make(map[string]*security.Authorization)},
		services:    make(map[string]*workloadapi.Service),
		addrs:       make(map[string]string),
		policyNames: make(map[string]bool),
	}
	for i := range f.Services {
		p.service(i, &f.Services[i])
	}
	var selectors []selected
	for i := range f.Policies {
		if sel, ok := p.policy(i, &f.Policies[i]); ok && sel.labels != nil {
			selectors = append(selectors, sel)
		}
	}
	for i := range f.Workloads {
		p.workload(i, &f.Workloads[i], selectors)
	}
	if len(p.errs) > 0 {
		return nil, fmt.Errorf("mesh file: %w", errors.Join(p.errs...))
	}
	return p.out, nil
}

type meshParser struct {
	root        string
	out         *Resources
	services    map[string]*workloadapi.Service // by "namespace/name"
	addrs       map[string]string               // "network/ip" -> owner, to catch clashes
	policyNames map[string]bool
	errs        []error
}

// selected is a selector policy, to attach to the workloads it selects.
type selected struct {
	key, namespace string
	labels         map[string]string
}

func (p *meshParser) errorf(where, format string, args ...any) {
	p.errs = append(p.errs, fmt.Errorf("%s: %s", where, fmt.Sprintf(format, args...)))
}

func (p *meshParser) claim(where, network string, a netip.Addr, owner string) {
	k := network + "/" + a.String()
	if prev, ok := p.addrs[k]; ok {
		p.errorf(where, "address %s already used by %s", a, prev)
		return
	}
	p.addrs[k] = owner
}

func (p *meshParser) service(i int, s *serviceSpec) {
	ns := cmp.Or(s.Namespace, defaultNamespace)
	where := fmt.Sprintf("services[%d] (%s/%s)", i, ns, s.Name)
	if s.Name == "" {
		p.errorf(where, "name is required")
		return
	}
	svc := &workloadapi.Service{
		Name:      s.Name,
		Namespace: ns,
		Hostname:  cmp.Or(s.Hostname, s.Name+"."+ns+".svc.cluster.local"),
	}
	for _, a := range s.Addresses {
		na, err := parseNetworkAddress(a, s.Network)
		if err != nil {
			p.errorf(where, "%v", err)
			continue
		}
		if na.Length == nil {
			ip, _ := netip.AddrFromSlice(na.Address)
			p.claim(where, s.Network, ip, "service "+ns+"/"+s.Name)
		}
		svc.Addresses = append(svc.Addresses, na)
	}
	seen := make(map[uint16]bool)
	for j, ps := range s.Ports {
		pw := fmt.Sprintf("%s: ports[%d]", where, j)
		if ps.Port == 0 {
			p.errorf(pw, "port is required")
			continue
		}
		if seen[ps.Port] {
			p.errorf(pw, "duplicate port %d", ps.Port)
			continue
		}
		seen[ps.Port] = true
		ap, err := parseAppProtocol(ps.AppProtocol)
		if err != nil {
			p.errorf(pw, "%v", err)
		}
		svc.Ports = append(svc.Ports, &workloadapi.Port{
			ServicePort: uint32(ps.Port),
			TargetPort:  uint32(cmp.Or(ps.TargetPort, ps.Port)),
			AppProtocol: ap,
		})
	}
	if s.Waypoint != nil {
		gw, err := gatewayAddress(s.Waypoint, ns)
		if err != nil {
			p.errorf(where, "waypoint: %v", err)
		}
		svc.Waypoint = gw
	}
	key := ns + "/" + s.Name
	if _, dup := p.services[key]; dup {
		p.errorf(where, "duplicate service")
		return
	}
	p.services[key] = svc
	name := svc.Namespace + "/" + svc.Hostname
	if _, dup := p.out.Addresses[name]; dup {
		p.errorf(where, "hostname %s already used", svc.Hostname)
		return
	}
	p.out.Addresses[name] = &workloadapi.Address{Type: &workloadapi.Address_Service{Service: svc}}
}

func (p *meshParser) workload(i int, w *workloadSpec, selectors []selected) {
	ns := cmp.Or(w.Namespace, defaultNamespace)
	where := fmt.Sprintf("workloads[%d] (%s/%s)", i, ns, w.Name)
	if w.Name == "" {
		p.errorf(where, "name is required")
		return
	}
	wl := &workloadapi.Workload{
		Uid:               cmp.Or(w.UID, defaultClusterID+"//Pod/"+ns+"/"+w.Name),
		Name:              w.Name,
		Namespace:         ns,
		ServiceAccount:    cmp.Or(w.ServiceAccount, "default"),
		TrustDomain:       cmp.Or(w.TrustDomain, defaultTrustDomain),
		Hostname:          w.Hostname,
		Network:           w.Network,
		Node:              w.Node,
		ClusterId:         defaultClusterID,
		WorkloadType:      workloadapi.WorkloadType_POD,
		WorkloadName:      cmp.Or(w.WorkloadName, w.Name),
		CanonicalName:     cmp.Or(w.CanonicalName, w.Labels["app"], w.WorkloadName, w.Name),
		CanonicalRevision: cmp.Or(w.CanonicalRevision, w.Labels["version"], "latest"),
	}
	switch strings.ToUpper(w.Protocol) {
	case "", "HBONE":
		wl.TunnelProtocol = workloadapi.TunnelProtocol_HBONE
	case "TCP":
		wl.TunnelProtocol = workloadapi.TunnelProtocol_NONE
	default:
		p.errorf(where, "protocol %q: want HBONE or TCP", w.Protocol)
	}
	for _, s := range w.Addresses {
		a, err := netip.ParseAddr(s)
		if err != nil || a.Zone() != "" {
			p.errorf(where, "address %q is not an IP address", s)
			continue
		}
		a = a.Unmap()
		p.claim(where, w.Network, a, "workload "+ns+"/"+w.Name)
		wl.Addresses = append(wl.Addresses, a.AsSlice())
	}
	if len(wl.Addresses) == 0 && w.Hostname == "" {
		p.errorf(where, "needs addresses or a hostname")
	}
	for j, ref := range w.Services {
		rw := fmt.Sprintf("%s: services[%d]", where, j)
		sns, sname, ok := strings.Cut(ref.Service, "/")
		if !ok {
			sns, sname = ns, ref.Service
		}
		svc := p.services[sns+"/"+sname]
		if svc == nil {
			p.errorf(rw, "no service %s/%s in services", sns, sname)
			continue
		}
		pl := &workloadapi.PortList{}
		if len(ref.Ports) == 0 {
			// Same mapping as the service.
			for _, sp := range svc.Ports {
				pl.Ports = append(pl.Ports, &workloadapi.Port{ServicePort: sp.ServicePort, TargetPort: sp.TargetPort})
			}
		}
		for k, ps := range ref.Ports {
			if !slices.ContainsFunc(svc.Ports, func(sp *workloadapi.Port) bool { return sp.ServicePort == uint32(ps.Port) }) {
				p.errorf(fmt.Sprintf("%s: ports[%d]", rw, k), "service %s/%s has no port %d", sns, sname, ps.Port)
				continue
			}
			if ps.AppProtocol != "" {
				p.errorf(fmt.Sprintf("%s: ports[%d]", rw, k), "appProtocol belongs on the service port")
			}
			pl.Ports = append(pl.Ports, &workloadapi.Port{ServicePort: uint32(ps.Port), TargetPort: uint32(cmp.Or(ps.TargetPort, ps.Port))})
		}
		if wl.Services == nil {
			wl.Services = make(map[string]*workloadapi.PortList)
		}
		wl.Services[svc.Namespace+"/"+svc.Hostname] = pl
	}
	if w.Waypoint != nil {
		gw, err := gatewayAddress(w.Waypoint, ns)
		if err != nil {
			p.errorf(where, "waypoint: %v", err)
		}
		wl.Waypoint = gw
	}
	// Selector policies of the workload's namespace or the root namespace
	// apply when all their labels match, as in istiod.
	for _, sel := range selectors {
		if sel.namespace != ns && sel.namespace != p.root {
			continue
		}
		matches := true
		for k, v := range sel.labels {
			if got, ok := w.Labels[k]; !ok || got != v {
				matches = false
				break
			}
		}
		if matches {
			wl.AuthorizationPolicies = append(wl.AuthorizationPolicies, sel.key)
		}
	}
	slices.Sort(wl.AuthorizationPolicies)
	if _, dup := p.out.Addresses[wl.Uid]; dup {
		p.errorf(where, "duplicate workload uid %s", wl.Uid)
		return
	}
	p.out.Addresses[wl.Uid] = &workloadapi.Address{Type: &workloadapi.Address_Workload{Workload: wl}}
}

func parseNetworkAddress(s, network string) (*workloadapi.NetworkAddress, error) {
	if strings.Contains(s, "/") {
		pfx, err := netip.ParsePrefix(s)
		if err != nil {
			return nil, fmt.Errorf("address %q is not an IP or CIDR", s)
		}
		pfx = pfx.Masked()
		if pfx.IsSingleIP() {
			return &workloadapi.NetworkAddress{Network: network, Address: pfx.Addr().AsSlice()}, nil
		}
		bits := uint32(pfx.Bits())
		return &workloadapi.NetworkAddress{Network: network, Address: pfx.Addr().AsSlice(), Length: &bits}, nil
	}
	a, err := netip.ParseAddr(s)
	if err != nil || a.Zone() != "" {
		return nil, fmt.Errorf("address %q is not an IP or CIDR", s)
	}
	return &workloadapi.NetworkAddress{Network: network, Address: a.Unmap().AsSlice()}, nil
}

func parseAppProtocol(s string) (workloadapi.AppProtocol, error) {
	if s == "" {
		return workloadapi.AppProtocol_UNKNOWN, nil
	}
	v, ok := workloadapi.AppProtocol_value[strings.ToUpper(s)]
	if !ok {
		return 0, fmt.Errorf("appProtocol %q: want one of HTTP11, HTTP2, GRPC, TCP, TLS", s)
	}
	return workloadapi.AppProtocol(v), nil
}

func gatewayAddress(w *waypointSpec, ns string) (*workloadapi.GatewayAddress, error) {
	gw := &workloadapi.GatewayAddress{HboneMtlsPort: uint32(cmp.Or(w.Port, defaultHBONEPort))}
	switch {
	case w.Address != "" && w.Hostname != "":
		return nil, errors.New("set address or hostname, not both")
	case w.Address != "":
		a, err := netip.ParseAddr(w.Address)
		if err != nil || a.Zone() != "" {
			return nil, fmt.Errorf("address %q is not an IP address", w.Address)
		}
		if w.Namespace != "" {
			return nil, errors.New("namespace goes with hostname, not address")
		}
		gw.Destination = &workloadapi.GatewayAddress_Address{Address: &workloadapi.NetworkAddress{Network: w.Network, Address: a.Unmap().AsSlice()}}
	case w.Hostname != "":
		if w.Network != "" {
			return nil, errors.New("network goes with address, not hostname")
		}
		gw.Destination = &workloadapi.GatewayAddress_Hostname{Hostname: &workloadapi.NamespacedHostname{
			Namespace: cmp.Or(w.Namespace, ns),
			Hostname:  w.Hostname,
		}}
	default:
		return nil, errors.New("needs an address or a hostname")
	}
	return gw, nil
}

func (p *meshParser) policy(i int, s *policySpec) (selected, bool) {
	ns := cmp.Or(s.Namespace, defaultNamespace)
	where := fmt.Sprintf("policies[%d] (%s/%s)", i, ns, s.Name)
	if s.Name == "" {
		p.errorf(where, "name is required")
		return selected{}, false
	}
	key := ns + "/" + s.Name
	if p.policyNames[key] {
		p.errorf(where, "duplicate policy")
		return selected{}, false
	}
	p.policyNames[key] = true
	nerr := len(p.errs)

	pol := &security.Authorization{Name: s.Name, Namespace: ns, DryRun: s.DryRun}
	switch strings.ToUpper(s.Action) {
	case "", "ALLOW":
		pol.Action = security.Action_ALLOW
	case "DENY":
		pol.Action = security.Action_DENY
	default:
		// istiod refuses AUDIT and CUSTOM for ztunnel too.
		p.errorf(where, "action %q: the ztunnel supports ALLOW and DENY", s.Action)
	}

	// Scope as istiod derives it: a selector makes a workload policy, the
	// root namespace a mesh-wide one. An explicit scope must agree.
	hasSelector := s.Selector != nil
	if hasSelector && len(s.Selector.MatchLabels) == 0 {
		p.errorf(where, "selector needs matchLabels")
	}
	switch {
	case hasSelector:
		pol.Scope = security.Scope_WORKLOAD_SELECTOR
	case ns == p.root:
		pol.Scope = security.Scope_GLOBAL
	default:
		pol.Scope = security.Scope_NAMESPACE
	}
	switch strings.ToUpper(strings.ReplaceAll(s.Scope, "_", "")) {
	case "":
	case "GLOBAL":
		pol.Scope = security.Scope_GLOBAL
	case "NAMESPACE":
		pol.Scope = security.Scope_NAMESPACE
	case "WORKLOADSELECTOR":
		pol.Scope = security.Scope_WORKLOAD_SELECTOR
	default:
		p.errorf(where, "scope %q: want Global, Namespace or WorkloadSelector", s.Scope)
	}
	if hasSelector != (pol.Scope == security.Scope_WORKLOAD_SELECTOR) {
		p.errorf(where, "scope WorkloadSelector and selector go together")
	}

	for j := range s.Rules {
		rw := fmt.Sprintf("%s: rules[%d]", where, j)
		rules, l7 := p.rule(rw, &s.Rules[j], pol.Action, ns)
		if len(l7) > 0 {
			if pol.Action == security.Action_ALLOW {
				p.out.Warnings = append(p.out.Warnings, fmt.Sprintf(
					"%s: HTTP attributes (%s) need a waypoint; the ztunnel drops this ALLOW rule, so it never allows anything",
					rw, strings.Join(l7, ", ")))
			} else {
				p.out.Warnings = append(p.out.Warnings, fmt.Sprintf(
					"%s: HTTP attributes (%s) need a waypoint; the ztunnel enforces this DENY rule without them, denying more",
					rw, strings.Join(l7, ", ")))
			}
		}
		if rules != nil {
			pol.Groups = append(pol.Groups, &security.Group{Rules: rules})
		}
	}
	if len(p.errs) > nerr {
		return selected{}, false
	}
	p.out.Authorizations[key] = pol
	if hasSelector {
		return selected{key: key, namespace: ns, labels: s.Selector.MatchLabels}, true
	}
	return selected{}, true
}

// l4When are the condition keys the ztunnel can evaluate (istiod's list).
var l4When = map[string]bool{
	"source.ip":        true,
	"source.namespace": true,
	"source.principal": true,
	"destination.ip":   true,
	"destination.port": true,
}

// rule converts one AuthorizationPolicy rule the way istiod does for the
// ztunnel: "to" clauses become one ORed set of matches, "from" clauses
// another, each "when" condition its own; all ANDed. HTTP-only fields
// cannot be checked at L4, and the result must fail closed: in an ALLOW
// policy the whole rule is dropped (it can never allow), in a DENY policy
// the HTTP fields are ignored (it denies a superset). The returned names
// list the HTTP fields found; a nil slice of rules means "drop the rule",
// an empty one a rule that matches everything.
func (p *meshParser) rule(where string, r *ruleSpec, action security.Action, ns string) ([]*security.Rules, []string) {
	var l7 []string
	addL7 := func(name string, n int) {
		if n > 0 && !slices.Contains(l7, name) {
			l7 = append(l7, name)
		}
	}
	rules := []*security.Rules{}

	var to []*security.Match
	for k, t := range r.To {
		op := &t.Operation
		tw := fmt.Sprintf("%s: to[%d]", where, k)
		addL7("hosts", len(op.Hosts))
		addL7("notHosts", len(op.NotHosts))
		addL7("methods", len(op.Methods))
		addL7("notMethods", len(op.NotMethods))
		addL7("paths", len(op.Paths))
		addL7("notPaths", len(op.NotPaths))
		to = append(to, &security.Match{
			DestinationPorts:    p.ports(tw+": ports", op.Ports),
			NotDestinationPorts: p.ports(tw+": notPorts", op.NotPorts),
		})
	}
	if len(to) > 0 {
		rules = append(rules, &security.Rules{Matches: to})
	}

	var from []*security.Match
	for k, f := range r.From {
		src := &f.Source
		fw := fmt.Sprintf("%s: from[%d]", where, k)
		addL7("requestPrincipals", len(src.RequestPrincipals))
		addL7("notRequestPrincipals", len(src.NotRequestPrincipals))
		addL7("remoteIpBlocks", len(src.RemoteIPBlocks))
		addL7("notRemoteIpBlocks", len(src.NotRemoteIPBlocks))
		from = append(from, &security.Match{
			Principals:         stringMatches(src.Principals),
			NotPrincipals:      stringMatches(src.NotPrincipals),
			Namespaces:         stringMatches(src.Namespaces),
			NotNamespaces:      stringMatches(src.NotNamespaces),
			ServiceAccounts:    p.serviceAccounts(fw+": serviceAccounts", src.ServiceAccounts, ns),
			NotServiceAccounts: p.serviceAccounts(fw+": notServiceAccounts", src.NotServiceAccounts, ns),
			SourceIps:          p.cidrs(fw+": ipBlocks", src.IPBlocks),
			NotSourceIps:       p.cidrs(fw+": notIpBlocks", src.NotIPBlocks),
		})
	}
	if len(from) > 0 {
		rules = append(rules, &security.Rules{Matches: from})
	}

	for k, c := range r.When {
		cw := fmt.Sprintf("%s: when[%d] (%s)", where, k, c.Key)
		if c.Key == "" {
			p.errorf(cw, "key is required")
			continue
		}
		m := &security.Match{}
		if !l4When[c.Key] {
			// An HTTP condition leaves an empty match, which matches all:
			// what a DENY needs; an ALLOW drops the rule below anyway.
			addL7(c.Key, 1)
		}
		switch c.Key {
		case "source.ip":
			m.SourceIps, m.NotSourceIps = p.cidrs(cw, strs(c.Values)), p.cidrs(cw, strs(c.NotValues))
		case "source.namespace":
			m.Namespaces, m.NotNamespaces = stringMatches(strs(c.Values)), stringMatches(strs(c.NotValues))
		case "source.principal":
			m.Principals, m.NotPrincipals = stringMatches(strs(c.Values)), stringMatches(strs(c.NotValues))
		case "destination.ip":
			m.DestinationIps, m.NotDestinationIps = p.cidrs(cw, strs(c.Values)), p.cidrs(cw, strs(c.NotValues))
		case "destination.port":
			m.DestinationPorts, m.NotDestinationPorts = p.ports(cw, c.Values), p.ports(cw, c.NotValues)
		}
		rules = append(rules, &security.Rules{Matches: []*security.Match{m}})
	}

	if action == security.Action_ALLOW && len(l7) > 0 {
		return nil, l7
	}
	return rules, l7
}

func strs(v []scalar) []string {
	out := make([]string, len(v))
	for i, s := range v {
		out[i] = string(s)
	}
	return out
}

// stringMatches applies Istio's wildcard rules: "*" is presence, a leading
// "*" a suffix match, a trailing "*" a prefix match, else exact.
func stringMatches(vs []string) []*security.StringMatch {
	var out []*security.StringMatch
	for _, v := range vs {
		var m security.StringMatch
		switch {
		case v == "*":
			m.MatchType = &security.StringMatch_Presence{Presence: &emptypb.Empty{}}
		case strings.HasPrefix(v, "*"):
			m.MatchType = &security.StringMatch_Suffix{Suffix: strings.TrimPrefix(v, "*")}
		case strings.HasSuffix(v, "*"):
			m.MatchType = &security.StringMatch_Prefix{Prefix: strings.TrimSuffix(v, "*")}
		default:
			m.MatchType = &security.StringMatch_Exact{Exact: v}
		}
		out = append(out, &m)
	}
	return out
}

// serviceAccounts parses "namespace/name" or "name" (the policy's
// namespace), as istiod does.
func (p *meshParser) serviceAccounts(where string, vs []string, ns string) []*security.ServiceAccountMatch {
	var out []*security.ServiceAccountMatch
	for _, v := range vs {
		sns, sa, ok := strings.Cut(v, "/")
		if !ok {
			sns, sa = ns, v
		}
		if sns == "" || sa == "" || strings.Contains(sa, "/") {
			p.errorf(where, "%q is not [namespace/]serviceaccount", v)
			continue
		}
		out = append(out, &security.ServiceAccountMatch{Namespace: sns, ServiceAccount: sa})
	}
	return out
}

// cidrs parses IPs and CIDRs. istiod silently skips bad entries; a local
// file is better served by an error than by a rule that quietly matches
// less (or, in a notIpBlocks, more).
func (p *meshParser) cidrs(where string, vs []string) []*security.Address {
	var out []*security.Address
	for _, v := range vs {
		var pfx netip.Prefix
		var err error
		if strings.Contains(v, "/") {
			pfx, err = netip.ParsePrefix(v)
		} else {
			var a netip.Addr
			a, err = netip.ParseAddr(v)
			if err == nil {
				pfx = netip.PrefixFrom(a, a.BitLen())
			}
		}
		if err != nil || pfx.Addr().Zone() != "" {
			p.errorf(where, "%q is not an IP or CIDR", v)
			continue
		}
		out = append(out, &security.Address{Address: pfx.Addr().AsSlice(), Length: uint32(pfx.Bits())})
	}
	return out
}

func (p *meshParser) ports(where string, vs []scalar) []uint32 {
	var out []uint32
	for _, v := range vs {
		n, err := strconv.ParseUint(string(v), 10, 16)
		if err != nil || n == 0 {
			p.errorf(where, "%q is not a port", string(v))
			continue
		}
		out = append(out, uint32(n))
	}
	return out
}
