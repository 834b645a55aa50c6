package rbac

import (
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strings"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	rbacv3 "github.com/envoyproxy/go-control-plane/envoy/config/rbac/v3"
	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	rbachttpv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/rbac/v3"
	rbacnetv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/rbac/v3"
	matcherv3 "github.com/envoyproxy/go-control-plane/envoy/type/matcher/v3"

	"github.com/amber-mesh/amber/waypoint/match"
)

// ErrUnsupported is wrapped by every error for RBAC content this package
// cannot evaluate; see the package doc.
var ErrUnsupported = errors.New("unsupported")

// Action is what matching policies of an engine do.
type Action uint8

const (
	// Allow allows a request iff some policy matches.
	Allow Action = iota + 1
	// Deny denies a request iff some policy matches.
	Deny
	// Log allows every request and marks those some policy matches for the
	// access log (Istio's AUDIT action).
	Log
)

func (a Action) String() string {
	switch a {
	case Allow:
		return "ALLOW"
	case Deny:
		return "DENY"
	case Log:
		return "LOG"
	}
	return fmt.Sprintf("Action(%d)", a)
}

// Filter is one compiled RBAC filter, immutable.
type Filter struct {
	// Rules is enforced; nil enforces nothing.
	Rules *Engine
	// Shadow is evaluated and reported only; nil means none.
	Shadow *Engine
	// StatPrefix, RulesStatPrefix and ShadowStatPrefix are the stat
	// prefixes istiod configured (RBAC stats: "<prefix>rbac.allowed", ...;
	// "istio_dry_run_allow_" for dry-run policies). Empty: none.
	StatPrefix, RulesStatPrefix, ShadowStatPrefix string
	// Network is true for the network (TCP) filter.
	Network bool
}

// Engine is one compiled envoy.config.rbac.v3.RBAC.
type Engine struct {
	Action   Action
	policies []policy
}

type policy struct {
	name        string
	permissions []cond
	principals  []cond
}

// NewHTTP compiles an envoy.extensions.filters.http.rbac.v3.RBAC.
func NewHTTP(cfg *rbachttpv3.RBAC) (*Filter, error) {
	if cfg.GetMatcher() != nil || cfg.GetShadowMatcher() != nil {
		return nil, fmt.Errorf("rbac: matcher/shadow_matcher: %w", ErrUnsupported)
	}
	f := &Filter{RulesStatPrefix: cfg.GetRulesStatPrefix(), ShadowStatPrefix: cfg.GetShadowRulesStatPrefix()}
	var err error
	if f.Rules, err = newEngine(cfg.GetRules()); err != nil {
		return nil, fmt.Errorf("rules: %w", err)
	}
	if f.Shadow, err = newEngine(cfg.GetShadowRules()); err != nil {
		return nil, fmt.Errorf("shadow_rules: %w", err)
	}
	return f, nil
}

// NewNetwork compiles an envoy.extensions.filters.network.rbac.v3.RBAC.
// Only ONE_TIME_ON_FIRST_BYTE enforcement (the default, what istiod sends)
// is supported: the decision is taken once per connection.
func NewNetwork(cfg *rbacnetv3.RBAC) (*Filter, error) {
	if cfg.GetMatcher() != nil || cfg.GetShadowMatcher() != nil {
		return nil, fmt.Errorf("rbac: matcher/shadow_matcher: %w", ErrUnsupported)
	}
	if cfg.GetEnforcementType() != rbacnetv3.RBAC_ONE_TIME_ON_FIRST_BYTE {
		return nil, fmt.Errorf("rbac: enforcement_type %v: %w", cfg.GetEnforcementType(), ErrUnsupported)
	}
	if cfg.GetDelayDeny() != nil {
		return nil, fmt.Errorf("rbac: delay_deny: %w", ErrUnsupported)
	}
	f := &Filter{StatPrefix: cfg.GetStatPrefix(), ShadowStatPrefix: cfg.GetShadowRulesStatPrefix(), Network: true}
	var err error
	if f.Rules, err = newEngine(cfg.GetRules()); err != nil {
		return nil, fmt.Errorf("rules: %w", err)
	}
	if f.Shadow, err = newEngine(cfg.GetShadowRules()); err != nil {
		return nil, fmt.Errorf("shadow_rules: %w", err)
	}
	return f, nil
}

