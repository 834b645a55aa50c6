package rbac

import (
	"errors"
	"net/http"
	"net/netip"
	"testing"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	rbacv3 "github.com/envoyproxy/go-control-plane/envoy/config/rbac/v3"
	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	rbachttpv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/rbac/v3"
	rbacnetv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/rbac/v3"
	matcherv3 "github.com/envoyproxy/go-control-plane/envoy/type/matcher/v3"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"github.com/amber-mesh/amber/waypoint/match"
)

// Builders for the shapes istiod emits (pilot/pkg/security/authz/model).

func exact(v string) *matcherv3.StringMatcher {
	return &matcherv3.StringMatcher{MatchPattern: &matcherv3.StringMatcher_Exact{Exact: v}}
}

func prefix(v string) *matcherv3.StringMatcher {
	return &matcherv3.StringMatcher{MatchPattern: &matcherv3.StringMatcher_Prefix{Prefix: v}}
}

func regex(v string) *matcherv3.StringMatcher {
	return &matcherv3.StringMatcher{MatchPattern: &matcherv3.StringMatcher_SafeRegex{SafeRegex: &matcherv3.RegexMatcher{Regex: v}}}
}

func permAnd(p ...*rbacv3.Permission) *rbacv3.Permission {
	return &rbacv3.Permission{Rule: &rbacv3.Permission_AndRules{AndRules: &rbacv3.Permission_Set{Rules: p}}}
}

func permOr(p ...*rbacv3.Permission) *rbacv3.Permission {
	return &rbacv3.Permission{Rule: &rbacv3.Permission_OrRules{OrRules: &rbacv3.Permission_Set{Rules: p}}}
}

func permNot(p *rbacv3.Permission) *rbacv3.Permission {
	return &rbacv3.Permission{Rule: &rbacv3.Permission_NotRule{NotRule: p}}
}

func permAny() *rbacv3.Permission { return &rbacv3.Permission{Rule: &rbacv3.Permission_Any{Any: true}} }

func permHeader(name string, m *matcherv3.StringMatcher) *rbacv3.Permission {
	return &rbacv3.Permission{Rule: &rbacv3.Permission_Header{Header: &routev3.HeaderMatcher{
		Name: name, HeaderMatchSpecifier: &routev3.HeaderMatcher_StringMatch{StringMatch: m}}}}
}

func permPath(m *matcherv3.StringMatcher) *rbacv3.Permission {
	return &rbacv3.Permission{Rule: &rbacv3.Permission_UrlPath{UrlPath: &matcherv3.PathMatcher{Rule: &matcherv3.PathMatcher_Path{Path: m}}}}
}

func cidrRange(a string, bits uint32) *corev3.CidrRange {
	return &corev3.CidrRange{AddressPrefix: a, PrefixLen: wrapperspb.UInt32(bits)}
}

func prinAnd(p ...*rbacv3.Principal) *rbacv3.Principal {
	return &rbacv3.Principal{Identifier: &rbacv3.Principal_AndIds{AndIds: &rbacv3.Principal_Set{Ids: p}}}
}

func prinOr(p ...*rbacv3.Principal) *rbacv3.Principal {
	return &rbacv3.Principal{Identifier: &rbacv3.Principal_OrIds{OrIds: &rbacv3.Principal_Set{Ids: p}}}
}

func prinNot(p *rbacv3.Principal) *rbacv3.Principal {
	return &rbacv3.Principal{Identifier: &rbacv3.Principal_NotId{NotId: p}}
}

func prinAny() *rbacv3.Principal {
	return &rbacv3.Principal{Identifier: &rbacv3.Principal_Any{Any: true}}
}

// peer is istiod's principal for waypoints: the filter state the
// connect_authority filter set from the HBONE client's URI SAN.
func peer(m *matcherv3.StringMatcher) *rbacv3.Principal {
	return &rbacv3.Principal{Identifier: &rbacv3.Principal_FilterState{FilterState: &matcherv3.FilterStateMatcher{
		Key: "io.istio.peer_principal", Matcher: &matcherv3.FilterStateMatcher_StringMatch{StringMatch: m}}}}
}

