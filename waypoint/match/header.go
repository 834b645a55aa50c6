package match

import (
	"errors"
	"fmt"
	"net/http"
	"net/textproto"
	"strconv"
	"strings"

	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
)

// Headers is a request's headers as Envoy's matchers see them: by
// lower-case name, with the pseudo-headers ":method", ":authority",
// ":path" (after normalisation) and ":scheme".
type Headers interface {
	// Values returns the header's values in order; nil when absent.
	Values(name string) []string
}

// Request is Headers for a request held as net/http holds it.
type Request struct {
	Method, Authority, Path, Scheme string
	// Header holds the regular headers, with canonical keys.
	Header http.Header
}

// Values implements Headers. "host" is never found: Envoy folds Host into
// ":authority", as net/http folds it into Request.Host.
func (r *Request) Values(name string) []string {
	switch name {
	case ":method":
		return single(r.Method)
	case ":authority":
		return single(r.Authority)
	case ":path":
		return single(r.Path)
	case ":scheme":
		return single(r.Scheme)
	case "host":
		return nil
	}
	return r.Header[textproto.CanonicalMIMEHeaderKey(name)]
}

func single(v string) []string {
	if v == "" {
		return nil
	}
	return []string{v}
}

// Header is a compiled envoy.config.route.v3.HeaderMatcher.
//
// Semantics (Envoy source/common/http/header_utility.cc): several values
// of one header are joined with "," and matched as one; a missing header
// matches only present_match: false (or, inverted, present_match: true),
// unless treat_missing_header_as_empty makes it "". invert_match negates
// the result for a present header.
type Header struct {
	name    string
	kind    headerKind
	str     String
	present bool
	lo, hi  int64 // range_match [lo, hi)
	invert  bool
	missing bool // treat_missing_header_as_empty
}

type headerKind uint8

const (
	headerString headerKind = iota + 1
	headerPresent
	headerRange
)

// NewHeader compiles m. The deprecated forms (exact_match,
// safe_regex_match, prefix_match, suffix_match, contains_match) are
// rejected: istiod sends string_match, and Envoy's quirks for them (an
// empty exact_match matches everything) are not worth carrying.
func NewHeader(m *routev3.HeaderMatcher) (Header, error) {
	name := strings.ToLower(m.GetName())
	if name == "" {
		return Header{}, errors.New("header matcher: no name")
	}
	h := Header{name: name, invert: m.GetInvertMatch(), missing: m.GetTreatMissingHeaderAsEmpty()}
	switch s := m.GetHeaderMatchSpecifier().(type) {
	case *routev3.HeaderMatcher_StringMatch:
		str, err := NewString(s.StringMatch)
		if err != nil {
			return Header{}, fmt.Errorf("header %s: %w", name, err)
		}
		h.kind, h.str = headerString, str
	case *routev3.HeaderMatcher_PresentMatch:
		h.kind, h.present = headerPresent, s.PresentMatch
	case *routev3.HeaderMatcher_RangeMatch:
		h.kind, h.lo, h.hi = headerRange, s.RangeMatch.GetStart(), s.RangeMatch.GetEnd()
	case nil:
		// No specifier: Envoy treats it as present_match: true.
		h.kind, h.present = headerPresent, true
	default:
		return Header{}, fmt.Errorf("header %s: deprecated specifier %T: %w", name, s, ErrUnsupported)
	}
	return h, nil
}

// Name is the lower-case header name.
func (h Header) Name() string { return h.name }

// Match reports whether hs match.
func (h Header) Match(hs Headers) bool {
	vals := hs.Values(h.name)
	if vals == nil && !h.missing {
		if h.invert {
			return h.kind == headerPresent && h.present
		}
		return h.kind == headerPresent && !h.present
	}
	v := strings.Join(vals, ",")
	var m bool
	switch h.kind {
	case headerString:
		m = h.str.Match(v)
	case headerPresent:
		m = h.present
	case headerRange:
		n, err := strconv.ParseInt(v, 10, 64)
		m = err == nil && n >= h.lo && n < h.hi
	}
	return m != h.invert
}

// String renders the matcher for logs and errors.
func (h Header) String() string {
	var s string
	switch h.kind {
	case headerString:
		s = h.str.String()
	case headerPresent:
		s = fmt.Sprintf("present=%v", h.present)
	case headerRange:
		s = fmt.Sprintf("range [%d,%d)", h.lo, h.hi)
	}
	if h.invert {
		s = "not " + s
	}
	return h.name + " " + s
}
