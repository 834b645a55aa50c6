package match

import (
	"errors"
	"net/http"
	"testing"

	corev3 "github.com/cncf/xds/go/xds/core/v3"
	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	matcherv3 "github.com/envoyproxy/go-control-plane/envoy/type/matcher/v3"
	typev3 "github.com/envoyproxy/go-control-plane/envoy/type/v3"
)

func exact(v string, ic bool) *matcherv3.StringMatcher {
	return &matcherv3.StringMatcher{MatchPattern: &matcherv3.StringMatcher_Exact{Exact: v}, IgnoreCase: ic}
}

func TestString(t *testing.T) {
	regex := func(r string) *matcherv3.StringMatcher {
		return &matcherv3.StringMatcher{MatchPattern: &matcherv3.StringMatcher_SafeRegex{SafeRegex: &matcherv3.RegexMatcher{Regex: r}}}
	}
	cases := []struct {
		name string
		m    *matcherv3.StringMatcher
		in   string
		want bool
	}{
		{"exact", exact("GET", false), "GET", true},
		{"exact is case sensitive", exact("GET", false), "get", false},
		{"exact ignore case", exact("GET", true), "get", true},
		// Envoy folds ASCII only: U+212A KELVIN SIGN is not "k".
		{"ignore case is ASCII only", exact("k", true), "\u212a", false},
		{"empty exact matches empty only", exact("", false), "x", false},
		{"prefix", &matcherv3.StringMatcher{MatchPattern: &matcherv3.StringMatcher_Prefix{Prefix: "spiffe://cluster.local/"}}, "spiffe://cluster.local/ns/a/sa/b", true},
		{"prefix ignore case", &matcherv3.StringMatcher{MatchPattern: &matcherv3.StringMatcher_Prefix{Prefix: "/API"}, IgnoreCase: true}, "/api/v1", true},
		{"suffix", &matcherv3.StringMatcher{MatchPattern: &matcherv3.StringMatcher_Suffix{Suffix: ".example.com"}}, "a.example.com", true},
		{"suffix ignore case", &matcherv3.StringMatcher{MatchPattern: &matcherv3.StringMatcher_Suffix{Suffix: ".EXAMPLE.com"}, IgnoreCase: true}, "a.example.COM", true},
		{"contains", &matcherv3.StringMatcher{MatchPattern: &matcherv3.StringMatcher_Contains{Contains: "/sa/"}}, "spiffe://td/ns/x/sa/y", true},
		{"contains ignore case", &matcherv3.StringMatcher{MatchPattern: &matcherv3.StringMatcher_Contains{Contains: "ADMIN"}, IgnoreCase: true}, "/x/admin/y", true},
		// safe_regex is a full match (RE2 FullMatch), not a search.
		{"regex full match", regex(".*/ns/default/.*"), "spiffe://cluster.local/ns/default/sa/sleep", true},
		{"regex is anchored", regex("ns/default"), "spiffe://cluster.local/ns/default/sa/sleep", false},
		{"regex alternation anchored as a whole", regex("a|b"), "ab", false},
		{"istiod's any principal", regex(".+"), "", false},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			s, err := NewString(c.m)
			if err != nil {
				t.Fatal(err)
			}
			if got := s.Match(c.in); got != c.want {
				t.Errorf("%v.Match(%q) = %v, want %v", s, c.in, got, c.want)
			}
		})
	}
}

func TestStringRejects(t *testing.T) {
	cases := []struct {
		name        string
		m           *matcherv3.StringMatcher
		unsupported bool
	}{
		{"no pattern", &matcherv3.StringMatcher{}, false},
		{"empty prefix", &matcherv3.StringMatcher{MatchPattern: &matcherv3.StringMatcher_Prefix{}}, false},
		{"bad regex", &matcherv3.StringMatcher{MatchPattern: &matcherv3.StringMatcher_SafeRegex{SafeRegex: &matcherv3.RegexMatcher{Regex: "("}}}, false},
		// RE2 has no backreferences; neither has Go.
		{"backreference", &matcherv3.StringMatcher{MatchPattern: &matcherv3.StringMatcher_SafeRegex{SafeRegex: &matcherv3.RegexMatcher{Regex: `(a)\1`}}}, false},
		{"custom", &matcherv3.StringMatcher{MatchPattern: &matcherv3.StringMatcher_Custom{Custom: &corev3.TypedExtensionConfig{Name: "x"}}}, true},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			_, err := NewString(c.m)
			if err == nil {
				t.Fatal("accepted")
			}
			if errors.Is(err, ErrUnsupported) != c.unsupported {
				t.Errorf("error %v: unsupported = %v, want %v", err, !c.unsupported, c.unsupported)
			}
		})
	}
}

