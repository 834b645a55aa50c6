package route

import (
	"errors"
	"fmt"
	"net/netip"
	"regexp"
	"strconv"
	"strings"
	"time"

	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
)

// Forward is a route action to upstream clusters. Exactly one of Cluster
// and Weighted is set.
type Forward struct {
	// Cluster is the one upstream cluster.
	Cluster string
	// Weighted are the weighted clusters in configuration order;
	// TotalWeight is their sum.
	Weighted    []WeightedCluster
	TotalWeight uint64
	// Timeout bounds the whole request, retries included; zero disables
	// it. A route that sets none gets DefaultTimeout (Envoy's).
	Timeout time.Duration
	// IdleTimeout bounds a stream's idle time once routed, in place of
	// the HCM's stream_idle_timeout; zero: the HCM's; negative: none (the
	// route set 0s, which turns the HCM's off, as in Envoy).
	IdleTimeout time.Duration
	// Retry is the route's own retry policy; nil defers to the virtual
	// host's (Route.RetryPolicy).
	Retry *RetryPolicy
	// PrefixRewrite replaces the part of the path the route matched, and
	// RegexRewrite/RegexSubstitution the path without query; empty/nil:
	// none.
	PrefixRewrite     string
	RegexRewrite      *regexp.Regexp
	RegexSubstitution string
	// HostRewrite replaces :authority upstream; empty keeps it.
	HostRewrite string
	// Upgrades are the allowed upgrade types ("websocket"), lower case.
	Upgrades []string
	// MaxStreamDuration bounds a stream's life, counted from its start,
	// in place of the HCM's max_stream_duration; zero: the HCM's;
	// negative: none (the route set 0s).
	MaxStreamDuration time.Duration
	// HonorGRPCTimeout says a request's grpc-timeout header bounds it
	// (max_stream_duration.grpc_timeout_header_max, or the deprecated
	// max_grpc_timeout istiod still sets, "0s"); MaxGRPCTimeout caps that
	// deadline, zero meaning uncapped.
	MaxGRPCTimeout   time.Duration
	HonorGRPCTimeout bool
	// ClusterNotFound is the status when the picked cluster does not exist
	// (cluster_not_found_response_code): 503 by default, 500 for Gateway
	// API routes (istiod's choice), or 404.
	ClusterNotFound int
}

// WeightedCluster is one entry of weighted_clusters.
type WeightedCluster struct {
	Name   string
	Weight uint32
	// RequestHeaders and ResponseHeaders are the entry's own mutations,
	// applied before the route's.
	RequestHeaders, ResponseHeaders *Mutations
}

// Pick chooses the upstream cluster with random, as Envoy does with its
// per-request random value: random modulo the total weight falls in one
// cluster's share of the cumulative weights. ok is false when no cluster
// has weight: Envoy's conversion from Istio answers 500 then.
func (f *Forward) Pick(random uint64) (cluster string, wc *WeightedCluster, ok bool) {
	if f.Cluster != "" {
		return f.Cluster, nil, true
	}
	if f.TotalWeight == 0 {
		return "", nil, false
	}
	v := random % f.TotalWeight
	var end uint64
	for i := range f.Weighted {
		end += uint64(f.Weighted[i].Weight)
		if v < end {
			return f.Weighted[i].Name, &f.Weighted[i], true
		}
	}
	return "", nil, false
}