const (
	sleepID    = "spiffe://cluster.local/ns/default/sa/sleep"
	notSleepID = "spiffe://cluster.local/ns/default/sa/notsleep"
	otherNSID  = "spiffe://cluster.local/ns/other/sa/sleep"
)

// viewer is the walkthrough's productpage-viewer as istiod generates it.
func viewer() *rbacv3.Policy {
	return &rbacv3.Policy{
		Permissions: []*rbacv3.Permission{permAnd(permOr(permHeader(":method", exact("GET"))))},
		Principals:  []*rbacv3.Principal{prinAnd(prinOr(peer(exact(sleepID))))},
	}
}

func engine(action rbacv3.RBAC_Action, policies map[string]*rbacv3.Policy) *rbacv3.RBAC {
	return &rbacv3.RBAC{Action: action, Policies: policies}
}

func req(method, path, principal string) *Request {
	r := &Request{
		Headers:     &match.Request{Method: method, Path: path, Authority: "productpage.default.svc.cluster.local:9080", Scheme: "http", Header: http.Header{}},
		Source:      netip.MustParseAddr("10.244.0.5"),
		Destination: netip.MustParseAddrPort("10.96.10.1:9080"),
	}
	if principal != "" {
		r.FilterState = map[string]string{"io.istio.peer_principal": principal}
	}
	return r
}

func TestHTTPDecisions(t *testing.T) {
	type check struct {
		r       *Request
		allowed bool
		policy  string
		log     bool
	}
	cases := []struct {
		name   string
		cfg    *rbachttpv3.RBAC
		checks []check
	}{
		{
			name: "walkthrough ALLOW: GET from sleep only",
			cfg:  &rbachttpv3.RBAC{Rules: engine(rbacv3.RBAC_ALLOW, map[string]*rbacv3.Policy{"ns[default]-policy[productpage-viewer]-rule[0]": viewer()})},
			checks: []check{
				{req("GET", "/productpage", sleepID), true, "ns[default]-policy[productpage-viewer]-rule[0]", false},
				{req("DELETE", "/productpage", sleepID), false, "", false},
				{req("GET", "/productpage", notSleepID), false, "", false},
				{req("GET", "/productpage", otherNSID), false, "", false},
				// No HBONE identity at all: no principal matches.
				{req("GET", "/productpage", ""), false, "", false},
			},
		},
		{
			name: "no rules enforce nothing",
			cfg:  &rbachttpv3.RBAC{},
			checks: []check{
				{req("DELETE", "/", ""), true, "", false},
			},
		},
		{
			// An ALLOW whose policies all failed to generate: istiod keeps the
			// filter with no policies, which denies everything.
			name:   "ALLOW without policies denies",
			cfg:    &rbachttpv3.RBAC{Rules: engine(rbacv3.RBAC_ALLOW, nil)},
			checks: []check{{req("GET", "/", sleepID), false, "", false}},
		},
		{
			name: "DENY matches deny, others pass",
			cfg: &rbachttpv3.RBAC{Rules: engine(rbacv3.RBAC_DENY, map[string]*rbacv3.Policy{
				"ns[default]-policy[deny-admin]-rule[0]": {
					Permissions: []*rbacv3.Permission{permAnd(permOr(permPath(prefix("/admin"))))},
					Principals:  []*rbacv3.Principal{prinAnd(prinAny())},
				},
			})},
			checks: []check{
				{req("GET", "/admin/users", sleepID), false, "ns[default]-policy[deny-admin]-rule[0]", false},
				// url_path ignores the query, the header :path does not.
				{req("GET", "/admin?x=1", sleepID), false, "ns[default]-policy[deny-admin]-rule[0]", false},
				{req("GET", "/public?next=/admin", sleepID), true, "", false},
			},
		},
		{
			name: "LOG (AUDIT) never denies and marks matches",
			cfg: &rbachttpv3.RBAC{Rules: engine(rbacv3.RBAC_LOG, map[string]*rbacv3.Policy{
				"audit": {Permissions: []*rbacv3.Permission{permPath(exact("/login"))}, Principals: []*rbacv3.Principal{prinAny()}},
			})},
			checks: []check{
				{req("POST", "/login", ""), true, "audit", true},
				{req("POST", "/logout", ""), true, "", false},
			},
		},
		{
			name: "first matching policy by name decides",
			cfg: &rbachttpv3.RBAC{Rules: engine(rbacv3.RBAC_ALLOW, map[string]*rbacv3.Policy{
				"b": {Permissions: []*rbacv3.Permission{permAny()}, Principals: []*rbacv3.Principal{prinAny()}},
				"a": {Permissions: []*rbacv3.Permission{permAny()}, Principals: []*rbacv3.Principal{prinAny()}},
			})},
			checks: []check{{req("GET", "/", ""), true, "a", false}},
		},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			f, err := NewHTTP(c.cfg)
			if err != nil {
				t.Fatal(err)
			}
			for _, ch := range c.checks {
				d := f.Evaluate(ch.r)
				if d.Allowed != ch.allowed || d.Policy != ch.policy || d.Log != ch.log {
					t.Errorf("%s %s from %q: %+v, want allowed=%v policy=%q log=%v",
						ch.r.Headers.Values(":method"), ch.r.Headers.Values(":path"), ch.r.FilterState["io.istio.peer_principal"], d, ch.allowed, ch.policy, ch.log)
				}
			}
		})
	}
}