func newEngine(r *rbacv3.RBAC) (*Engine, error) {
	if r == nil {
		return nil, nil
	}
	e := &Engine{}
	switch r.GetAction() {
	case rbacv3.RBAC_ALLOW:
		e.Action = Allow
	case rbacv3.RBAC_DENY:
		e.Action = Deny
	case rbacv3.RBAC_LOG:
		e.Action = Log
	default:
		return nil, fmt.Errorf("action %v: %w", r.GetAction(), ErrUnsupported)
	}
	if r.GetAuditLoggingOptions() != nil {
		return nil, fmt.Errorf("audit_logging_options: %w", ErrUnsupported)
	}
	names := make([]string, 0, len(r.GetPolicies()))
	for name := range r.GetPolicies() {
		names = append(names, name)
	}
	slices.Sort(names)
	for _, name := range names {
		p, err := newPolicy(name, r.GetPolicies()[name])
		if err != nil {
			return nil, fmt.Errorf("policies[%s]: %w", name, err)
		}
		e.policies = append(e.policies, p)
	}
	return e, nil
}

func newPolicy(name string, p *rbacv3.Policy) (policy, error) {
	if p.GetCondition() != nil || p.GetCheckedCondition() != nil {
		return policy{}, fmt.Errorf("condition: %w", ErrUnsupported)
	}
	out := policy{name: name}
	var err error
	if out.permissions, err = compileAll(p.GetPermissions(), "permissions", newPermission); err != nil {
		return policy{}, err
	}
	if out.principals, err = compileAll(p.GetPrincipals(), "principals", newPrincipal); err != nil {
		return policy{}, err
	}
	return out, nil
}

// Policies names the engine's policies in evaluation order.
func (e *Engine) Policies() []string {
	out := make([]string, len(e.policies))
	for i, p := range e.policies {
		out[i] = p.name
	}
	return out
}

// Request is what a filter evaluates. The zero value is a request with
// nothing known: headers and addresses absent.
type Request struct {
	// Headers are the request's headers with ":path" normalised as the
	// HCM configures; nil for the network filter (header and url_path
	// conditions then see no headers).
	Headers match.Headers
	// Source is the downstream peer (direct_remote_ip, source_ip). For a
	// waypoint: the HBONE client's address as the connect_authority
	// filter recorded it.
	Source netip.Addr
	// Remote is the HCM's remote address (remote_ip); invalid means
	// Source.
	Remote netip.Addr
	// Destination is the connection's local address: for a waypoint the
	// original destination from the CONNECT :authority (VIP:port or
	// podIP:port).
	Destination netip.AddrPort
	// ServerName is the TLS SNI of the connection; "" without TLS.
	ServerName string
	// FilterState holds the string values filters stored for the
	// connection and stream, by key (io.istio.peer_principal).
	FilterState map[string]string
	// PeerCertificate describes the connection's TLS peer certificate;
	// nil without TLS (a waypoint's inner connection).
	PeerCertificate *Certificate
}

// Certificate is what Envoy's authenticated principal reads of a TLS peer
// certificate.
type Certificate struct {
	// URISANs, DNSSANs and Subject; Envoy matches principal_name against
	// the URI SANs, then the DNS SANs, then the subject.
	URISANs, DNSSANs []string
	Subject          string
}

// Decision is one filter's verdict on a request.
type Decision struct {
	// Allowed is false when the enforced rules deny: the caller answers
	// 403 "RBAC: access denied" (HTTP) or closes the connection (TCP).
	Allowed bool
	// Policy names the policy that decided, "" when none matched.
	Policy string
	// Log is true when LOG rules matched: Envoy's access_log_hint.
	Log bool
	// Shadow is the shadow rules' verdict, nil when there are none.
	Shadow *Decision
}

// Evaluate runs the filter on r.
func (f *Filter) Evaluate(r *Request) Decision {
	d := Decision{Allowed: true}
	if f.Rules != nil {
		d = f.Rules.evaluate(r)
	}
	if f.Shadow != nil {
		s := f.Shadow.evaluate(r)
		d.Shadow = &s
	}
	return d
}

func (e *Engine) evaluate(r *Request) Decision {
	matched := ""
	found := false
	for i := range e.policies {
		if e.policies[i].matches(r) {
			matched, found = e.policies[i].name, true
			break
		}
	}
	switch e.Action {
	case Allow:
		return Decision{Allowed: found, Policy: matched}
	case Deny:
		return Decision{Allowed: !found, Policy: matched}
	case Log:
		return Decision{Allowed: true, Policy: matched, Log: found}
	}
	return Decision{}
}

func (p *policy) matches(r *Request) bool {
	return anyOf(p.permissions)(r) && anyOf(p.principals)(r)
}

// cond is one compiled node of a permission or principal tree.
type cond func(*Request) bool

// allOf is and_rules/and_ids: true without members.
func allOf(subs []cond) cond {
	return func(r *Request) bool {
		for _, s := range subs {
			if !s(r) {
				return false
			}
		}
		return true
	}
}

// anyOf is or_rules/or_ids: false without members.
func anyOf(subs []cond) cond {
	return func(r *Request) bool {
		for _, s := range subs {
			if s(r) {
				return true
			}
		}
		return false
	}
}

