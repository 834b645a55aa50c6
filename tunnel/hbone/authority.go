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
