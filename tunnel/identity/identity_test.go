package identity

import (
	"errors"
	"strings"
	"testing"
)

func TestParseValid(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want ID
	}{
		{"spiffe://cluster.local/ns/default/sa/sleep", ID{"cluster.local", "default", "sleep"}},
		{"spiffe://td/ns/istio-system/sa/ztunnel", ID{"td", "istio-system", "ztunnel"}},
		{"spiffe://a_b-c.d/ns/N.s_1/sa/Sa-2.x", ID{"a_b-c.d", "N.s_1", "Sa-2.x"}},
		{"spiffe://td/ns/.../sa/..a", ID{"td", "...", "..a"}},
		{"spiffe://td/ns/" + strings.Repeat("n", MaxSegmentLen) + "/sa/s", ID{"td", strings.Repeat("n", MaxSegmentLen), "s"}},
	} {
		got, err := Parse(tc.in)
		if err != nil {
			t.Errorf("Parse(%q): %v", tc.in, err)
			continue
		}
		if got != tc.want {
			t.Errorf("Parse(%q) = %+v, want %+v", tc.in, got, tc.want)
		}
		if got.String() != tc.in {
			t.Errorf("Parse(%q).String() = %q", tc.in, got.String())
		}
		if got.URL().String() != tc.in {
			t.Errorf("Parse(%q).URL() = %q", tc.in, got.URL())
		}
		if err := got.Validate(); err != nil {
			t.Errorf("Validate(%q): %v", tc.in, err)
		}
	}
}

func TestParseInvalid(t *testing.T) {
	long := strings.Repeat("a", MaxSegmentLen+1)
	for _, tc := range []struct {
		in   string
		want error
	}{
		{"", ErrEmpty},
		{"spiffe://td/ns/a/sa/" + strings.Repeat("b", MaxLen), ErrTooLong},
		{"SPIFFE://td/ns/a/sa/b", ErrScheme},
		{"spiffe:/td/ns/a/sa/b", ErrScheme},
		{"https://td/ns/a/sa/b", ErrScheme},
		{" spiffe://td/ns/a/sa/b", ErrScheme},
		{"spiffe://user@td/ns/a/sa/b", ErrUserinfo},
		{"spiffe://td:443/ns/a/sa/b", ErrPort},
		{"spiffe://td/ns/a/sa/b?x=1", ErrQuery},
		{"spiffe://td/ns/a/sa/b#frag", ErrFragment},
		{"spiffe:///ns/a/sa/b", ErrTrustDomain},
		{"spiffe://TD/ns/a/sa/b", ErrTrustDomain},
		{"spiffe://t%64/ns/a/sa/b", ErrTrustDomain},
		{"spiffe://[::1]/ns/a/sa/b", ErrTrustDomain},
		{"spiffe://" + strings.Repeat("t", MaxTrustDomainLen+1) + "/ns/a/sa/b", ErrTrustDomain},
		{"spiffe://td", ErrPath},
		{"spiffe://td/", ErrPath},
		{"spiffe://td/ns/a", ErrPath},
		{"spiffe://td/ns/a/sa", ErrPath},
		{"spiffe://td/ns/a/sa/b/", ErrPath},
		{"spiffe://td/ns/a/sa/b/c", ErrPath},
		{"spiffe://td//ns/a/sa/b", ErrPath},
		{"spiffe://td/sa/b/ns/a", ErrPath},
		{"spiffe://td/NS/a/sa/b", ErrPath},
		{"spiffe://td/ns/a/serviceaccount/b", ErrPath},
		{"spiffe://td/ns//sa/b", ErrSegment},
		{"spiffe://td/ns/a/sa/", ErrSegment},
		{"spiffe://td/ns/./sa/b", ErrSegment},
		{"spiffe://td/ns/a/sa/..", ErrSegment},
		{"spiffe://td/ns/a%2Fb/sa/c", ErrSegment},
		{"spiffe://td/ns/a b/sa/c", ErrSegment},
		{"spiffe://td/ns/a/sa/b*", ErrSegment},
		{"spiffe://td/ns/a/sa/b\x00", ErrSegment},
		{"spiffe://td/ns/ä/sa/b", ErrSegment},
		{"spiffe://td/ns/" + long + "/sa/b", ErrSegment},
	} {
		id, err := Parse(tc.in)
		if err == nil {
			t.Errorf("Parse(%q) = %+v, want error %v", tc.in, id, tc.want)
			continue
		}
		if !errors.Is(err, tc.want) {
			t.Errorf("Parse(%q) error %v, want %v", tc.in, err, tc.want)
		}
		var pe *ParseError
		if !errors.As(err, &pe) {
			t.Errorf("Parse(%q) error %T is not a *ParseError", tc.in, err)
		} else if len(pe.Input) > 200 {
			t.Errorf("Parse(%q): ParseError.Input not truncated (%d bytes)", tc.in[:20], len(pe.Input))
		}
		if id != (ID{}) {
			t.Errorf("Parse(%q) returned non-zero ID %+v with error", tc.in, id)
		}
	}
}

func TestValidate(t *testing.T) {
	for _, tc := range []struct {
		id   ID
		want error
	}{
		{ID{}, ErrTrustDomain},
		{ID{"td", "", "sa"}, ErrSegment},
		{ID{"td", "ns", ""}, ErrSegment},
		{ID{"td", "a/sa/b", "c"}, ErrSegment},
		{ID{"Td", "ns", "sa"}, ErrTrustDomain},
		{ID{"td", "ns", "sa?x"}, ErrSegment},
	} {
		if err := tc.id.Validate(); !errors.Is(err, tc.want) {
			t.Errorf("%+v.Validate() = %v, want %v", tc.id, err, tc.want)
		}
	}
}

func TestExactMatch(t *testing.T) {
	// A dot is never a wildcard and case is significant in the path.
	a, _ := Parse("spiffe://td/ns/a.b/sa/x")
	for _, s := range []string{"spiffe://td/ns/aab/sa/x", "spiffe://td/ns/a.B/sa/x", "spiffe://td/ns/a.b/sa/X"} {
		b, err := Parse(s)
		if err != nil {
			t.Fatal(err)
		}
		if a == b {
			t.Errorf("%s == %s", a, b)
		}
	}
}

func FuzzParse(f *testing.F) {
	for _, s := range []string{
		"spiffe://cluster.local/ns/default/sa/sleep",
		"spiffe://td/ns/a/sa/b?x",
		"spiffe://td:1/ns/a/sa/b",
		"spiffe://u@td/ns/a/sa/b",
		"spiffe://td/ns/./sa/..",
		"spiffe://td/ns/a%2f/sa/b",
		"spiffe://td//ns/a/sa/b",
		"",
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		id, err := Parse(s)
		if err != nil {
			var pe *ParseError
			if !errors.As(err, &pe) {
				t.Fatalf("Parse(%q): error %T is not a *ParseError", s, err)
			}
			return
		}
		if got := id.String(); got != s {
			t.Fatalf("Parse(%q).String() = %q", s, got)
		}
		if got := id.URL().String(); got != s {
			t.Fatalf("Parse(%q).URL().String() = %q", s, got)
		}
		if err := id.Validate(); err != nil {
			t.Fatalf("Parse(%q) accepted but Validate: %v", s, err)
		}
		again, err := Parse(id.String())
		if err != nil || again != id {
			t.Fatalf("round trip %q: %+v, %v", s, again, err)
		}
	})
}