func TestShadowRules(t *testing.T) {
	// istiod puts dry-run policies into shadow_rules: evaluated, reported,
	// never enforced.
	f, err := NewHTTP(&rbachttpv3.RBAC{
		ShadowRules:           engine(rbacv3.RBAC_DENY, map[string]*rbacv3.Policy{"dry": {Permissions: []*rbacv3.Permission{permAny()}, Principals: []*rbacv3.Principal{prinAny()}}}),
		ShadowRulesStatPrefix: "istio_dry_run_deny_",
	})
	if err != nil {
		t.Fatal(err)
	}
	d := f.Evaluate(req("GET", "/", ""))
	if !d.Allowed || d.Shadow == nil || d.Shadow.Allowed || d.Shadow.Policy != "dry" {
		t.Errorf("decision %+v shadow %+v, want allowed with a shadow denial by dry", d, d.Shadow)
	}
	if f.ShadowStatPrefix != "istio_dry_run_deny_" {
		t.Errorf("shadow stat prefix %q", f.ShadowStatPrefix)
	}
}

// TestPermissionsAndPrincipals covers each node kind istiod can emit.
func TestPermissionsAndPrincipals(t *testing.T) {
	base := req("GET", "/api/v1?x=1", sleepID)
	base.Headers.(*match.Request).Header.Set("X-Debug", "1")
	base.Remote = netip.MustParseAddr("192.0.2.7")
	cases := []struct {
		name string
		perm *rbacv3.Permission
		prin *rbacv3.Principal
		want bool
	}{
		{"and of nothing is true", permAnd(), prinAny(), true},
		{"or of nothing is false", permOr(), prinAny(), false},
		{"not", permNot(permHeader(":method", exact("POST"))), prinAny(), true},
		{"header", permHeader("x-debug", exact("1")), prinAny(), true},
		{"path without query", permPath(exact("/api/v1")), prinAny(), true},
		{"header :path keeps the query", permHeader(":path", exact("/api/v1")), prinAny(), false},
		{"host suffix ignore case", permHeader(":authority", &matcherv3.StringMatcher{MatchPattern: &matcherv3.StringMatcher_Prefix{Prefix: "PRODUCTPAGE"}, IgnoreCase: true}), prinAny(), true},
		{"destination ip", &rbacv3.Permission{Rule: &rbacv3.Permission_DestinationIp{DestinationIp: cidrRange("10.96.0.0", 16)}}, prinAny(), true},
		{"destination ip elsewhere", &rbacv3.Permission{Rule: &rbacv3.Permission_DestinationIp{DestinationIp: cidrRange("10.97.0.0", 16)}}, prinAny(), false},
		{"destination port", &rbacv3.Permission{Rule: &rbacv3.Permission_DestinationPort{DestinationPort: 9080}}, prinAny(), true},
		{"requested server name of a plain connection", &rbacv3.Permission{Rule: &rbacv3.Permission_RequestedServerName{RequestedServerName: exact("")}}, prinAny(), true},
		{"direct remote ip", permAny(), &rbacv3.Principal{Identifier: &rbacv3.Principal_DirectRemoteIp{DirectRemoteIp: cidrRange("10.244.0.0", 24)}}, true},
		{"remote ip is the HCM's", permAny(), &rbacv3.Principal{Identifier: &rbacv3.Principal_RemoteIp{RemoteIp: cidrRange("192.0.2.0", 24)}}, true},
		{"remote ip is not the peer", permAny(), &rbacv3.Principal{Identifier: &rbacv3.Principal_RemoteIp{RemoteIp: cidrRange("10.244.0.0", 24)}}, false},
		{"namespace regex", permAny(), peer(regex(".*/ns/default/.*")), true},
		{"service account regex", permAny(), peer(regex(`spiffe://.+/ns/default/(.+/|)sa/sleep(/.+)?`)), true},
		{"not principal", permAny(), prinNot(peer(exact(notSleepID))), true},
		{"principal header", permAny(), &rbacv3.Principal{Identifier: &rbacv3.Principal_Header{Header: &routev3.HeaderMatcher{Name: "x-debug", HeaderMatchSpecifier: &routev3.HeaderMatcher_PresentMatch{PresentMatch: true}}}}, true},
		// The inner connection of a waypoint has no TLS peer.
		{"authenticated without TLS", permAny(), &rbacv3.Principal{Identifier: &rbacv3.Principal_Authenticated_{Authenticated: &rbacv3.Principal_Authenticated{PrincipalName: exact(sleepID)}}}, false},
		{"filter state missing", permAny(), &rbacv3.Principal{Identifier: &rbacv3.Principal_FilterState{FilterState: &matcherv3.FilterStateMatcher{Key: "io.istio.other", Matcher: &matcherv3.FilterStateMatcher_StringMatch{StringMatch: regex(".*")}}}}, false},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			f, err := NewHTTP(&rbachttpv3.RBAC{Rules: engine(rbacv3.RBAC_ALLOW, map[string]*rbacv3.Policy{
				"p": {Permissions: []*rbacv3.Permission{c.perm}, Principals: []*rbacv3.Principal{c.prin}},
			})})
			if err != nil {
				t.Fatal(err)
			}
			if got := f.Evaluate(base).Allowed; got != c.want {
				t.Errorf("got %v, want %v", got, c.want)
			}
		})
	}
	// The same principal with a TLS peer certificate.
	withCert := *base
	withCert.PeerCertificate = &Certificate{URISANs: []string{sleepID}}
	f, err := NewHTTP(&rbachttpv3.RBAC{Rules: engine(rbacv3.RBAC_ALLOW, map[string]*rbacv3.Policy{"p": {
		Permissions: []*rbacv3.Permission{permAny()},
		Principals:  []*rbacv3.Principal{{Identifier: &rbacv3.Principal_Authenticated_{Authenticated: &rbacv3.Principal_Authenticated{PrincipalName: exact(sleepID)}}}},
	}})})
	if err != nil {
		t.Fatal(err)
	}
	if !f.Evaluate(&withCert).Allowed {
		t.Error("authenticated with a matching URI SAN denied")
	}
}

