package route

import (
	"strings"

	"github.com/amber-mesh/amber/waypoint/match"
)

// EscapedSlashes is the HCM's path_with_escaped_slashes_action.
type EscapedSlashes uint8

const (
	// KeepEscapedSlashes leaves %2F and %5C alone (Envoy's default, also
	// for IMPLEMENTATION_SPECIFIC_DEFAULT).
	KeepEscapedSlashes EscapedSlashes = iota
	// RejectEscapedSlashes answers 400 to a path holding one.
	RejectEscapedSlashes
	// UnescapeAndRedirect unescapes them and redirects the client to the
	// result (Envoy answers 307).
	UnescapeAndRedirect
	// UnescapeAndForward unescapes them and goes on.
	UnescapeAndForward
)

// PathOptions are the HCM's path settings. The zero value changes nothing.
type PathOptions struct {
	// Normalize is normalize_path: RFC 3986 normalisation as Envoy does
	// it (NormalizePath).
	Normalize bool
	// MergeSlashes is merge_slashes.
	MergeSlashes bool
	// EscapedSlashes is path_with_escaped_slashes_action.
	EscapedSlashes EscapedSlashes
}

// PathResult is what the HCM does with a request after normalisation.
type PathResult uint8

const (
	// PathContinue: go on with the normalised path.
	PathContinue PathResult = iota
	// PathRedirect: answer 307 with the normalised path as the location
	// (UnescapeAndRedirect found escaped slashes).
	PathRedirect
	// PathReject: answer 400.
	PathReject
)

// NormalizePath applies opts to a request's :path the way Envoy's HCM
// does before any filter or route sees it
// (source/common/http/conn_manager_utility.cc maybeNormalizePath), in
// this order: a fragment is refused; escaped slashes are handled; the
// path is normalised; slashes are merged. The query is never changed. A
// path that does not start with '/' is refused (origin-form only; the
// data path refuses absolute-form and '*' before).
//
// Two choices are stricter than Envoy: a '#' is refused even where an
// Envoy build would strip the fragment (runtime
// http_reject_path_with_fragment); and a path whose result would change
// if normalised again is refused. The canonicaliser decodes escapes in one
// pass, so "/public/%2%65%2%65/admin" becomes "/public/%2e%2e/admin": a
// path rule sees no "/admin" while an application that decodes and
// resolves dot segments serves /admin.
func NormalizePath(path string, opts PathOptions) (string, PathResult) {
	out, result := normalizeOnce(path, opts)
	if result == PathReject {
		return path, PathReject
	}
	if again, r := normalizeOnce(out, opts); r == PathReject || again != out {
		return path, PathReject
	}
	return out, result
}

func normalizeOnce(path string, opts PathOptions) (string, PathResult) {
	if !strings.HasPrefix(path, "/") || strings.IndexByte(path, '#') >= 0 {
		return path, PathReject
	}
	result := PathContinue
	if opts.EscapedSlashes != KeepEscapedSlashes {
		p, q := splitQuery(path)
		if u := unescapeSlashes(p); u != p {
			switch opts.EscapedSlashes {
			case RejectEscapedSlashes:
				return path, PathReject
			case UnescapeAndRedirect:
				result = PathRedirect
			}
			path = u + q
		}
	}
	if opts.Normalize {
		p, q := splitQuery(path)
		c, ok := CanonicalPath(p)
		if !ok {
			return path, PathReject
		}
		path = c + q
	}
	if opts.MergeSlashes {
		path = MergeSlashes(path)
	}
	return path, result
}

func splitQuery(path string) (p, q string) {
	if i := strings.IndexByte(path, '?'); i >= 0 {
		return path[:i], path[i:]
	}
	return path, ""
}

// unescapeSlashes replaces %2F/%2f with '/' and %5C/%5c with '\' (Envoy
// PathUtil::unescapeSlashes).
func unescapeSlashes(p string) string {
	if !strings.Contains(p, "%") {
		return p
	}
	r := strings.NewReplacer("%2F", "/", "%2f", "/", "%5C", `\`, "%5c", `\`)
	return r.Replace(p)
}

// MergeSlashes collapses runs of '/' in the path part, keeping a leading
// and a trailing one (Envoy PathTransformer::mergeSlashes).
func MergeSlashes(path string) string {
	p, q := splitQuery(path)
	if !strings.Contains(p, "//") {
		return path
	}
	var b strings.Builder
	if strings.HasPrefix(p, "/") {
		b.WriteByte('/')
	}
	first := true
	for _, seg := range strings.Split(p, "/") {
		if seg == "" {
			continue
		}
		if !first {
			b.WriteByte('/')
		}
		b.WriteString(seg)
		first = false
	}
	// As Envoy: an all-slash path keeps both its leading and its trailing
	// slash ("///" becomes "//").
	if strings.HasSuffix(p, "/") {
		b.WriteByte('/')
	}
	return b.String() + q
}

// Character classes of Chromium's path canonicaliser (url_canon_path.cc
// kPathCharLookup, the table Envoy's canonicalPath used until googleurl
// followed the URL Standard): pass unchanged, escape as %XX, unescape
// when found escaped (RFC 3986 unreserved: ALPHA DIGIT - _ ~), or refuse.
const (
	pathPass uint8 = iota
	pathEscape
	pathUnescape
	pathInvalid
)

func pathClass(c byte) uint8 {
	switch {
	case c == 0:
		return pathInvalid
	case c < 0x20 || c >= 0x7f:
		return pathEscape
	case 'A' <= c && c <= 'Z', 'a' <= c && c <= 'z', '0' <= c && c <= '9', c == '-', c == '_', c == '~':
		return pathUnescape
	}
	switch c {
	case ' ', '"', '#', '<', '>', '?', '\\', '^', '`', '{', '|', '}', '%':
		return pathEscape
	}
	return pathPass
}