func not(c cond) cond { return func(r *Request) bool { return !c(r) } }

// compileAll compiles the members of a set, naming a failing one by index.
func compileAll[T any](in []T, field string, compile func(T) (cond, error)) ([]cond, error) {
	out := make([]cond, len(in))
	for i, m := range in {
		c, err := compile(m)
		if err != nil {
			return nil, fmt.Errorf("%s[%d]: %w", field, i, err)
		}
		out[i] = c
	}
	return out, nil
}

// inRange matches the address addr picks from a request against c.
func inRange(field string, c *corev3.CidrRange, addr func(*Request) netip.Addr) (cond, error) {
	pfx, err := cidr(c)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", field, err)
	}
	return func(r *Request) bool { return contains(pfx, addr(r)) }, nil
}

func header(m *routev3.HeaderMatcher) (cond, error) {
	h, err := match.NewHeader(m)
	if err != nil {
		return nil, fmt.Errorf("header: %w", err)
	}
	return func(r *Request) bool { return h.Match(headersOf(r)) }, nil
}

func newPermission(p *rbacv3.Permission) (cond, error) {
	switch rule := p.GetRule().(type) {
	case *rbacv3.Permission_AndRules:
		subs, err := compileAll(rule.AndRules.GetRules(), "and_rules.rules", newPermission)
		return allOf(subs), err
	case *rbacv3.Permission_OrRules:
		subs, err := compileAll(rule.OrRules.GetRules(), "or_rules.rules", newPermission)
		return anyOf(subs), err
	case *rbacv3.Permission_NotRule:
		sub, err := newPermission(rule.NotRule)
		if err != nil {
			return nil, fmt.Errorf("not_rule: %w", err)
		}
		return not(sub), nil
	case *rbacv3.Permission_Any:
		if !rule.Any {
			return nil, errors.New("any: false is not a rule")
		}
		return func(*Request) bool { return true }, nil
	case *rbacv3.Permission_Header:
		return header(rule.Header)
	case *rbacv3.Permission_UrlPath:
		m, err := newPath(rule.UrlPath)
		if err != nil {
			return nil, fmt.Errorf("url_path: %w", err)
		}
		return m, nil
	case *rbacv3.Permission_DestinationIp:
		return inRange("destination_ip", rule.DestinationIp, func(r *Request) netip.Addr { return r.Destination.Addr() })
	case *rbacv3.Permission_DestinationPort:
		port := rule.DestinationPort
		return func(r *Request) bool { return r.Destination.IsValid() && uint32(r.Destination.Port()) == port }, nil
	case *rbacv3.Permission_DestinationPortRange:
		lo, hi := rule.DestinationPortRange.GetStart(), rule.DestinationPortRange.GetEnd()
		return func(r *Request) bool {
			p := int32(r.Destination.Port())
			return r.Destination.IsValid() && p >= lo && p < hi
		}, nil
	case *rbacv3.Permission_RequestedServerName:
		s, err := match.NewString(rule.RequestedServerName)
		if err != nil {
			return nil, fmt.Errorf("requested_server_name: %w", err)
		}
		return func(r *Request) bool { return s.Match(r.ServerName) }, nil
	case *rbacv3.Permission_Metadata:
		return nil, fmt.Errorf("metadata (filter %q): %w", rule.Metadata.GetFilter(), ErrUnsupported)
	case *rbacv3.Permission_SourcedMetadata:
		return nil, fmt.Errorf("sourced_metadata: %w", ErrUnsupported)
	case *rbacv3.Permission_Matcher:
		return nil, fmt.Errorf("matcher %s: %w", rule.Matcher.GetName(), ErrUnsupported)
	case *rbacv3.Permission_UriTemplate:
		return nil, fmt.Errorf("uri_template: %w", ErrUnsupported)
	case nil:
		return nil, errors.New("no rule")
	default:
		return nil, fmt.Errorf("%T: %w", rule, ErrUnsupported)
	}
}

