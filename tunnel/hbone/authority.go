package hbone

import (
	"fmt"
	"net/netip"
	"strings"
)

// maxAuthorityLen is longer than any IP:port ("[" + 45-byte IPv6 + "]:65535").
const maxAuthorityLen = 64

// ParseAuthority parses a CONNECT :authority naming an IP address and port:
// "10.0.0.1:8080" or "[fd00::1]:8080" (RFC 9113 §8.5; IPv6 in brackets as
// RFC 3986 §3.2.2 requires). Host names, zones, port 0 and anything with
// extra characters are refused. An IPv4-mapped IPv6 address is returned as
// plain IPv4, the form sockets report for the original destination.
func ParseAuthority(s string) (netip.AddrPort, error) {
	if len(s) == 0 || len(s) > maxAuthorityLen {
		return netip.AddrPort{}, fmt.Errorf("%w: length %d", ErrBadAuthority, len(s))
	}
	i := strings.LastIndexByte(s, ':')
	if i < 0 {
		return netip.AddrPort{}, fmt.Errorf("%w: %q has no port", ErrBadAuthority, s)
	}
	host, port := s[:i], s[i+1:]
	if strings.HasPrefix(host, "[") != strings.HasSuffix(host, "]") {
		return netip.AddrPort{}, fmt.Errorf("%w: %q has unbalanced brackets", ErrBadAuthority, s)
	}
	bracketed := strings.HasPrefix(host, "[")
	if bracketed {
		host = host[1 : len(host)-1]
	}
	addr, err := netip.ParseAddr(host)
	if err != nil {
		return netip.AddrPort{}, fmt.Errorf("%w: %q: %v", ErrBadAuthority, s, err)
	}
	if addr.Zone() != "" {
		return netip.AddrPort{}, fmt.Errorf("%w: %q has a zone", ErrBadAuthority, s)
	}
	if addr.Is6() != bracketed {
		return netip.AddrPort{}, fmt.Errorf("%w: %q: IPv6 needs brackets, IPv4 must not have them", ErrBadAuthority, s)
	}
	if len(port) == 0 || len(port) > 5 {
		return netip.AddrPort{}, fmt.Errorf("%w: %q: bad port", ErrBadAuthority, s)
	}
	p := 0
	for _, c := range []byte(port) {
		if c < '0' || c > '9' {
			return netip.AddrPort{}, fmt.Errorf("%w: %q: bad port", ErrBadAuthority, s)
		}
		p = p*10 + int(c-'0')
	}
	if p == 0 || p > 65535 {
		return netip.AddrPort{}, fmt.Errorf("%w: %q: port out of range", ErrBadAuthority, s)
	}
	return netip.AddrPortFrom(addr.Unmap(), uint16(p)), nil
}

// FormatAuthority is the :authority for a CONNECT to ap: "ip:port", or
// "[ip]:port" for IPv6. It is what ParseAuthority accepts.
func FormatAuthority(ap netip.AddrPort) string {
	return netip.AddrPortFrom(ap.Addr().Unmap().WithZone(""), ap.Port()).String()
}

// ForwardedFor returns the address of the first element's for= of an RFC
// 7239 Forwarded header, as a ztunnel sends it on a CONNECT to name the
// client: for="ip:port", for="[v6]:port", or a bare IP (port 0). An
// IPv4-mapped IPv6 address is returned as plain IPv4. An obfuscated or
// unparsable for= gives false.
func ForwardedFor(h string) (netip.AddrPort, bool) {
	first, _, _ := strings.Cut(h, ",")
	for _, pair := range strings.Split(first, ";") {
		k, v, ok := strings.Cut(strings.TrimSpace(pair), "=")
		if !ok || !strings.EqualFold(k, "for") {
			continue
		}
		v = strings.Trim(v, `"`)
		if ap, err := netip.ParseAddrPort(v); err == nil {
			return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port()), true
		}
		if a, err := netip.ParseAddr(strings.Trim(v, "[]")); err == nil {
			return netip.AddrPortFrom(a.Unmap(), 0), true
		}
		return netip.AddrPort{}, false
	}
	return netip.AddrPort{}, false
}
