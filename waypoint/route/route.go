// Package route selects the route for an HTTP request from an inline
// envoy.config.route.v3.RouteConfiguration the way Envoy's router does
// (virtual host by :authority, first matching route in order), and holds
// what the route tells the data path: the clusters and their weights, a
// redirect or direct response, header mutations, timeouts and retries.
// NormalizePath is the HCM's path normalisation, which runs before RBAC
// and routing.
package route

import (
	"errors"
	"fmt"
	"regexp"
	"strings"
	"time"

	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"

	"github.com/amber-mesh/amber/waypoint/match"
)

// ErrUnsupported is wrapped by every error for route configuration this
// package does not implement; the caller must refuse the chain rather than
// route differently from what was configured.
var ErrUnsupported = errors.New("unsupported")

// DefaultTimeout is Envoy's route timeout when a route sets none.
const DefaultTimeout = 15 * time.Second

// Config is a compiled RouteConfiguration, immutable.
type Config struct {
	Name string
	// VirtualHosts in configuration order.
	VirtualHosts []*VirtualHost
	// RequestHeaders and ResponseHeaders are the configuration-level
	// mutations, applied after the route's and the virtual host's.
	RequestHeaders, ResponseHeaders *Mutations

	ignorePort bool
}

// VirtualHost is a compiled envoy.config.route.v3.VirtualHost.
type VirtualHost struct {
	Name    string
	Domains []string
	Routes  []*Route
	// Retry applies to routes that set none; nil means none.
	Retry                           *RetryPolicy
	RequestHeaders, ResponseHeaders *Mutations
}

// Route is one compiled envoy.config.route.v3.Route. Exactly one of
// Forward, Redirect and Direct is set.
type Route struct {
	Name     string
	Forward  *Forward
	Redirect *Redirect
	Direct   *DirectResponse
	// RequestHeaders and ResponseHeaders are the route's own mutations.
	RequestHeaders, ResponseHeaders *Mutations

	match routeMatch
	vhost *VirtualHost
	cfg   *Config
}

// New compiles rc. Anything the package does not implement is an error
// wrapping ErrUnsupported.
func New(rc *routev3.RouteConfiguration) (*Config, error) {
	c := &Config{Name: rc.GetName(), ignorePort: rc.GetIgnorePortInHostMatching()}
	var err error
	if c.RequestHeaders, err = newMutations(rc.GetRequestHeadersToAdd(), rc.GetRequestHeadersToRemove()); err != nil {
		return nil, fmt.Errorf("request_headers_to_add: %w", err)
	}
	if c.ResponseHeaders, err = newMutations(rc.GetResponseHeadersToAdd(), rc.GetResponseHeadersToRemove()); err != nil {
		return nil, fmt.Errorf("response_headers_to_add: %w", err)
	}
	if rc.GetMostSpecificHeaderMutationsWins() {
		return nil, fmt.Errorf("most_specific_header_mutations_wins: %w", ErrUnsupported)
	}
	seen := map[string]bool{}
	for i, vh := range rc.GetVirtualHosts() {
		v, err := newVirtualHost(vh, c)
		if err != nil {
			return nil, fmt.Errorf("virtual_hosts[%d]: %w", i, err)
		}
		for _, d := range v.Domains {
			if seen[d] {
				// Envoy refuses a configuration whose domains repeat.
				return nil, fmt.Errorf("virtual_hosts[%d]: domain %q repeats", i, d)
			}
			seen[d] = true
		}
		c.VirtualHosts = append(c.VirtualHosts, v)
	}
	return c, nil
}

func newVirtualHost(vh *routev3.VirtualHost, c *Config) (*VirtualHost, error) {
	v := &VirtualHost{Name: vh.GetName()}
	if len(vh.GetDomains()) == 0 {
		return nil, errors.New("no domains")
	}
	for _, d := range vh.GetDomains() {
		d = strings.ToLower(d)
		if strings.Count(d, "*") > 1 || (strings.Contains(d, "*") && d != "*" && !strings.HasPrefix(d, "*") && !strings.HasSuffix(d, "*")) {
			return nil, fmt.Errorf("domain %q: only a leading or trailing '*' is allowed", d)
		}
		v.Domains = append(v.Domains, d)
	}
	var err error
	if vh.GetRetryPolicy() != nil {
		if v.Retry, err = newRetryPolicy(vh.GetRetryPolicy()); err != nil {
			return nil, fmt.Errorf("retry_policy: %w", err)
		}
	}
	if v.RequestHeaders, err = newMutations(vh.GetRequestHeadersToAdd(), vh.GetRequestHeadersToRemove()); err != nil {
		return nil, fmt.Errorf("request_headers_to_add: %w", err)
	}
	if v.ResponseHeaders, err = newMutations(vh.GetResponseHeadersToAdd(), vh.GetResponseHeadersToRemove()); err != nil {
		return nil, fmt.Errorf("response_headers_to_add: %w", err)
	}
	for i, r := range vh.GetRoutes() {
		rt, err := newRoute(r, v, c)
		if err != nil {
			return nil, fmt.Errorf("routes[%d] %q: %w", i, r.GetName(), err)
		}
		v.Routes = append(v.Routes, rt)
	}
	return v, nil
}

