package match

import (
	"errors"
	"fmt"
	"strings"

	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
)

// Query is a compiled envoy.config.route.v3.QueryParameterMatcher. Only
// a parameter's first value counts; present_match: false matches an
// absent parameter (Envoy's current behaviour,
// enable_new_query_param_present_match_behavior); no specifier is a
// presence test (source/common/router/config_utility.cc).
type Query struct {
	name       string
	str        *String
	present    bool
	hasPresent bool
}

// NewQuery compiles m.
func NewQuery(m *routev3.QueryParameterMatcher) (Query, error) {
	if m.GetName() == "" {
		return Query{}, errors.New("query parameter matcher: no name")
	}
	q := Query{name: m.GetName()}
	switch s := m.GetQueryParameterMatchSpecifier().(type) {
	case *routev3.QueryParameterMatcher_StringMatch:
		str, err := NewString(s.StringMatch)
		if err != nil {
			return Query{}, fmt.Errorf("query parameter %s: %w", q.name, err)
		}
		q.str = &str
	case *routev3.QueryParameterMatcher_PresentMatch:
		q.present, q.hasPresent = s.PresentMatch, true
	}
	return q, nil
}

// Match reports whether params match.
func (q Query) Match(params QueryParams) bool {
	v, ok := params.First(q.name)
	if q.hasPresent {
		return ok == q.present
	}
	if !ok {
		return false
	}
	if q.str == nil {
		return true
	}
	return q.str.Match(v)
}

// QueryParams are a request's query parameters, decoded, in order.
type QueryParams []struct{ Key, Value string }

// ParseQuery parses the query string of path as Envoy's
// QueryParamsMulti::parseAndDecodeQueryString does: after the first '?',
// up to a '#', split on '&', each "key=value" or "key" (value ""),
// percent-decoded ("%zz" stays as it is; '+' is not a space).
func ParseQuery(path string) QueryParams {
	i := strings.IndexByte(path, '?')
	if i < 0 {
		return nil
	}
	q := path[i+1:]
	if j := strings.IndexByte(q, '#'); j >= 0 {
		q = q[:j]
	}
	var out QueryParams
	for _, part := range strings.Split(q, "&") {
		if part == "" {
			continue
		}
		k, v, _ := strings.Cut(part, "=")
		out = append(out, struct{ Key, Value string }{PercentDecode(k), PercentDecode(v)})
	}
	return out
}

// First returns the first value of key.
func (p QueryParams) First(key string) (string, bool) {
	for _, kv := range p {
		if kv.Key == key {
			return kv.Value, true
		}
	}
	return "", false
}

// PercentDecode decodes every valid %XX; invalid escapes stay as they are.
func PercentDecode(s string) string {
	if !strings.Contains(s, "%") {
		return s
	}
	b := make([]byte, 0, len(s))
	for i := 0; i < len(s); i++ {
		if s[i] == '%' && i+2 < len(s) && IsHex(s[i+1]) && IsHex(s[i+2]) {
			b = append(b, Unhex(s[i+1])<<4|Unhex(s[i+2]))
			i += 2
			continue
		}
		b = append(b, s[i])
	}
	return string(b)
}

// IsHex reports whether c is a hexadecimal digit.
func IsHex(c byte) bool {
	return '0' <= c && c <= '9' || 'a' <= c && c <= 'f' || 'A' <= c && c <= 'F'
}

// Unhex is the value of the hexadecimal digit c.
func Unhex(c byte) byte {
	switch {
	case '0' <= c && c <= '9':
		return c - '0'
	case 'a' <= c && c <= 'f':
		return c - 'a' + 10
	default:
		return c - 'A' + 10
	}
}
