package hbone_test

import (
	"errors"
	"net/netip"
	"testing"

	"github.com/amber-mesh/amber/tunnel/hbone"
)

func TestParseAuthority(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want string // "" means an error
	}{
		{"10.0.0.1:8080", "10.0.0.1:8080"},
		{"[fd00::1]:15008", "[fd00::1]:15008"},
		{"[::ffff:10.0.0.1]:80", "10.0.0.1:80"}, // IPv4-mapped: as sockets report it
		{"1.2.3.4:65535", "1.2.3.4:65535"},
		{"1.2.3.4:080", "1.2.3.4:80"},
		{"", ""},
		{"10.0.0.1", ""},
		{"10.0.0.1:", ""},
		{"10.0.0.1:0", ""},
		{"10.0.0.1:65536", ""},
		{"10.0.0.1:-1", ""},
		{"10.0.0.1:+80", ""},
		{"10.0.0.1:8080 ", ""},
		{" 10.0.0.1:8080", ""},
		{"010.0.0.1:80", ""}, // octal-looking IPv4 is ambiguous
		{"fd00::1:80", ""},   // IPv6 without brackets
		{"[fd00::1]", ""},
		{"[10.0.0.1]:80", ""},
		{"[fe80::1%eth0]:80", ""},
		{"[fd00::1:80", ""},
		{"fd00::1]:80", ""},
		{"example.com:80", ""},
		{"localhost:80", ""},
		{"user@10.0.0.1:80", ""},
		{"10.0.0.1:80/path", ""},
		{"[" + "1111:2222:3333:4444:5555:6666:7777:8888" + "]:123456", ""},
	} {
		got, err := hbone.ParseAuthority(tc.in)
		if tc.want == "" {
			if err == nil {
				t.Errorf("ParseAuthority(%q) = %v, want error", tc.in, got)
			} else if !errors.Is(err, hbone.ErrBadAuthority) {
				t.Errorf("ParseAuthority(%q) error %v is not ErrBadAuthority", tc.in, err)
			}
			continue
		}
		if err != nil || got.String() != tc.want {
			t.Errorf("ParseAuthority(%q) = %v, %v; want %s", tc.in, got, err, tc.want)
		}
	}
}

func TestFormatAuthority(t *testing.T) {
	for in, want := range map[string]string{
		"10.0.0.1:8080":         "10.0.0.1:8080",
		"[fd00::1]:15008":       "[fd00::1]:15008",
		"[::ffff:10.0.0.1]:80":  "10.0.0.1:80",
		"[fe80::1%eth0]:80":     "[fe80::1]:80",
		"[2001:db8:0:0::1]:443": "[2001:db8::1]:443",
	} {
		if got := hbone.FormatAuthority(netip.MustParseAddrPort(in)); got != want {
			t.Errorf("FormatAuthority(%s) = %q, want %q", in, got, want)
		}
	}
}

// FuzzParseAuthority checks that whatever a peer sends, ParseAuthority
// either refuses it or returns an address that FormatAuthority writes back
// in a form that parses to the same address.
func FuzzParseAuthority(f *testing.F) {
	for _, s := range []string{"10.0.0.1:8080", "[fd00::1]:15008", "[::ffff:1.2.3.4]:1", "a:1", "[:]:0", "1.2.3.4:99999"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		ap, err := hbone.ParseAuthority(s)
		if err != nil {
			if !errors.Is(err, hbone.ErrBadAuthority) {
				t.Fatalf("error %v is not ErrBadAuthority", err)
			}
			return
		}
		if !ap.IsValid() || ap.Port() == 0 || ap.Addr().Zone() != "" || ap.Addr().Is4In6() {
			t.Fatalf("ParseAuthority(%q) = %v: not a canonical destination", s, ap)
		}
		back, err := hbone.ParseAuthority(hbone.FormatAuthority(ap))
		if err != nil || back != ap {
			t.Fatalf("round trip of %q: %v, %v", s, back, err)
		}
	})
}

func TestForwardedFor(t *testing.T) {
	for in, want := range map[string]string{
		`for="10.0.0.1:4711"`:            "10.0.0.1:4711",
		`for="[2001:db8::1]:4711"`:       "[2001:db8::1]:4711",
		`For=10.0.0.1`:                   "10.0.0.1:0",
		`proto=https;for="10.0.0.1:1"`:   "10.0.0.1:1",
		`for="10.0.0.1:1", for=10.0.0.2`: "10.0.0.1:1",
		`for=_hidden`:                    "",
		``:                               "",
	} {
		ap, ok := hbone.ForwardedFor(in)
		if got := ap.String(); (ok && got != want) || (!ok && want != "") {
			t.Errorf("ForwardedFor(%q) = %s, %v; want %q", in, got, ok, want)
		}
	}
}