func TestNetwork(t *testing.T) {
	f, err := NewNetwork(&rbacnetv3.RBAC{StatPrefix: "tcp.", Rules: engine(rbacv3.RBAC_ALLOW, map[string]*rbacv3.Policy{
		"p": {Permissions: []*rbacv3.Permission{permAny()}, Principals: []*rbacv3.Principal{prinAnd(prinOr(peer(exact(sleepID))))}},
	})})
	if err != nil {
		t.Fatal(err)
	}
	tcp := &Request{Source: netip.MustParseAddr("10.244.0.5"), Destination: netip.MustParseAddrPort("10.96.10.5:3306"),
		FilterState: map[string]string{"io.istio.peer_principal": sleepID}}
	if !f.Evaluate(tcp).Allowed {
		t.Error("sleep denied on a TCP chain")
	}
	tcp.FilterState["io.istio.peer_principal"] = notSleepID
	if f.Evaluate(tcp).Allowed {
		t.Error("notsleep allowed on a TCP chain")
	}
	// Header conditions on a connection see no headers.
	h, err := NewNetwork(&rbacnetv3.RBAC{Rules: engine(rbacv3.RBAC_DENY, map[string]*rbacv3.Policy{
		"p": {Permissions: []*rbacv3.Permission{permHeader(":method", exact("GET"))}, Principals: []*rbacv3.Principal{prinAny()}},
	})})
	if err != nil {
		t.Fatal(err)
	}
	if !h.Evaluate(tcp).Allowed {
		t.Error("a header DENY matched a connection")
	}
}

