// Package identity is the SPIFFE workload identity of the mesh,
// spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>.
package identity

import (
	"errors"
	"fmt"
	"net/url"
	"strings"
)

// Length limits. The SPIFFE ID spec (§2.1, §2.3) caps a trust domain at 255
// bytes and a whole ID at 2048; Kubernetes caps namespaces at 63 (a DNS
// label) and service-account names at 253 (a DNS subdomain). We accept
// non-Kubernetes names, so both path segments get the larger bound.
const (
	MaxTrustDomainLen = 255
	MaxSegmentLen     = 253
	MaxLen            = 2048
)

const scheme = "spiffe://"

// Parse errors; a *ParseError wraps exactly one of them.
var (
	ErrEmpty       = errors.New("empty spiffe id")
	ErrTooLong     = errors.New("too long")
	ErrScheme      = errors.New(`scheme is not "spiffe://"`)
	ErrUserinfo    = errors.New("userinfo not allowed")
	ErrPort        = errors.New("port not allowed")
	ErrQuery       = errors.New("query not allowed")
	ErrFragment    = errors.New("fragment not allowed")
	ErrTrustDomain = errors.New("invalid trust domain")
	ErrPath        = errors.New(`path is not "/ns/<namespace>/sa/<service-account>"`)
	ErrSegment     = errors.New("invalid path segment")
)

// ParseError reports why a string is not a mesh SPIFFE ID.
type ParseError struct {
	// Input is the rejected string, truncated to keep logs bounded.
	Input string
	// Err is one of the package's sentinel errors.
	Err error
	// Detail names the offending part, if any.
	Detail string
}

func (e *ParseError) Error() string {
	s := fmt.Sprintf("parse spiffe id %q: %v", e.Input, e.Err)
	if e.Detail != "" {
		s += ": " + e.Detail
	}
	return s
}

func (e *ParseError) Unwrap() error { return e.Err }

func parseError(s string, err error, detail string) error {
	const show = 128
	if len(s) > show {
		s = s[:show] + "..."
	}
	return &ParseError{Input: s, Err: err, Detail: detail}
}

// ID is a workload identity. Two IDs are the same identity only if all three
// fields are byte-for-byte equal: there is no case folding and no wildcard.
type ID struct {
	TrustDomain    string
	Namespace      string
	ServiceAccount string
}

// String returns the SPIFFE URI. For a valid ID, Parse(id.String()) == id.
func (id ID) String() string {
	return scheme + id.TrustDomain + "/ns/" + id.Namespace + "/sa/" + id.ServiceAccount
}

// IsZero reports whether id is the zero ID.
func (id ID) IsZero() bool { return id == ID{} }

// URL returns the SPIFFE URI as a URL, as x509 templates and CSRs want it.
// Valid IDs contain no characters that need escaping, so
// URL().String() == String().
func (id ID) URL() *url.URL {
	return &url.URL{Scheme: "spiffe", Host: id.TrustDomain, Path: "/ns/" + id.Namespace + "/sa/" + id.ServiceAccount}
}

// Validate reports whether id's parts are a valid mesh identity, with the same
// rules and errors as Parse.
func (id ID) Validate() error {
	s := id.String()
	if err := checkTrustDomain(s, id.TrustDomain); err != nil {
		return err
	}
	if err := checkSegment(s, "namespace", id.Namespace); err != nil {
		return err
	}
	if err := checkSegment(s, "service account", id.ServiceAccount); err != nil {
		return err
	}
	if len(s) > MaxLen {
		return parseError(s, ErrTooLong, fmt.Sprintf("%d bytes, max %d", len(s), MaxLen))
	}
	return nil
}

// Parse parses spiffe://<td>/ns/<ns>/sa/<sa>. It is deliberately stricter
// than a URL parser: no percent-encoding, no upper-case scheme or trust
// domain, no empty, "." or ".." segments, no userinfo, port, query or
// fragment, and exactly four path segments. Anything it accepts prints back
// unchanged, so string comparison of IDs is identity comparison.
func Parse(s string) (ID, error) {
	if s == "" {
		return ID{}, parseError(s, ErrEmpty, "")
	}
	if len(s) > MaxLen {
		return ID{}, parseError(s, ErrTooLong, fmt.Sprintf("%d bytes, max %d", len(s), MaxLen))
	}
	if !strings.HasPrefix(s, scheme) {
		return ID{}, parseError(s, ErrScheme, "")
	}
	rest := s[len(scheme):]
	// Query and fragment are checked before splitting so that the error
	// names them rather than a bad segment.
	if strings.IndexByte(rest, '?') >= 0 {
		return ID{}, parseError(s, ErrQuery, "")
	}
	if strings.IndexByte(rest, '#') >= 0 {
		return ID{}, parseError(s, ErrFragment, "")
	}
	td, path, ok := strings.Cut(rest, "/")
	if strings.IndexByte(td, '@') >= 0 {
		return ID{}, parseError(s, ErrUserinfo, "")
	}
	if _, port, ok := strings.Cut(td, ":"); ok && port != "" && strings.Trim(port, "0123456789") == "" {
		return ID{}, parseError(s, ErrPort, "")
	}
	if err := checkTrustDomain(s, td); err != nil {
		return ID{}, err
	}
	if !ok {
		return ID{}, parseError(s, ErrPath, "no path")
	}
	parts := strings.Split(path, "/")
	if len(parts) != 4 || parts[0] != "ns" || parts[2] != "sa" {
		return ID{}, parseError(s, ErrPath, "")
	}
	id := ID{TrustDomain: td, Namespace: parts[1], ServiceAccount: parts[3]}
	if err := checkSegment(s, "namespace", id.Namespace); err != nil {
		return ID{}, err
	}
	if err := checkSegment(s, "service account", id.ServiceAccount); err != nil {
		return ID{}, err
	}
	return id, nil
}

// CheckTrustDomain reports whether td is a valid trust domain, with the
// same rules and errors as Parse.
func CheckTrustDomain(td string) error {
	return checkTrustDomain(scheme+td, td)
}

// checkTrustDomain applies SPIFFE ID spec §2.1: lower-case letters, digits,
// dots, dashes and underscores only.
func checkTrustDomain(s, td string) error {
	if td == "" {
		return parseError(s, ErrTrustDomain, "empty")
	}
	if len(td) > MaxTrustDomainLen {
		return parseError(s, ErrTrustDomain, fmt.Sprintf("%d bytes, max %d", len(td), MaxTrustDomainLen))
	}
	for i := 0; i < len(td); i++ {
		c := td[i]
		if !(c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '.' || c == '-' || c == '_') {
			return parseError(s, ErrTrustDomain, fmt.Sprintf("character %q at %d", c, i))
		}
	}
	return nil
}

// checkSegment applies SPIFFE ID spec §2.2: letters, digits, dots, dashes and
// underscores; no empty, "." or ".." segment.
func checkSegment(s, what, seg string) error {
	switch {
	case seg == "":
		return parseError(s, ErrSegment, what+" is empty")
	case seg == "." || seg == "..":
		return parseError(s, ErrSegment, what+" is a dot segment")
	case len(seg) > MaxSegmentLen:
		return parseError(s, ErrSegment, fmt.Sprintf("%s is %d bytes, max %d", what, len(seg), MaxSegmentLen))
	}
	for i := 0; i < len(seg); i++ {
		c := seg[i]
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '.' || c == '-' || c == '_') {
			return parseError(s, ErrSegment, fmt.Sprintf("%s has character %q", what, c))
		}
	}
	return nil
}