func newForward(a *routev3.RouteAction) (*Forward, error) {
	f := &Forward{Timeout: DefaultTimeout}
	switch cs := a.GetClusterSpecifier().(type) {
	case *routev3.RouteAction_Cluster:
		if cs.Cluster == "" {
			return nil, errors.New("cluster: empty")
		}
		f.Cluster = cs.Cluster
	case *routev3.RouteAction_WeightedClusters:
		wc := cs.WeightedClusters
		if wc.GetRuntimeKeyPrefix() != "" || wc.GetHeaderName() != "" || wc.GetRandomValueSpecifier() != nil || wc.GetUseHashPolicy().GetValue() {
			return nil, fmt.Errorf("weighted_clusters: runtime_key_prefix, header_name, random_value_specifier, use_hash_policy: %w", ErrUnsupported)
		}
		for i, c := range wc.GetClusters() {
			if c.GetName() == "" || c.GetClusterHeader() != "" || c.GetMetadataMatch() != nil || len(c.GetTypedPerFilterConfig()) > 0 || c.GetHostRewriteSpecifier() != nil {
				return nil, fmt.Errorf("weighted_clusters.clusters[%d]: only name, weight and header mutations: %w", i, ErrUnsupported)
			}
			w := WeightedCluster{Name: c.GetName(), Weight: c.GetWeight().GetValue()}
			var err error
			if w.RequestHeaders, err = newMutations(c.GetRequestHeadersToAdd(), c.GetRequestHeadersToRemove()); err != nil {
				return nil, fmt.Errorf("weighted_clusters.clusters[%d]: %w", i, err)
			}
			if w.ResponseHeaders, err = newMutations(c.GetResponseHeadersToAdd(), c.GetResponseHeadersToRemove()); err != nil {
				return nil, fmt.Errorf("weighted_clusters.clusters[%d]: %w", i, err)
			}
			f.Weighted = append(f.Weighted, w)
			f.TotalWeight += uint64(w.Weight)
		}
		if len(f.Weighted) == 0 {
			return nil, errors.New("weighted_clusters: no clusters")
		}
		if tw := wc.GetTotalWeight(); tw != nil && uint64(tw.GetValue()) != f.TotalWeight {
			return nil, fmt.Errorf("weighted_clusters: total_weight %d but weights sum to %d", tw.GetValue(), f.TotalWeight)
		}
	default:
		return nil, fmt.Errorf("cluster specifier %T: %w", cs, ErrUnsupported)
	}
	if t := a.GetTimeout(); t != nil {
		f.Timeout = t.AsDuration()
	}
	if t := a.GetIdleTimeout(); t != nil {
		f.IdleTimeout = overrides(t.AsDuration())
	}
	if a.GetRetryPolicy() != nil {
		var err error
		if f.Retry, err = newRetryPolicy(a.GetRetryPolicy()); err != nil {
			return nil, fmt.Errorf("retry_policy: %w", err)
		}
	}
	f.PrefixRewrite = a.GetPrefixRewrite()
	if rr := a.GetRegexRewrite(); rr != nil {
		re, err := compileSearch(rr.GetPattern().GetRegex())
		if err != nil {
			return nil, fmt.Errorf("regex_rewrite: %w", err)
		}
		f.RegexRewrite, f.RegexSubstitution = re, convertSubstitution(rr.GetSubstitution())
	}
	switch h := a.GetHostRewriteSpecifier().(type) {
	case nil:
	case *routev3.RouteAction_HostRewriteLiteral:
		f.HostRewrite = h.HostRewriteLiteral
	default:
		return nil, fmt.Errorf("host rewrite %T: %w", h, ErrUnsupported)
	}
	for i, u := range a.GetUpgradeConfigs() {
		if u.GetConnectConfig() != nil {
			return nil, fmt.Errorf("upgrade_configs[%d]: connect_config: %w", i, ErrUnsupported)
		}
		if u.GetEnabled() == nil || u.GetEnabled().GetValue() {
			f.Upgrades = append(f.Upgrades, strings.ToLower(u.GetUpgradeType()))
		}
	}
	var ok bool
	if f.ClusterNotFound, ok = notFoundCodes[a.GetClusterNotFoundResponseCode()]; !ok {
		return nil, fmt.Errorf("cluster_not_found_response_code %v: %w", a.GetClusterNotFoundResponseCode(), ErrUnsupported)
	}
	if m := a.GetMaxGrpcTimeout(); m != nil {
		f.HonorGRPCTimeout, f.MaxGRPCTimeout = true, m.AsDuration()
	}
	if m := a.GetMaxStreamDuration(); m != nil {
		if d := m.GetMaxStreamDuration(); d != nil {
			f.MaxStreamDuration = overrides(d.AsDuration())
		}
		if m.GetGrpcTimeoutHeaderMax() != nil {
			f.HonorGRPCTimeout = true
			f.MaxGRPCTimeout = m.GetGrpcTimeoutHeaderMax().AsDuration()
		}
		if m.GetGrpcTimeoutHeaderOffset() != nil {
			return nil, fmt.Errorf("max_stream_duration.grpc_timeout_header_offset: %w", ErrUnsupported)
		}
	}
	return f, nil
}