func TestUnsupportedFailsClosed(t *testing.T) {
	jwt := &rbacv3.Principal{Identifier: &rbacv3.Principal_Metadata{Metadata: &matcherv3.MetadataMatcher{Filter: "istio_authn"}}}
	cases := []struct {
		name string
		http *rbachttpv3.RBAC
		net  *rbacnetv3.RBAC
	}{
		{name: "request principal (JWT metadata)", http: &rbachttpv3.RBAC{Rules: engine(rbacv3.RBAC_DENY, map[string]*rbacv3.Policy{
			"p": {Permissions: []*rbacv3.Permission{permAny()}, Principals: []*rbacv3.Principal{prinAnd(prinOr(jwt))}},
		})}},
		{name: "metadata permission", http: &rbachttpv3.RBAC{Rules: engine(rbacv3.RBAC_ALLOW, map[string]*rbacv3.Policy{
			"p": {Permissions: []*rbacv3.Permission{{Rule: &rbacv3.Permission_Metadata{Metadata: &matcherv3.MetadataMatcher{Filter: "envoy.filters.http.jwt_authn"}}}}, Principals: []*rbacv3.Principal{prinAny()}},
		})}},
		{name: "URI template", http: &rbachttpv3.RBAC{Rules: engine(rbacv3.RBAC_ALLOW, map[string]*rbacv3.Policy{
			"p": {Permissions: []*rbacv3.Permission{{Rule: &rbacv3.Permission_UriTemplate{UriTemplate: &corev3.TypedExtensionConfig{Name: "uri-template"}}}}, Principals: []*rbacv3.Principal{prinAny()}},
		})}},
		{name: "shadow rules are checked too", http: &rbachttpv3.RBAC{ShadowRules: engine(rbacv3.RBAC_ALLOW, map[string]*rbacv3.Policy{
			"p": {Permissions: []*rbacv3.Permission{permAny()}, Principals: []*rbacv3.Principal{jwt}},
		})}},
		{name: "continuous network enforcement", net: &rbacnetv3.RBAC{EnforcementType: rbacnetv3.RBAC_CONTINUOUS}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			var err error
			if c.http != nil {
				_, err = NewHTTP(c.http)
			} else {
				_, err = NewNetwork(c.net)
			}
			if !errors.Is(err, ErrUnsupported) {
				t.Errorf("error %v, want ErrUnsupported", err)
			}
		})
	}
}