func newRoute(r *routev3.Route, v *VirtualHost, c *Config) (*Route, error) {
	rt := &Route{Name: r.GetName(), vhost: v, cfg: c}
	var err error
	if rt.match, err = newRouteMatch(r.GetMatch()); err != nil {
		return nil, fmt.Errorf("match: %w", err)
	}
	switch a := r.GetAction().(type) {
	case *routev3.Route_Route:
		if rt.Forward, err = newForward(a.Route); err != nil {
			return nil, fmt.Errorf("route: %w", err)
		}
	case *routev3.Route_Redirect:
		if rt.Redirect, err = newRedirect(a.Redirect); err != nil {
			return nil, fmt.Errorf("redirect: %w", err)
		}
	case *routev3.Route_DirectResponse:
		if rt.Direct, err = newDirectResponse(a.DirectResponse); err != nil {
			return nil, fmt.Errorf("direct_response: %w", err)
		}
	default:
		return nil, fmt.Errorf("action %T: %w", a, ErrUnsupported)
	}
	if rt.RequestHeaders, err = newMutations(r.GetRequestHeadersToAdd(), r.GetRequestHeadersToRemove()); err != nil {
		return nil, fmt.Errorf("request_headers_to_add: %w", err)
	}
	if rt.ResponseHeaders, err = newMutations(r.GetResponseHeadersToAdd(), r.GetResponseHeadersToRemove()); err != nil {
		return nil, fmt.Errorf("response_headers_to_add: %w", err)
	}
	return rt, nil
}

// VirtualHost returns the virtual host the route belongs to.
func (r *Route) VirtualHost() *VirtualHost { return r.vhost }

// RetryPolicy is the route's retry policy, else its virtual host's; nil
// means no retries. Only forwarding routes retry.
func (r *Route) RetryPolicy() *RetryPolicy {
	if r.Forward != nil && r.Forward.Retry != nil {
		return r.Forward.Retry
	}
	if r.Forward != nil {
		return r.vhost.Retry
	}
	return nil
}

// RequestMutations returns the request header mutations in the order
// Envoy applies them: the route's, the virtual host's, the
// configuration's (a later OVERWRITE wins). A weighted cluster's own
// mutations (ClusterWeight.RequestHeaders) go before these.
func (r *Route) RequestMutations() []*Mutations {
	return []*Mutations{r.RequestHeaders, r.vhost.RequestHeaders, r.cfg.RequestHeaders}
}

// ResponseMutations is RequestMutations for the response.
func (r *Route) ResponseMutations() []*Mutations {
	return []*Mutations{r.ResponseHeaders, r.vhost.ResponseHeaders, r.cfg.ResponseHeaders}
}

// Select returns the route for a request with headers h (":authority",
// ":path" after normalisation, ":method", the rest), or nil when no
// virtual host or no route matches: Envoy then answers 404 (NR).
func (c *Config) Select(h match.Headers) *Route {
	v := c.virtualHost(first(h.Values(":authority")))
	if v == nil {
		return nil
	}
	path := first(h.Values(":path"))
	var q match.QueryParams
	qparsed := false
	for _, r := range v.Routes {
		if r.match.needQuery && !qparsed {
			q, qparsed = match.ParseQuery(path), true
		}
		if r.match.matches(path, h, q) {
			return r
		}
	}
	return nil
}

func first(v []string) string {
	if len(v) == 0 {
		return ""
	}
	return v[0]
}

// virtualHost picks the virtual host for host the way Envoy does: an exact
// domain, else the longest suffix wildcard ("*.example.com"), else the
// longest prefix wildcard ("example.*"), else "*". Matching ignores case;
// the port takes part unless ignore_port_in_host_matching is set.
func (c *Config) virtualHost(host string) *VirtualHost {
	host = strings.ToLower(host)
	if c.ignorePort {
		host = stripPort(host)
	}
	var best *VirtualHost
	bestKind, bestLen := 0, -1 // kind: 4 exact, 3 suffix, 2 prefix, 1 any
	for _, v := range c.VirtualHosts {
		for _, d := range v.Domains {
			kind, n := 0, 0
			switch {
			case d == "*":
				kind = 1
			case strings.HasPrefix(d, "*"):
				if s := d[1:]; len(host) > len(s) && strings.HasSuffix(host, s) {
					kind, n = 3, len(s)
				}
			case strings.HasSuffix(d, "*"):
				if p := d[:len(d)-1]; len(host) > len(p) && strings.HasPrefix(host, p) {
					kind, n = 2, len(p)
				}
			case d == host:
				kind = 4
			}
			if kind > bestKind || (kind == bestKind && kind != 0 && n > bestLen) {
				best, bestKind, bestLen = v, kind, n
			}
		}
	}
	return best
}