func newPrincipal(p *rbacv3.Principal) (cond, error) {
	switch id := p.GetIdentifier().(type) {
	case *rbacv3.Principal_AndIds:
		subs, err := compileAll(id.AndIds.GetIds(), "and_ids.ids", newPrincipal)
		return allOf(subs), err
	case *rbacv3.Principal_OrIds:
		subs, err := compileAll(id.OrIds.GetIds(), "or_ids.ids", newPrincipal)
		return anyOf(subs), err
	case *rbacv3.Principal_NotId:
		sub, err := newPrincipal(id.NotId)
		if err != nil {
			return nil, fmt.Errorf("not_id: %w", err)
		}
		return not(sub), nil
	case *rbacv3.Principal_Any:
		if !id.Any {
			return nil, errors.New("any: false is not a principal")
		}
		return func(*Request) bool { return true }, nil
	case *rbacv3.Principal_Authenticated_:
		var name *match.String
		if pn := id.Authenticated.GetPrincipalName(); pn != nil {
			s, err := match.NewString(pn)
			if err != nil {
				return nil, fmt.Errorf("authenticated: %w", err)
			}
			name = &s
		}
		return func(r *Request) bool { return authenticated(r.PeerCertificate, name) }, nil
	case *rbacv3.Principal_SourceIp:
		return inRange("source_ip", id.SourceIp, func(r *Request) netip.Addr { return r.Source })
	case *rbacv3.Principal_DirectRemoteIp:
		return inRange("direct_remote_ip", id.DirectRemoteIp, func(r *Request) netip.Addr { return r.Source })
	case *rbacv3.Principal_RemoteIp:
		return inRange("remote_ip", id.RemoteIp, func(r *Request) netip.Addr {
			if r.Remote.IsValid() {
				return r.Remote
			}
			return r.Source
		})
	case *rbacv3.Principal_Header:
		return header(id.Header)
	case *rbacv3.Principal_UrlPath:
		m, err := newPath(id.UrlPath)
		if err != nil {
			return nil, fmt.Errorf("url_path: %w", err)
		}
		return m, nil
	case *rbacv3.Principal_FilterState:
		key := id.FilterState.GetKey()
		if key == "" {
			return nil, errors.New("filter_state: no key")
		}
		sm, ok := id.FilterState.GetMatcher().(*matcherv3.FilterStateMatcher_StringMatch)
		if !ok {
			return nil, fmt.Errorf("filter_state %s: %T: %w", key, id.FilterState.GetMatcher(), ErrUnsupported)
		}
		s, err := match.NewString(sm.StringMatch)
		if err != nil {
			return nil, fmt.Errorf("filter_state %s: %w", key, err)
		}
		return func(r *Request) bool {
			v, ok := r.FilterState[key]
			return ok && s.Match(v)
		}, nil
	case *rbacv3.Principal_Metadata:
		return nil, fmt.Errorf("metadata (filter %q; istiod's request principals and JWT claims need jwt_authn): %w", id.Metadata.GetFilter(), ErrUnsupported)
	case *rbacv3.Principal_SourcedMetadata:
		return nil, fmt.Errorf("sourced_metadata: %w", ErrUnsupported)
	case *rbacv3.Principal_Custom:
		return nil, fmt.Errorf("custom %s: %w", id.Custom.GetName(), ErrUnsupported)
	case nil:
		return nil, errors.New("no identifier")
	default:
		return nil, fmt.Errorf("%T: %w", id, ErrUnsupported)
	}
}

// newPath compiles a PathMatcher: the path without query and fragment.
func newPath(pm *matcherv3.PathMatcher) (cond, error) {
	sm := pm.GetPath()
	if sm == nil {
		return nil, errors.New("no path matcher")
	}
	s, err := match.NewString(sm)
	if err != nil {
		return nil, err
	}
	return func(r *Request) bool {
		vals := headersOf(r).Values(":path")
		if len(vals) == 0 {
			return false
		}
		p := vals[0]
		if i := strings.IndexAny(p, "?#"); i >= 0 {
			p = p[:i]
		}
		return s.Match(p)
	}, nil
}

func authenticated(c *Certificate, name *match.String) bool {
	if c == nil {
		return false
	}
	if name == nil {
		return true
	}
	for _, u := range c.URISANs {
		if name.Match(u) {
			return true
		}
	}
	for _, d := range c.DNSSANs {
		if name.Match(d) {
			return true
		}
	}
	return name.Match(c.Subject)
}

type noHeaders struct{}

func (noHeaders) Values(string) []string { return nil }

func headersOf(r *Request) match.Headers {
	if r.Headers == nil {
		return noHeaders{}
	}
	return r.Headers
}

// cidr converts a CidrRange. An address that is not an IP literal, or a
// prefix longer than the family, is an error (Envoy rejects both).
func cidr(c *corev3.CidrRange) (netip.Prefix, error) {
	a, err := netip.ParseAddr(c.GetAddressPrefix())
	if err != nil {
		return netip.Prefix{}, fmt.Errorf("address_prefix %q: %w", c.GetAddressPrefix(), err)
	}
	// An unset prefix_len is 0 in Envoy: the range holds every address of
	// the family. istiod always sets it.
	bits := int(c.GetPrefixLen().GetValue())
	p, err := a.Prefix(bits)
	if err != nil {
		return netip.Prefix{}, fmt.Errorf("cidr %s/%d: %w", a, bits, err)
	}
	return p, nil
}

// contains matches a against p; IPv4-mapped IPv6 addresses count as IPv4.
func contains(p netip.Prefix, a netip.Addr) bool {
	return a.IsValid() && p.Contains(a.Unmap())
}