// CanonicalPath normalises a path (no query) as Envoy's normalize_path
// does with Chromium's canonicaliser: '\' becomes '/'; "." and ".."
// segments, also written %2e, are resolved and never climb above the root;
// escaped unreserved characters are unescaped (RFC 3986 §6.2.2.2), other
// valid escapes are kept as they are, '%' not followed by two hex digits
// is kept; characters that may not appear in a path are escaped. A NUL,
// raw or escaped, makes it fail (Envoy answers 400). Runs of '/' are kept.
func CanonicalPath(p string) (string, bool) {
	out := make([]byte, 0, len(p)+1)
	if p == "" || !isSlash(p[0]) {
		out = append(out, '/')
	}
	ok := true
	for i := 0; i < len(p); i++ {
		c := p[i]
		if n := dotLen(p, i); n > 0 {
			if len(out) > 0 && out[len(out)-1] == '/' {
				consumed, kind := afterDot(p, i+n)
				switch kind {
				case dotNotDirectory:
					out = append(out, '.')
					i += n - 1
				case dotCurrent:
					i += n + consumed - 1
				case dotUp:
					out = backUpToPreviousSlash(out)
					i += n + consumed - 1
				}
			} else {
				out = append(out, '.')
				i += n - 1
			}
			continue
		}
		switch {
		case c == '\\':
			out = append(out, '/')
		case c == '%':
			if i+2 < len(p) && match.IsHex(p[i+1]) && match.IsHex(p[i+2]) {
				v := match.Unhex(p[i+1])<<4 | match.Unhex(p[i+2])
				switch pathClass(v) {
				case pathUnescape:
					out = append(out, v)
				case pathInvalid:
					out = append(out, '%', p[i+1], p[i+2])
					ok = false
				default:
					out = append(out, '%', p[i+1], p[i+2])
				}
				i += 2
			} else {
				out = append(out, '%')
			}
		default:
			switch pathClass(c) {
			case pathInvalid:
				out = appendEscaped(out, c)
				ok = false
			case pathEscape:
				out = appendEscaped(out, c)
			default:
				out = append(out, c)
			}
		}
	}
	return string(out), ok
}

const (
	dotNotDirectory = iota
	dotCurrent
	dotUp
)

func isSlash(c byte) bool { return c == '/' || c == '\\' }

// dotLen is 1 for '.', 3 for "%2e"/"%2E" at p[i], else 0.
func dotLen(p string, i int) int {
	if p[i] == '.' {
		return 1
	}
	if p[i] == '%' && i+2 < len(p) && p[i+1] == '2' && (p[i+2] == 'e' || p[i+2] == 'E') {
		return 3
	}
	return 0
}

// afterDot classifies what follows a dot that follows a slash, and how
// many input bytes after the dot belong to it.
func afterDot(p string, j int) (consumed, kind int) {
	if j == len(p) {
		return 0, dotCurrent
	}
	if isSlash(p[j]) {
		return 1, dotCurrent
	}
	if n := dotLen(p, j); n > 0 {
		k := j + n
		if k == len(p) {
			return n, dotUp
		}
		if isSlash(p[k]) {
			return n + 1, dotUp
		}
	}
	return 0, dotNotDirectory
}

// backUpToPreviousSlash drops the last segment of out, which ends with
// '/', never going above the first slash.
func backUpToPreviousSlash(out []byte) []byte {
	i := len(out) - 1
	if i == 0 {
		return out
	}
	i--
	for i > 0 && out[i] != '/' {
		i--
	}
	return out[:i+1]
}

func appendEscaped(out []byte, c byte) []byte {
	const hex = "0123456789ABCDEF"
	return append(out, '%', hex[c>>4], hex[c&0xf])
}