func stripPort(host string) string {
	i := strings.LastIndexByte(host, ':')
	if i < 0 || strings.LastIndexByte(host, ']') > i {
		return host
	}
	return host[:i]
}

type pathKind uint8

const (
	pathPrefix pathKind = iota + 1
	pathExact
	pathRegex
	pathSeparatedPrefix
)

type routeMatch struct {
	kind          pathKind
	value         string
	re            *regexp.Regexp
	caseSensitive bool
	headers       []match.Header
	queries       []match.Query
	needQuery     bool
	grpc          bool
}

func newRouteMatch(m *routev3.RouteMatch) (routeMatch, error) {
	rm := routeMatch{caseSensitive: true}
	if cs := m.GetCaseSensitive(); cs != nil {
		rm.caseSensitive = cs.GetValue()
	}
	switch p := m.GetPathSpecifier().(type) {
	case *routev3.RouteMatch_Prefix:
		rm.kind, rm.value = pathPrefix, p.Prefix
	case *routev3.RouteMatch_Path:
		rm.kind, rm.value = pathExact, p.Path
	case *routev3.RouteMatch_SafeRegex:
		re, err := match.CompileRegex(p.SafeRegex)
		if err != nil {
			return rm, fmt.Errorf("safe_regex: %w", err)
		}
		rm.kind, rm.re = pathRegex, re
	case *routev3.RouteMatch_PathSeparatedPrefix:
		rm.kind, rm.value = pathSeparatedPrefix, p.PathSeparatedPrefix
	default:
		return rm, fmt.Errorf("path specifier %T: %w", p, ErrUnsupported)
	}
	switch {
	case m.GetRuntimeFraction() != nil:
		return rm, fmt.Errorf("runtime_fraction: %w", ErrUnsupported)
	case len(m.GetCookies()) > 0:
		return rm, fmt.Errorf("cookies: %w", ErrUnsupported)
	case m.GetTlsContext() != nil:
		return rm, fmt.Errorf("tls_context: %w", ErrUnsupported)
	case len(m.GetDynamicMetadata()) > 0:
		return rm, fmt.Errorf("dynamic_metadata: %w", ErrUnsupported)
	case len(m.GetFilterState()) > 0:
		return rm, fmt.Errorf("filter_state: %w", ErrUnsupported)
	}
	rm.grpc = m.GetGrpc() != nil
	for i, h := range m.GetHeaders() {
		hm, err := match.NewHeader(h)
		if err != nil {
			return rm, fmt.Errorf("headers[%d]: %w", i, err)
		}
		rm.headers = append(rm.headers, hm)
	}
	for i, q := range m.GetQueryParameters() {
		qm, err := match.NewQuery(q)
		if err != nil {
			return rm, fmt.Errorf("query_parameters[%d]: %w", i, err)
		}
		rm.queries = append(rm.queries, qm)
	}
	rm.needQuery = len(rm.queries) > 0
	return rm, nil
}

// matches follows Envoy's RouteEntryImplBase::matchRoute and the path
// entries: prefix sees the whole :path (query included); path, regex and
// path_separated_prefix see it without query and fragment.
func (m *routeMatch) matches(path string, h match.Headers, q match.QueryParams) bool {
	bare := path
	if i := strings.IndexAny(bare, "?#"); i >= 0 {
		bare = bare[:i]
	}
	switch m.kind {
	case pathPrefix:
		if !hasPrefix(path, m.value, m.caseSensitive) {
			return false
		}
	case pathExact:
		if !equal(bare, m.value, m.caseSensitive) {
			return false
		}
	case pathRegex:
		if !m.re.MatchString(bare) {
			return false
		}
	case pathSeparatedPrefix:
		if !hasPrefix(bare, m.value, m.caseSensitive) ||
			(len(bare) > len(m.value) && bare[len(m.value)] != '/') {
			return false
		}
	default:
		return false
	}
	if m.grpc && !isGRPC(h) {
		return false
	}
	for _, hm := range m.headers {
		if !hm.Match(h) {
			return false
		}
	}
	for _, qm := range m.queries {
		if !qm.Match(q) {
			return false
		}
	}
	return true
}

// isGRPC is Envoy's Grpc::Common::isGrpcRequestHeaders: content-type
// application/grpc, optionally followed by '+' or ';'.
func isGRPC(h match.Headers) bool {
	ct := first(h.Values("content-type"))
	const g = "application/grpc"
	return strings.HasPrefix(ct, g) && (len(ct) == len(g) || ct[len(g)] == '+' || ct[len(g)] == ';')
}

func hasPrefix(s, p string, cs bool) bool {
	if cs {
		return strings.HasPrefix(s, p)
	}
	return len(s) >= len(p) && match.EqualFold(s[:len(p)], p)
}

func equal(a, b string, cs bool) bool {
	if cs {
		return a == b
	}
	return match.EqualFold(a, b)
}
