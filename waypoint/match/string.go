// Package match evaluates Envoy's string, header and query-parameter
// matchers (envoy.type.matcher.v3.StringMatcher,
// envoy.config.route.v3.HeaderMatcher and QueryParameterMatcher) with
// Envoy's semantics, for the RBAC and route engines of amber-waypoint.
package match

import (
	"errors"
	"fmt"
	"regexp"
	"strings"

	matcherv3 "github.com/envoyproxy/go-control-plane/envoy/type/matcher/v3"
)

// ErrUnsupported is wrapped by every error for a matcher this package
// cannot evaluate the way Envoy would (extension matchers, deprecated
// forms istiod never sends). Callers fail closed on it.
var ErrUnsupported = errors.New("unsupported matcher")

// MaxRegexLen bounds a safe_regex pattern. Envoy bounds RE2's program
// size instead (runtime re2.max_program_size.error_level, default 100),
// which Go's regexp cannot compute the same way; istiod's regexes are far
// below either bound.
const MaxRegexLen = 4096

type stringKind uint8

const (
	kindExact stringKind = iota + 1
	kindPrefix
	kindSuffix
	kindContains
	kindRegex
)

// String is a compiled envoy.type.matcher.v3.StringMatcher. The zero value
// matches nothing.
type String struct {
	kind       stringKind
	value      string
	ignoreCase bool
	re         *regexp.Regexp
}

// NewString compiles m. ignore_case folds ASCII letters only, as Envoy's
// absl::EqualsIgnoreCase does (so the Kelvin sign does not match "k"); it
// has no effect on safe_regex, which must match the whole value (RE2
// FullMatch, here an anchored Go regexp: both are RE2 syntax).
func NewString(m *matcherv3.StringMatcher) (String, error) {
	if m == nil {
		return String{}, errors.New("string matcher: missing")
	}
	s := String{ignoreCase: m.GetIgnoreCase()}
	switch p := m.GetMatchPattern().(type) {
	case *matcherv3.StringMatcher_Exact:
		s.kind, s.value = kindExact, p.Exact
	case *matcherv3.StringMatcher_Prefix:
		s.kind, s.value = kindPrefix, p.Prefix
	case *matcherv3.StringMatcher_Suffix:
		s.kind, s.value = kindSuffix, p.Suffix
	case *matcherv3.StringMatcher_Contains:
		s.kind, s.value = kindContains, p.Contains
	case *matcherv3.StringMatcher_SafeRegex:
		re, err := CompileRegex(p.SafeRegex)
		if err != nil {
			return String{}, err
		}
		s.kind, s.re, s.ignoreCase = kindRegex, re, false
	case *matcherv3.StringMatcher_Custom:
		return String{}, fmt.Errorf("string matcher: custom %s: %w", p.Custom.GetName(), ErrUnsupported)
	default:
		return String{}, errors.New("string matcher: no match pattern")
	}
	if s.kind != kindExact && s.kind != kindRegex && s.value == "" {
		// Envoy's proto validation: prefix, suffix and contains need at
		// least one byte.
		return String{}, errors.New("string matcher: empty prefix, suffix or contains")
	}
	return s, nil
}

// CompileRegex compiles an envoy.type.matcher.v3.RegexMatcher for a full
// match.
func CompileRegex(m *matcherv3.RegexMatcher) (*regexp.Regexp, error) {
	if m.GetRegex() == "" {
		return nil, errors.New("regex: empty")
	}
	if len(m.GetRegex()) > MaxRegexLen {
		return nil, fmt.Errorf("regex: %d bytes, more than %d", len(m.GetRegex()), MaxRegexLen)
	}
	if m.GetGoogleRe2() != nil && m.GetGoogleRe2().GetMaxProgramSize() != nil {
		return nil, fmt.Errorf("regex: google_re2.max_program_size: %w", ErrUnsupported)
	}
	re, err := regexp.Compile(`^(?:` + m.GetRegex() + `)$`)
	if err != nil {
		return nil, fmt.Errorf("regex %q: %w", m.GetRegex(), err)
	}
	return re, nil
}

// Match reports whether v matches.
func (s String) Match(v string) bool {
	switch s.kind {
	case kindExact:
		if s.ignoreCase {
			return equalFoldASCII(v, s.value)
		}
		return v == s.value
	case kindPrefix:
		if s.ignoreCase {
			return len(v) >= len(s.value) && equalFoldASCII(v[:len(s.value)], s.value)
		}
		return strings.HasPrefix(v, s.value)
	case kindSuffix:
		if s.ignoreCase {
			return len(v) >= len(s.value) && equalFoldASCII(v[len(v)-len(s.value):], s.value)
		}
		return strings.HasSuffix(v, s.value)
	case kindContains:
		if s.ignoreCase {
			return strings.Contains(lowerASCII(v), lowerASCII(s.value))
		}
		return strings.Contains(v, s.value)
	case kindRegex:
		return s.re.MatchString(v)
	}
	return false
}

// String renders the matcher for logs and errors.
func (s String) String() string {
	ic := ""
	if s.ignoreCase {
		ic = " ignore_case"
	}
	switch s.kind {
	case kindExact:
		return fmt.Sprintf("exact %q%s", s.value, ic)
	case kindPrefix:
		return fmt.Sprintf("prefix %q%s", s.value, ic)
	case kindSuffix:
		return fmt.Sprintf("suffix %q%s", s.value, ic)
	case kindContains:
		return fmt.Sprintf("contains %q%s", s.value, ic)
	case kindRegex:
		return fmt.Sprintf("regex %q", s.re.String())
	}
	return "nothing"
}

// EqualFold reports whether a and b are equal with ASCII letters folded
// (absl::EqualsIgnoreCase, what Envoy means by "ignore case").
func EqualFold(a, b string) bool { return equalFoldASCII(a, b) }

func equalFoldASCII(a, b string) bool {
	if len(a) != len(b) {
		return false
	}
	for i := 0; i < len(a); i++ {
		if lowerByte(a[i]) != lowerByte(b[i]) {
			return false
		}
	}
	return true
}

func lowerASCII(s string) string {
	for i := 0; i < len(s); i++ {
		if c := s[i]; 'A' <= c && c <= 'Z' {
			b := []byte(s)
			for j := i; j < len(b); j++ {
				b[j] = lowerByte(b[j])
			}
			return string(b)
		}
	}
	return s
}

func lowerByte(c byte) byte {
	if 'A' <= c && c <= 'Z' {
		return c + ('a' - 'A')
	}
	return c
}
