package bpf

import (
	"encoding/binary"
	"net/netip"
)

// pkt describes a crafted frame for prog.Run tables.
type pkt struct {
	src, dst   netip.Addr
	proto      uint8 // 6 TCP, 17 UDP, 1 ICMP, 58 ICMPv6
	sport      uint16
	dport      uint16
	syn, ack   bool
	fragOff    uint16 // IPv4 fragment offset (8-byte units); IPv6: adds a fragment header
	moreFrags  bool
	ipv4Opts   int   // extra 32-bit words of IPv4 options
	v6Ext      []int // IPv6 extension header types to chain before L4
	truncate   int   // bytes cut from the end
	badVersion bool
	arp        bool
}

const (
	protoICMP   = 1
	protoTCP    = 6
	protoUDP    = 17
	protoICMPv6 = 58
)

func (p pkt) bytes() []byte {
	eth := make([]byte, 14)
	copy(eth[0:6], []byte{2, 0, 0, 0, 0, 1})
	copy(eth[6:12], []byte{2, 0, 0, 0, 0, 2})
	if p.arp {
		binary.BigEndian.PutUint16(eth[12:], 0x0806)
		return append(eth, make([]byte, 28)...)
	}
	l4 := p.l4()
	var out []byte
	if p.src.Is4() {
		binary.BigEndian.PutUint16(eth[12:], 0x0800)
		ihl := 5 + p.ipv4Opts
		ip := make([]byte, ihl*4)
		ip[0] = 4<<4 | byte(ihl)
		if p.badVersion {
			ip[0] = 7<<4 | byte(ihl)
		}
		binary.BigEndian.PutUint16(ip[2:], uint16(len(ip)+len(l4)))
		frag := p.fragOff & 0x1fff
		if p.moreFrags {
			frag |= 0x2000
		}
		if frag == 0 {
			frag = 0x4000 // DF
		}
		binary.BigEndian.PutUint16(ip[6:], frag)
		ip[8] = 64
		ip[9] = p.proto
		for i := 20; i < len(ip); i++ {
			ip[i] = 1 // NOP options
		}
		s, d := p.src.As4(), p.dst.As4()
		copy(ip[12:], s[:])
		copy(ip[16:], d[:])
		out = append(append(eth, ip...), l4...)
	} else {
		binary.BigEndian.PutUint16(eth[12:], 0x86dd)
		ip := make([]byte, 40)
		ip[0] = 6 << 4
		if p.badVersion {
			ip[0] = 7 << 4
		}
		var ext []byte
		exts := p.v6Ext
		if p.fragOff != 0 || p.moreFrags {
			exts = append(exts, 44)
		}
		next := p.proto
		// Build the chain back to front so each header names the next.
		for i := len(exts) - 1; i >= 0; i-- {
			h := make([]byte, 8)
			h[0] = next
			if exts[i] == 44 {
				off := p.fragOff << 3
				if p.moreFrags {
					off |= 1
				}
				binary.BigEndian.PutUint16(h[2:], off)
			}
			ext = append(h, ext...)
			next = uint8(exts[i])
		}
		ip[6] = next
		ip[7] = 64
		binary.BigEndian.PutUint16(ip[4:], uint16(len(ext)+len(l4)))
		s, d := p.src.As16(), p.dst.As16()
		copy(ip[8:], s[:])
		copy(ip[24:], d[:])
		out = append(append(append(eth, ip...), ext...), l4...)
	}
	setChecksums(out)
	if p.truncate > 0 {
		out = out[:len(out)-p.truncate]
	}
	// prog.Run needs at least an Ethernet header and pads nothing.
	return out
}

func (p pkt) l4() []byte {
	switch p.proto {
	case protoTCP:
		h := make([]byte, 20)
		binary.BigEndian.PutUint16(h[0:], p.sport)
		binary.BigEndian.PutUint16(h[2:], p.dport)
		h[12] = 5 << 4
		if p.syn {
			h[13] |= 0x02
		}
		if p.ack {
			h[13] |= 0x10
		}
		binary.BigEndian.PutUint16(h[14:], 65535)
		return h
	case protoUDP:
		h := make([]byte, 8)
		binary.BigEndian.PutUint16(h[0:], p.sport)
		binary.BigEndian.PutUint16(h[2:], p.dport)
		binary.BigEndian.PutUint16(h[4:], 8)
		return h
	default: // ICMP / ICMPv6 echo or neighbour solicitation shape
		return make([]byte, 8)
	}
}

// ipv4 and TCP header offsets of a frame built by bytes, or -1 for a frame
// that is not unfragmented TCP without IPv6 extension headers.
func tcpOffsets(frame []byte) (l3, l4 int) {
	const eth = 14
	switch binary.BigEndian.Uint16(frame[12:]) {
	case 0x0800:
		ihl := int(frame[eth]&0x0f) * 4
		if frame[eth+9] != protoTCP || binary.BigEndian.Uint16(frame[eth+6:])&0x3fff != 0 {
			return eth, -1
		}
		return eth, eth + ihl
	case 0x86dd:
		if frame[eth+6] != protoTCP {
			return eth, -1
		}
		return eth, eth + 40
	}
	return -1, -1
}

// sum16 is the ones' complement sum of b (RFC 1071), not yet inverted.
func sum16(sum uint32, b []byte) uint32 {
	for i := 0; i+1 < len(b); i += 2 {
		sum += uint32(binary.BigEndian.Uint16(b[i:]))
	}
	if len(b)%2 == 1 {
		sum += uint32(b[len(b)-1]) << 8
	}
	return sum
}

func fold(sum uint32) uint16 {
	for sum > 0xffff {
		sum = sum>>16 + sum&0xffff
	}
	return uint16(sum)
}

// tcpSum is the ones' complement sum of a TCP segment and its
// pseudo-header (RFC 9293 §3.1, RFC 8200 §8.1).
func tcpSum(frame []byte, l3, l4 int) uint16 {
	seg := frame[l4:]
	var sum uint32
	if binary.BigEndian.Uint16(frame[12:]) == 0x0800 {
		sum = sum16(sum, frame[l3+12:l3+20])
	} else {
		sum = sum16(sum, frame[l3+8:l3+40])
	}
	sum += protoTCP + uint32(len(seg))
	return fold(sum16(sum, seg))
}

// setChecksums fills in the IPv4 header and TCP checksums of a frame.
func setChecksums(frame []byte) {
	l3, l4 := tcpOffsets(frame)
	if l3 < 0 {
		return
	}
	if binary.BigEndian.Uint16(frame[12:]) == 0x0800 {
		ihl := int(frame[l3]&0x0f) * 4
		frame[l3+10], frame[l3+11] = 0, 0
		binary.BigEndian.PutUint16(frame[l3+10:], ^fold(sum16(0, frame[l3:l3+ihl])))
	}
	if l4 < 0 || len(frame) < l4+20 {
		return
	}
	frame[l4+16], frame[l4+17] = 0, 0
	binary.BigEndian.PutUint16(frame[l4+16:], ^tcpSum(frame, l3, l4))
}

// checksumsValid reports whether a TCP frame's IPv4 header and TCP
// checksums verify.
func checksumsValid(frame []byte) bool {
	l3, l4 := tcpOffsets(frame)
	if l3 < 0 || l4 < 0 {
		return false
	}
	if binary.BigEndian.Uint16(frame[12:]) == 0x0800 {
		ihl := int(frame[l3]&0x0f) * 4
		if fold(sum16(0, frame[l3:l3+ihl])) != 0xffff {
			return false
		}
	}
	return tcpSum(frame, l3, l4) == 0xffff
}
