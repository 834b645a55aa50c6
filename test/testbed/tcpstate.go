package testbed

import (
	"encoding/binary"
	"fmt"
	"net/netip"
	"os"
	"strings"
)

// TCP states as /proc/net/tcp shows them (include/net/tcp_states.h).
const (
	TCPEstablished = "01"
	TCPTimeWait    = "06"
)

// TCPState returns the state of the TCP socket whose local end is local and
// remote end remote, in the calling thread's network namespace (call it
// from Node.Do or Pod.Do), or "" when there is none. Time-wait and request
// sockets count. An IPv4 connection of a dual-stack (AF_INET6) socket is
// found under its IPv4-mapped addresses.
func TCPState(local, remote netip.AddrPort) (string, error) {
	want := []struct{ file, local, remote string }{
		{"tcp6", procAddr(netip.AddrPortFrom(netip.AddrFrom16(local.Addr().As16()), local.Port())),
			procAddr(netip.AddrPortFrom(netip.AddrFrom16(remote.Addr().As16()), remote.Port()))},
	}
	if local.Addr().Unmap().Is4() {
		want = append(want, struct{ file, local, remote string }{"tcp",
			procAddr(netip.AddrPortFrom(local.Addr().Unmap(), local.Port())),
			procAddr(netip.AddrPortFrom(remote.Addr().Unmap(), remote.Port()))})
	}
	for _, w := range want {
		raw, err := os.ReadFile("/proc/thread-self/net/" + w.file)
		if err != nil {
			return "", err
		}
		for _, line := range strings.Split(string(raw), "\n")[1:] {
			f := strings.Fields(line)
			if len(f) > 3 && f[1] == w.local && f[2] == w.remote {
				return f[3], nil
			}
		}
	}
	return "", nil
}

// procAddr formats ap as /proc/net/tcp{,6} do: each 32-bit word of the
// address in host byte order, in hex, then ":" and the port in hex.
func procAddr(ap netip.AddrPort) string {
	var b strings.Builder
	a := ap.Addr().AsSlice()
	for i := 0; i < len(a); i += 4 {
		fmt.Fprintf(&b, "%08X", binary.NativeEndian.Uint32(a[i:i+4]))
	}
	fmt.Fprintf(&b, ":%04X", ap.Port())
	return b.String()
}