// overrides is a route's duration that replaces the HCM's: set to zero,
// it turns the HCM's off (negative), which unset (zero) does not.
func overrides(d time.Duration) time.Duration {
	if d <= 0 {
		return -1
	}
	return d
}

// compileSearch compiles an RE2 pattern for searching (rewrites replace
// every match, not a full match).
func compileSearch(pattern string) (*regexp.Regexp, error) {
	if pattern == "" {
		return nil, errors.New("empty regex")
	}
	return regexp.Compile(pattern)
}

// convertSubstitution turns RE2's \1 group references into Go's ${1}.
func convertSubstitution(s string) string {
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+1 < len(s) && s[i+1] >= '0' && s[i+1] <= '9' {
			b.WriteString("${" + string(s[i+1]) + "}")
			i++
			continue
		}
		if s[i] == '$' {
			b.WriteString("$$")
			continue
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

// UpstreamPath returns the :path to send upstream for a request whose
// normalised path is path: the route's prefix or regex rewrite applied
// (query kept), else path.
func (r *Route) UpstreamPath(path string) string {
	f := r.Forward
	if f == nil {
		return path
	}
	switch {
	case f.PrefixRewrite != "" && r.match.kind != pathRegex:
		return r.rewritePrefix(path, f.PrefixRewrite)
	case f.RegexRewrite != nil:
		p, q := splitQuery(path)
		return f.RegexRewrite.ReplaceAllString(p, f.RegexSubstitution) + q
	}
	return path
}

// rewritePrefix replaces the part of path the route's prefix, path or
// path_separated_prefix matched.
func (r *Route) rewritePrefix(path, with string) string {
	return with + path[min(len(r.match.value), len(path)):]
}

// Redirect is a route's redirect action.
type Redirect struct {
	// Scheme replaces the request's; empty keeps it.
	Scheme string
	// Host replaces the request's host; empty keeps it.
	Host string
	// Port is appended to the host; zero keeps the request's port (but
	// drops :80 for https and :443 for http, as Envoy does).
	Port uint32
	// Path replaces the path (keeping the request's query unless Path has
	// its own); PrefixRewrite replaces the matched prefix. Empty: neither.
	Path, PrefixRewrite string
	// Code is 301, 302, 303, 307 or 308.
	Code int
	// StripQuery drops the query.
	StripQuery bool
}

var (
	notFoundCodes = map[routev3.RouteAction_ClusterNotFoundResponseCode]int{
		routev3.RouteAction_SERVICE_UNAVAILABLE:   503,
		routev3.RouteAction_NOT_FOUND:             404,
		routev3.RouteAction_INTERNAL_SERVER_ERROR: 500,
	}
	redirectCodes = map[routev3.RedirectAction_RedirectResponseCode]int{
		routev3.RedirectAction_MOVED_PERMANENTLY:  301,
		routev3.RedirectAction_FOUND:              302,
		routev3.RedirectAction_SEE_OTHER:          303,
		routev3.RedirectAction_TEMPORARY_REDIRECT: 307,
		routev3.RedirectAction_PERMANENT_REDIRECT: 308,
	}
)

func newRedirect(a *routev3.RedirectAction) (*Redirect, error) {
	r := &Redirect{Host: a.GetHostRedirect(), Port: a.GetPortRedirect(), StripQuery: a.GetStripQuery()}
	switch s := a.GetSchemeRewriteSpecifier().(type) {
	case nil:
	case *routev3.RedirectAction_HttpsRedirect:
		if s.HttpsRedirect {
			r.Scheme = "https"
		}
	case *routev3.RedirectAction_SchemeRedirect:
		r.Scheme = strings.ToLower(s.SchemeRedirect)
	}
	switch p := a.GetPathRewriteSpecifier().(type) {
	case nil:
	case *routev3.RedirectAction_PathRedirect:
		r.Path = p.PathRedirect
	case *routev3.RedirectAction_PrefixRewrite:
		r.PrefixRewrite = p.PrefixRewrite
	default:
		return nil, fmt.Errorf("path rewrite %T: %w", p, ErrUnsupported)
	}
	var ok bool
	if r.Code, ok = redirectCodes[a.GetResponseCode()]; !ok {
		return nil, fmt.Errorf("response_code %v: %w", a.GetResponseCode(), ErrUnsupported)
	}
	return r, nil
}

// Location is the redirect's target for a request with this scheme,
// :authority and (normalised) :path, as Envoy's Http::Utility::newUri
// builds it.
func (r *Route) Location(scheme, authority, path string) string {
	rd := r.Redirect
	if rd == nil {
		return ""
	}
	if rd.Scheme != "" {
		scheme = rd.Scheme
	}
	port := ""
	if rd.Port != 0 {
		port = ":" + strconv.FormatUint(uint64(rd.Port), 10)
	}
	host := rd.Host
	if host == "" {
		host = authority
		if h, p, ok := splitHostPort(authority); ok &&
			((scheme == "https" && p == "80") || (scheme == "http" && p == "443") || port != "") {
			host = h
		}
	}
	switch {
	case rd.Path != "":
		if strings.Contains(rd.Path, "?") {
			path = rd.Path
		} else {
			_, q := splitQuery(path)
			path = rd.Path + q
		}
	case rd.PrefixRewrite != "" && r.match.kind != pathRegex:
		path = r.rewritePrefix(path, rd.PrefixRewrite)
	}
	if !strings.HasPrefix(path, "/") {
		path = "/" + path
	}
	if rd.StripQuery {
		path, _ = splitQuery(path)
	}
	return scheme + "://" + host + port + path
}

// splitHostPort splits "host:port" and "[v6]:port"; ok is false without
// a port.
func splitHostPort(a string) (host, port string, ok bool) {
	i := strings.LastIndexByte(a, ':')
	if i < 0 || strings.LastIndexByte(a, ']') > i {
		return a, "", false
	}
	if _, err := netip.ParseAddr(a); err == nil {
		return a, "", false // a bare IPv6 address
	}
	return a[:i], a[i+1:], true
}

// DirectResponse is a route's direct_response: Envoy answers itself.
type DirectResponse struct {
	Status int
	// Body is sent as it is; empty sends none.
	Body string
}

func newDirectResponse(a *routev3.DirectResponseAction) (*DirectResponse, error) {
	d := &DirectResponse{Status: int(a.GetStatus())}
	if d.Status < 200 || d.Status > 599 {
		return nil, fmt.Errorf("status %d: not in [200, 599]", d.Status)
	}
	if a.GetBodyFormat() != nil {
		return nil, fmt.Errorf("body_format: %w", ErrUnsupported)
	}
	if b := a.GetBody(); b != nil {
		switch {
		case b.GetInlineString() != "":
			d.Body = b.GetInlineString()
		case len(b.GetInlineBytes()) > 0:
			d.Body = string(b.GetInlineBytes())
		case b.GetFilename() != "" || b.GetEnvironmentVariable() != "":
			return nil, fmt.Errorf("body from a file or the environment: %w", ErrUnsupported)
		}
	}
	return d, nil
}
