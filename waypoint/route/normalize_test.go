package route

import (
	"strings"
	"testing"
)

var allOn = PathOptions{Normalize: true, MergeSlashes: true, EscapedSlashes: UnescapeAndRedirect}

func TestNormalizePath(t *testing.T) {
	normalize := PathOptions{Normalize: true}
	cases := []struct {
		name string
		in   string
		opts PathOptions
		want string
		res  PathResult
	}{
		{"nothing asked", "/a/../b", PathOptions{}, "/a/../b", PathContinue},
		{"dot dot", "/productpage/../admin", normalize, "/admin", PathContinue},
		{"escaped dot dot", "/productpage/%2e%2e/admin", normalize, "/admin", PathContinue},
		{"escaped dot dot mixed case", "/productpage/%2E%2e/admin", normalize, "/admin", PathContinue},
		{"half escaped", "/productpage/.%2e/admin", normalize, "/admin", PathContinue},
		{"dot", "/a/./b", normalize, "/a/b", PathContinue},
		{"never above the root", "/../../etc/passwd", normalize, "/etc/passwd", PathContinue},
		{"trailing dot dot", "/a/b/..", normalize, "/a/", PathContinue},
		{"trailing dot", "/a/.", normalize, "/a/", PathContinue},
		{"root dot dot", "/..", normalize, "/", PathContinue},
		{"escaped root dot", "/%2e", normalize, "/", PathContinue},
		{"dot prefix is a name", "/a/.b/..b/b.", normalize, "/a/.b/..b/b.", PathContinue},
		{"backslash is a slash", `/a\..\admin`, normalize, "/admin", PathContinue},
		{"unreserved escapes decoded", "/%61dmin/%7Euser/%5F", normalize, "/admin/~user/_", PathContinue},
		{"reserved escapes kept", "/a%3Bb%3f", normalize, "/a%3Bb%3f", PathContinue},
		{"invalid escape kept", "/a%zz", normalize, "/a%zz", PathContinue},
		{"space escaped", "/a b", normalize, "/a%20b", PathContinue},
		{"non-ASCII escaped", "/\xc3\xa9", normalize, "/%C3%A9", PathContinue},
		{"query untouched", "/a/../b?x=/../y&z=%2e", normalize, "/b?x=/../y&z=%2e", PathContinue},
		{"slashes kept without merge", "//admin", normalize, "//admin", PathContinue},
		{"slashes merged", "//admin//x/", PathOptions{Normalize: true, MergeSlashes: true}, "/admin/x/", PathContinue},
		{"merge keeps query", "/a//b?c//d", PathOptions{MergeSlashes: true}, "/a/b?c//d", PathContinue},
		{"all slashes", "///", PathOptions{MergeSlashes: true}, "//", PathContinue},
		{"escaped slash kept", "/a%2Fb", normalize, "/a%2Fb", PathContinue},
		{"escaped slash hides dot dot when kept", "/a%2F..%2Fadmin", normalize, "/a%2F..%2Fadmin", PathContinue},
		{"escaped slash forwarded", "/a%2F..%2Fadmin", PathOptions{Normalize: true, EscapedSlashes: UnescapeAndForward}, "/admin", PathContinue},
		{"escaped slash redirected", "/a%2fb%5Cc", PathOptions{Normalize: true, EscapedSlashes: UnescapeAndRedirect}, "/a/b/c", PathRedirect},
		{"escaped slash rejected", "/a%2Fb", PathOptions{EscapedSlashes: RejectEscapedSlashes}, "/a%2Fb", PathReject},
		{"escaped slash in query is not a slash", "/a?b=%2F", PathOptions{EscapedSlashes: RejectEscapedSlashes}, "/a?b=%2F", PathContinue},
		{"fragment refused", "/a#b", normalize, "/a#b", PathReject},
		{"not origin form", "a/b", normalize, "a/b", PathReject},
		{"asterisk form", "*", normalize, "*", PathReject},
		{"NUL refused", "/a\x00b", normalize, "/a\x00b", PathReject},
		{"escaped NUL refused", "/a%00b", normalize, "/a%00b", PathReject},
		// Decoding in one pass can form a new escape: refused, see NormalizePath.
		{"escape formed by decoding", "/public/%2%65%2%65/admin", normalize, "/public/%2%65%2%65/admin", PathReject},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			got, res := NormalizePath(c.in, c.opts)
			if got != c.want || res != c.res {
				t.Errorf("NormalizePath(%q) = %q, %v; want %q, %v", c.in, got, res, c.want, c.res)
			}
		})
	}
}

// FuzzNormalizePath checks the properties path rules rely on: a path that
// passes is stable (normalising it again changes nothing), starts with
// '/', holds no dot segment in any spelling, no escaped slash when
// escaped slashes are handled, and keeps its query.
func FuzzNormalizePath(f *testing.F) {
	for _, s := range []string{
		"/productpage/../admin", "/a/%2e%2E/b", "//a//b", `/a\..\b`, "/a%2F..%2Fb", "/%2%65%2%65/x",
		"/a?x=/../y", "/%61/%25/%", "/.%2e./", "/\xff", "/a/./../b/.", "/%2e%2e%2fadmin",
	} {
		f.Add(s, uint8(3))
	}
	f.Fuzz(func(t *testing.T, in string, mode uint8) {
		opts := PathOptions{Normalize: true, MergeSlashes: mode&1 != 0, EscapedSlashes: EscapedSlashes(mode>>1) % 4}
		out, res := NormalizePath(in, opts)
		if res == PathReject {
			if out != in {
				t.Fatalf("rejected %q but returned %q", in, out)
			}
			return
		}
		if again, r := NormalizePath(out, opts); again != out || r == PathReject {
			t.Fatalf("not stable: %q -> %q -> %q (%v)", in, out, again, r)
		}
		if !strings.HasPrefix(out, "/") {
			t.Fatalf("%q -> %q: no leading slash", in, out)
		}
		p, q := splitQuery(out)
		_, wantQ := splitQuery(in)
		if q != wantQ {
			t.Fatalf("%q -> %q: query changed", in, out)
		}
		for _, seg := range strings.Split(p, "/") {
			s := strings.ToLower(seg)
			s = strings.ReplaceAll(s, "%2e", ".")
			if s == "." || s == ".." {
				t.Fatalf("%q -> %q: dot segment %q left", in, out, seg)
			}
		}
		if strings.Contains(p, `\`) {
			t.Fatalf("%q -> %q: backslash left", in, out)
		}
		if opts.EscapedSlashes != KeepEscapedSlashes {
			l := strings.ToLower(p)
			if strings.Contains(l, "%2f") || strings.Contains(l, "%5c") {
				t.Fatalf("%q -> %q: escaped slash left", in, out)
			}
		}
	})
}