func TestHeader(t *testing.T) {
	req := &Request{
		Method: "GET", Authority: "productpage:9080", Path: "/productpage?u=normal", Scheme: "http",
		Header: http.Header{"End-User": {"jason"}, "X-Multi": {"a", "b"}, "X-Num": {"42"}, "X-Empty": {""}},
	}
	sm := func(name string, m *matcherv3.StringMatcher, invert bool) *routev3.HeaderMatcher {
		return &routev3.HeaderMatcher{Name: name, HeaderMatchSpecifier: &routev3.HeaderMatcher_StringMatch{StringMatch: m}, InvertMatch: invert}
	}
	present := func(name string, p, invert bool) *routev3.HeaderMatcher {
		return &routev3.HeaderMatcher{Name: name, HeaderMatchSpecifier: &routev3.HeaderMatcher_PresentMatch{PresentMatch: p}, InvertMatch: invert}
	}
	cases := []struct {
		name string
		m    *routev3.HeaderMatcher
		want bool
	}{
		{"method", sm(":method", exact("GET", false), false), true},
		{"authority", sm(":authority", exact("productpage:9080", false), false), true},
		{"name is case-insensitive", sm("End-User", exact("jason", false), false), true},
		{"value differs", sm("end-user", exact("bob", false), false), false},
		{"inverted", sm("end-user", exact("bob", false), true), true},
		// A missing header matches nothing, inverted or not, but present_match: false.
		{"missing", sm("x-none", exact("a", false), false), false},
		{"missing inverted", sm("x-none", exact("a", false), true), false},
		{"present", present("end-user", true, false), true},
		{"present missing", present("x-none", true, false), false},
		{"present false matches absent", present("x-none", false, false), true},
		{"present false on present", present("end-user", false, false), false},
		{"present inverted absent", present("x-none", true, true), true},
		{"present inverted present", present("end-user", true, true), false},
		{"empty value is present", present("x-empty", true, false), true},
		// Several values are joined with ",".
		{"multiple values joined", sm("x-multi", exact("a,b", false), false), true},
		{"multiple values not separately", sm("x-multi", exact("b", false), false), false},
		{"treat missing as empty", &routev3.HeaderMatcher{Name: "x-none", TreatMissingHeaderAsEmpty: true, HeaderMatchSpecifier: &routev3.HeaderMatcher_StringMatch{StringMatch: exact("", false)}}, true},
		{"range", &routev3.HeaderMatcher{Name: "x-num", HeaderMatchSpecifier: &routev3.HeaderMatcher_RangeMatch{RangeMatch: &typev3.Int64Range{Start: 40, End: 43}}}, true},
		{"range half open", &routev3.HeaderMatcher{Name: "x-num", HeaderMatchSpecifier: &routev3.HeaderMatcher_RangeMatch{RangeMatch: &typev3.Int64Range{Start: 0, End: 42}}}, false},
		{"no specifier is presence", &routev3.HeaderMatcher{Name: "end-user"}, true},
		// Host is :authority in Envoy; a header named host is never there.
		{"host header", present("host", true, false), false},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			h, err := NewHeader(c.m)
			if err != nil {
				t.Fatal(err)
			}
			if got := h.Match(req); got != c.want {
				t.Errorf("%v: got %v, want %v", h, got, c.want)
			}
		})
	}
	if _, err := NewHeader(&routev3.HeaderMatcher{Name: "x", HeaderMatchSpecifier: &routev3.HeaderMatcher_ExactMatch{ExactMatch: ""}}); !errors.Is(err, ErrUnsupported) {
		t.Errorf("deprecated exact_match: %v, want ErrUnsupported (an empty one would match everything in Envoy)", err)
	}
}

func TestQuery(t *testing.T) {
	params := ParseQuery("/p?a=1&b=%2Fx&a=2&flag&e=%zz#frag")
	sm := func(name string, m *matcherv3.StringMatcher) *routev3.QueryParameterMatcher {
		return &routev3.QueryParameterMatcher{Name: name, QueryParameterMatchSpecifier: &routev3.QueryParameterMatcher_StringMatch{StringMatch: m}}
	}
	pm := func(name string, p bool) *routev3.QueryParameterMatcher {
		return &routev3.QueryParameterMatcher{Name: name, QueryParameterMatchSpecifier: &routev3.QueryParameterMatcher_PresentMatch{PresentMatch: p}}
	}
	cases := []struct {
		name string
		m    *routev3.QueryParameterMatcher
		want bool
	}{
		{"first value", sm("a", exact("1", false)), true},
		{"second value ignored", sm("a", exact("2", false)), false},
		{"decoded", sm("b", exact("/x", false)), true},
		{"invalid escape kept", sm("e", exact("%zz", false)), true},
		{"key without value", sm("flag", exact("", false)), true},
		{"present", pm("flag", true), true},
		{"absent present false", pm("nope", false), true},
		{"present false on present", pm("a", false), false},
		{"missing", sm("nope", exact("", false)), false},
		{"no specifier is presence", &routev3.QueryParameterMatcher{Name: "a"}, true},
		{"fragment is not query", sm("e", exact("%zz#frag", false)), false},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			q, err := NewQuery(c.m)
			if err != nil {
				t.Fatal(err)
			}
			if got := q.Match(params); got != c.want {
				t.Errorf("got %v, want %v (params %v)", got, c.want, params)
			}
		})
	}
}
