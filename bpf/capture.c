//go:build ignore

// amber capture programs:
//
//   amber_pod     TCX ingress on the host side of every local pod veth, so
//                 it sees packets leaving the pod;
//   amber_to_pod  TCX egress on the same veths, so it sees packets going
//                 to the pod: it hands the node's own replies to ztunnel
//                 sockets back to the node, and turns new connections that
//                 escaped capture at ingress (the node translated their
//                 destination to a captured pod: Services, NodePorts) back
//                 to the ztunnel;
//   amber_uplink  TCX ingress on each node uplink, so it sees packets
//                 arriving from other nodes for local pods;
//   amber_lookup  sk_lookup on the node's network namespace: it picks the
//                 ztunnel listener when the kernel itself looks one up for
//                 a captured connection (see amber_lookup).
//
// A packet that must reach the ztunnel is handed to a ztunnel socket with
// bpf_sk_assign and marked so that the fwmark rule installed by bpf/hostnet
// routes it to the local stack instead of forwarding it. accept() in the
// ztunnel then sees the original destination as the socket's local address.
// The one rewrite is amber_to_pod's: a new connection the node translated
// after the ingress programs let it pass gets its addresses back from
// conntrack, so that the node translates it again on its way to the
// ztunnel (see steer_escaped).

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/pkt_cls.h>
#include <linux/tcp.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

char __license[] SEC("license") = "Dual BSD/GPL";

// Load-time settings (rewritten by the Go loader before load).
volatile const __u32 route_mark = 0x40000;  // set on assigned packets; ip rule fwmark route_mark/route_mark
volatile const __u32 bypass_mark = 0x539;   // SO_MARK of the ztunnel's own sockets
volatile const __u32 bypass_mask = 0xfff;
volatile const __u16 hbone_port = 15008;
volatile const __u16 dial_port_min = 61000;  // lowest source port of the ztunnel's dials from a pod's address

// A pod address: IPv4 is stored IPv4-mapped (::ffff:a.b.c.d) so one map
// serves both families.
struct ip_key {
	__u8 addr[16];
};

enum pod_flags {
	POD_CAPTURED = 1,
};

// Membership: one entry per address of every captured local pod.
struct pod_info {
	__u32 ifindex;  // host-side veth the pod's packets must arrive on
	__u32 flags;    // enum pod_flags
};

enum iface_flags {
	IFACE_CAPTURED_POD = 1,  // host side of a captured pod's veth
};

struct iface_info {
	__u32 flags;  // enum iface_flags
};

// Slots of the listener SOCKMAP, filled by the ztunnel.
enum listener_slot {
	SLOT_OUTBOUND4 = 0,
	SLOT_INBOUND4 = 1,
	SLOT_HBONE4 = 2,
	SLOT_OUTBOUND6 = 3,
	SLOT_INBOUND6 = 4,
	SLOT_HBONE6 = 5,
	SLOT_MAX = 6,
};

// One counter per decision; every packet the TC programs see bumps exactly
// one (an assignment the kernel refuses counts as drop_assign_failed only;
// the node's reply amber_to_pod turns back to lo is counted there, and lo
// runs no program). amber_lookup counts nothing: it decides lookups, not
// packets, and the packets it decides for were counted by the TC program
// they crossed.
enum reason {
	R_PASS_NOT_IP = 0,        // ARP and other non-IP frames
	R_PASS_NOT_TCP,           // UDP, ICMP, ... (not captured)
	R_PASS_NOT_ENROLLED,      // TCP that neither leaves nor reaches a captured pod
	R_PASS_BYPASS_MARK,       // the ztunnel's own packets
	R_PASS_HOST_SOCKET,       // belongs to a host socket that is not the ztunnel's
	R_PASS_ESTABLISHED,       // non-SYN TCP of a captured pod with no ztunnel socket (e.g. pre-capture flows)
	R_PASS_MALFORMED,         // unparsable, on no captured path: left to the kernel, which discards bad headers
	R_PASS_TUPLE_IN_USE,      // captured SYN whose 4-tuple the node holds a socket for (TIME_WAIT, handshake, connection): routed to the kernel's own lookup
	R_PASS_TO_POD,            // egress: a packet to a pod that is neither the node's reply to a ztunnel socket nor a new connection that escaped capture
	R_ASSIGN_ESTABLISHED,     // delivered to an existing ztunnel socket
	R_ASSIGN_OUTBOUND,        // new connection from a captured pod -> 15001
	R_ASSIGN_INBOUND,         // new plaintext connection to a captured pod -> 15006
	R_ASSIGN_HBONE,           // new connection to a captured pod's :15008 -> 15008
	R_REDIRECT_HOST_REPLY,    // egress: the node's reply to a ztunnel socket that dialled from a captured pod's address -> loopback ingress
	R_REDIRECT_ESCAPED,       // egress: a forwarded SYN to a captured pod (the node translated it after ingress: Service, NodePort) -> original addresses, loopback ingress -> 15006/15008
	R_DROP_NO_LISTENER,       // fail closed: the needed ztunnel listener is not registered
	R_DROP_SPOOFED,           // source address is not registered for the veth it came from
	R_DROP_MALFORMED,         // truncated or unparsable headers on a captured path
	R_DROP_FRAGMENT,          // fragmented TCP on a captured path
	R_DROP_ASSIGN_FAILED,     // bpf_sk_assign refused the socket
	R_DROP_ESCAPED,           // fail closed: a forwarded SYN to a captured pod that cannot be turned back to the ztunnel
	R_MAX,
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 2048);
	__type(key, struct ip_key);
	__type(value, struct pod_info);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} amber_pods SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__type(key, __u32);  // ifindex
	__type(value, struct iface_info);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} amber_ifaces SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_SOCKMAP);
	__uint(max_entries, SLOT_MAX);
	__type(key, enum listener_slot);  // bpftool prints the slot's name
	__type(value, __u64);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} amber_listeners SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, R_MAX);
	__type(key, enum reason);  // bpftool prints the reason's name
	__type(value, __u64);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} amber_counters SEC(".maps");

// Force BTF for the enums so Go (bpf2go -type) and bpftool share them.
const enum pod_flags *unused_pod_flags __attribute__((unused));
const enum iface_flags *unused_iface_flags __attribute__((unused));

static __always_inline int count(__u32 r, int verdict) {
	__u64 *c = bpf_map_lookup_elem(&amber_counters, &r);
	if (c)
		*c += 1;
	return verdict;
}

// A parsed TCP/IP packet: what the decisions need, nothing more.
struct flow {
	struct bpf_sock_tuple tuple;  // as seen in the packet: saddr/sport -> daddr/dport
	struct ip_key src, dst;
	__u16 l4off;  // offset of the TCP header in the frame
	__u8 v6;
	__u8 addrs;  // src and dst are filled in
	__u8 syn;    // SYN without ACK: a new connection
};

enum parse_result {
	P_TCP = 0,
	P_NOT_IP,
	P_NOT_TCP,
	P_MALFORMED,
	P_FRAGMENT,
};

static __always_inline void map_v4(struct ip_key *k, __be32 a) {
	__builtin_memset(k, 0, sizeof(*k));
	k->addr[10] = 0xff;
	k->addr[11] = 0xff;
	__builtin_memcpy(&k->addr[12], &a, 4);
}

// An IPv6 source the anti-spoofing check lets through for non-TCP packets:
// link-local and unspecified addresses carry neighbour discovery and DAD,
// which every pod needs and which never leave the link. TCP from such an
// address would escape capture, so it is not excepted.
static __always_inline int v6_link_scoped(const struct ip_key *k) {
	__u64 hi = 0;
	__builtin_memcpy(&hi, k->addr, 8);
	__u64 lo = 0;
	__builtin_memcpy(&lo, &k->addr[8], 8);
	if (hi == 0 && lo == 0)
		return 1;
	return k->addr[0] == 0xfe && (k->addr[1] & 0xc0) == 0x80;
}

// parse fills the addresses of any IP packet (so anti-spoofing sees every
// protocol) and, for TCP, the tuple and the SYN bit.
static __always_inline int parse(struct __sk_buff *skb, struct flow *f) {
	__u32 off = ETH_HLEN;
	__u8 proto;

	if (skb->protocol == bpf_htons(ETH_P_IP)) {
		struct iphdr ip;
		if (bpf_skb_load_bytes(skb, off, &ip, sizeof(ip)) < 0)
			return P_MALFORMED;
		if (ip.version != 4 || ip.ihl < 5)
			return P_MALFORMED;
		map_v4(&f->src, ip.saddr);
		map_v4(&f->dst, ip.daddr);
		f->addrs = 1;
		if (ip.protocol != IPPROTO_TCP)
			return P_NOT_TCP;
		// MF set or a non-zero offset: ports are missing or may be
		// forged in a later fragment. TCP never needs fragmentation
		// (PMTU discovery), so a captured path refuses it.
		if (ip.frag_off & bpf_htons(0x3fff))
			return P_FRAGMENT;
		f->tuple.ipv4.saddr = ip.saddr;
		f->tuple.ipv4.daddr = ip.daddr;
		off += ip.ihl * 4;
		proto = ip.protocol;
	} else if (skb->protocol == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr ip6;
		if (bpf_skb_load_bytes(skb, off, &ip6, sizeof(ip6)) < 0)
			return P_MALFORMED;
		if (ip6.version != 6)
			return P_MALFORMED;
		__builtin_memcpy(f->src.addr, &ip6.saddr, 16);
		__builtin_memcpy(f->dst.addr, &ip6.daddr, 16);
		f->v6 = 1;
		f->addrs = 1;
		off += sizeof(ip6);
		proto = ip6.nexthdr;
		// Walk a bounded chain of extension headers (RFC 8200 §4).
#pragma unroll
		for (int i = 0; i < 4; i++) {
			if (proto == IPPROTO_TCP)
				break;
			if (proto == IPPROTO_FRAGMENT)
				return P_FRAGMENT;
			if (proto != IPPROTO_HOPOPTS && proto != IPPROTO_ROUTING && proto != IPPROTO_DSTOPTS)
				return P_NOT_TCP;
			struct {
				__u8 next;
				__u8 len;
			} ext;
			if (bpf_skb_load_bytes(skb, off, &ext, sizeof(ext)) < 0)
				return P_MALFORMED;
			proto = ext.next;
			off += (ext.len + 1) * 8;
		}
		if (proto != IPPROTO_TCP)
			return P_MALFORMED;  // more extension headers than we walk
		__builtin_memcpy(f->tuple.ipv6.saddr, &ip6.saddr, 16);
		__builtin_memcpy(f->tuple.ipv6.daddr, &ip6.daddr, 16);
	} else {
		return P_NOT_IP;
	}

	if (proto != IPPROTO_TCP)
		return P_NOT_TCP;

	struct tcphdr tcp;
	if (bpf_skb_load_bytes(skb, off, &tcp, sizeof(tcp)) < 0)
		return P_MALFORMED;
	f->l4off = off;
	if (tcp.doff < 5)
		return P_MALFORMED;
	if (f->v6) {
		f->tuple.ipv6.sport = tcp.source;
		f->tuple.ipv6.dport = tcp.dest;
	} else {
		f->tuple.ipv4.sport = tcp.source;
		f->tuple.ipv4.dport = tcp.dest;
	}
	f->syn = tcp.syn && !tcp.ack;
	return P_TCP;
}

static __always_inline __be16 dport(const struct flow *f) {
	return f->v6 ? f->tuple.ipv6.dport : f->tuple.ipv4.dport;
}

// Conntrack, for connections the host translates after the ingress
// programs ran (kube-proxy's Service DNAT in PREROUTING, the masquerade of
// NodePort traffic in POSTROUTING): a SYN assigned with the Service
// address is accepted by a ztunnel socket that took the translated one,
// and a SYN the ingress programs let pass because its Service address is
// no captured pod's reaches a captured pod translated. The kfuncs and
// structures are declared here, as far as used; field offsets are
// relocated against the kernel's BTF (CO-RE).
struct bpf_ct_opts___amber {
	__s32 netns_id;
	__s32 error;
	__u8 l4proto;
	__u8 dir;  // out: the direction of the entry's tuple the lookup matched
	__u16 ct_zone_id;
	__u8 ct_zone_dir;
	__u8 reserved[3];
};

struct nf_conntrack_man___amber {
	union {
		__be32 ip;
		__be32 ip6[4];
	} u3;
	union {
		__be16 all;
	} u;
} __attribute__((preserve_access_index));

// The kernel's dst member is an anonymous struct, of nf_conntrack_man's
// shape as far as used (u3, u): CO-RE matches members by name and does not
// compare the names of the structs that hold them.
struct nf_conntrack_tuple___amber {
	struct nf_conntrack_man___amber src;
	struct nf_conntrack_man___amber dst;
} __attribute__((preserve_access_index));

struct nf_conntrack_tuple_hash___amber {
	struct nf_conntrack_tuple___amber tuple;
} __attribute__((preserve_access_index));

struct nf_conn___amber {
	struct nf_conntrack_tuple_hash___amber tuplehash[2];
} __attribute__((preserve_access_index));

extern struct nf_conn___amber *bpf_skb_ct_lookup(struct __sk_buff *skb, struct bpf_sock_tuple *tuple, __u32 tuple__sz,
                                                 struct bpf_ct_opts___amber *opts, __u32 opts__sz) __ksym __weak;
extern void bpf_ct_release(struct nf_conn___amber *ct) __ksym __weak;

#define IP_CT_DIR_ORIGINAL 0
#define IP_CT_DIR_REPLY 1

// reverse swaps a tuple's ends.
static __always_inline void reverse(const struct bpf_sock_tuple *in, struct bpf_sock_tuple *out, int v6) {
	if (v6) {
		__builtin_memcpy(out->ipv6.saddr, in->ipv6.daddr, 16);
		__builtin_memcpy(out->ipv6.daddr, in->ipv6.saddr, 16);
		out->ipv6.sport = in->ipv6.dport;
		out->ipv6.dport = in->ipv6.sport;
	} else {
		out->ipv4.saddr = in->ipv4.daddr;
		out->ipv4.daddr = in->ipv4.saddr;
		out->ipv4.sport = in->ipv4.dport;
		out->ipv4.dport = in->ipv4.sport;
	}
}

// read_tuple copies a conntrack tuple, its source as source.
static __always_inline void read_tuple(const struct nf_conntrack_tuple___amber *t, struct bpf_sock_tuple *out, int v6) {
	if (v6) {
#pragma unroll
		for (int i = 0; i < 4; i++) {
			out->ipv6.saddr[i] = t->src.u3.ip6[i];
			out->ipv6.daddr[i] = t->dst.u3.ip6[i];
		}
		out->ipv6.sport = t->src.u.all;
		out->ipv6.dport = t->dst.u.all;
	} else {
		out->ipv4.saddr = t->src.u3.ip;
		out->ipv4.daddr = t->dst.u3.ip;
		out->ipv4.sport = t->src.u.all;
		out->ipv4.dport = t->dst.u.all;
	}
}

// ct_other looks q up in conntrack and, when it matches the entry's tuple
// of direction dir, writes the entry's tuple of the other direction to out
// (its source as source). Returns 0 when there is no such entry.
static __always_inline int ct_other(struct __sk_buff *skb, struct bpf_sock_tuple *q, int v6, __u8 dir,
                                    struct bpf_sock_tuple *out) {
	if (!bpf_skb_ct_lookup)  // weak: absent without conntrack
		return 0;
	struct bpf_ct_opts___amber opts = {.netns_id = -1, .l4proto = IPPROTO_TCP};
	struct nf_conn___amber *ct = v6 ? bpf_skb_ct_lookup(skb, q, sizeof(q->ipv6), &opts, sizeof(opts))
	                                : bpf_skb_ct_lookup(skb, q, sizeof(q->ipv4), &opts, sizeof(opts));
	if (!ct)
		return 0;
	int found = opts.dir == dir;
	if (found && dir == IP_CT_DIR_ORIGINAL)
		read_tuple(&ct->tuplehash[IP_CT_DIR_REPLY].tuple, out, v6);
	else if (found)
		read_tuple(&ct->tuplehash[IP_CT_DIR_ORIGINAL].tuple, out, v6);
	bpf_ct_release(ct);
	return found;
}

static __always_inline int same_tuple(const struct bpf_sock_tuple *a, const struct bpf_sock_tuple *b, int v6) {
	if (!v6)
		return a->ipv4.saddr == b->ipv4.saddr && a->ipv4.daddr == b->ipv4.daddr && a->ipv4.sport == b->ipv4.sport &&
		       a->ipv4.dport == b->ipv4.dport;
	__u32 diff = (a->ipv6.sport ^ b->ipv6.sport) | (a->ipv6.dport ^ b->ipv6.dport);
	for (int i = 0; i < 4; i++)
		diff |= (a->ipv6.saddr[i] ^ b->ipv6.saddr[i]) | (a->ipv6.daddr[i] ^ b->ipv6.daddr[i]);
	return !diff;
}

// translated rewrites f's tuple to the one the node's socket lookup will
// see once the node translated the packet: the reverse of the reply
// direction, which carries the translated destination (DNAT) and, for
// masqueraded traffic, the translated source (SNAT). Only a packet of the
// original direction is mapped. Returns 0 when the connection is not
// tracked or not translated.
static __always_inline int translated(struct __sk_buff *skb, struct flow *f) {
	struct bpf_sock_tuple reply = {};
	if (!ct_other(skb, &f->tuple, f->v6, IP_CT_DIR_ORIGINAL, &reply))
		return 0;
	struct bpf_sock_tuple t = {};
	reverse(&reply, &t, f->v6);
	if (same_tuple(&t, &f->tuple, f->v6))
		return 0;
	f->tuple = t;
	return 1;
}

// untranslated finds the tuple a forwarded packet had before the node
// translated it: the packet belongs to the reply tuple's reverse, so the
// reversed packet tuple is looked up and must match the reply direction;
// the original direction is what the packet was. Returns 0 when the
// connection is not tracked or not translated.
static __always_inline int untranslated(struct __sk_buff *skb, const struct flow *f, struct bpf_sock_tuple *orig) {
	struct bpf_sock_tuple q = {};
	reverse(&f->tuple, &q, f->v6);
	if (!ct_other(skb, &q, f->v6, IP_CT_DIR_REPLY, orig))
		return 0;
	return !same_tuple(orig, &f->tuple, f->v6);
}

static __always_inline struct bpf_sock *lookup(struct __sk_buff *skb, struct flow *f) {
	// The verifier wants a constant tuple size.
	return f->v6 ? bpf_skc_lookup_tcp(skb, &f->tuple, sizeof(f->tuple.ipv6), BPF_F_CURRENT_NETNS, 0)
	             : bpf_skc_lookup_tcp(skb, &f->tuple, sizeof(f->tuple.ipv4), BPF_F_CURRENT_NETNS, 0);
}

// connected_lookup is lookup without listeners: bpf_skc_lookup_tcp falls
// back to the listening hash (and so to amber_lookup, which answers with a
// ztunnel listener for every captured 4-tuple), but a listener is never
// the socket a packet of an existing connection belongs to.
static __always_inline struct bpf_sock *connected_lookup(struct __sk_buff *skb, struct flow *f) {
	struct bpf_sock *sk = lookup(skb, f);
	if (sk && sk->state == BPF_TCP_LISTEN) {
		bpf_sk_release(sk);
		return NULL;
	}
	return sk;
}

// held_socket is the non-listening socket the node holds for f's 4-tuple,
// or NULL. A connection to a Service address that the host translates
// (kube-proxy) is found under the translated address: the ztunnel's socket
// took the SYN's destination after PREROUTING.
static __always_inline struct bpf_sock *held_socket(struct __sk_buff *skb, struct flow *f) {
	struct bpf_sock *sk = connected_lookup(skb, f);
	if (sk)
		return sk;
	struct flow t = *f;
	if (!translated(skb, &t))
		return NULL;
	return connected_lookup(skb, &t);
}

// host_owned reports whether a non-listening socket of the node netns
// belongs to the host rather than the ztunnel. Request and time-wait
// sockets cannot be asked for their mark, but one whose 4-tuple a captured
// packet matches can only belong to a transparent listener's handshake or
// a transparent socket (pods' own sockets live in their own netns), so
// they count as the ztunnel's. A full socket must carry the ztunnel's mark.
static __always_inline int host_owned(struct bpf_sock *sk) {
	struct bpf_sock *full = bpf_sk_fullsock(sk);
	return full && (full->mark & bypass_mask) != bypass_mark;
}

// assign_established hands a packet of an existing connection to the
// ztunnel socket it belongs to. Returns -1 when there is none.
//
// A host socket (a kubelet probe, a hostNetwork server) receives its
// packets by ordinary routing. Packets of connections that are not the
// ztunnel's are left alone whatever conntrack says.
static __always_inline int assign_established(struct __sk_buff *skb, struct flow *f) {
	struct bpf_sock *sk = held_socket(skb, f);
	if (!sk)
		return -1;
	if (host_owned(sk)) {
		bpf_sk_release(sk);
		return count(R_PASS_HOST_SOCKET, TC_ACT_OK);
	}
	long err = bpf_sk_assign(skb, sk, 0);
	bpf_sk_release(sk);
	if (err)
		return count(R_DROP_ASSIGN_FAILED, TC_ACT_SHOT);
	skb->mark |= route_mark;
	return count(R_ASSIGN_ESTABLISHED, TC_ACT_OK);
}

// assign_listener hands a new connection to a ztunnel listener. No listener
// means no ztunnel: the connection is dropped, never let through in
// plaintext.
//
// A SYN whose 4-tuple the node already holds a socket for is not assigned
// but routed to the local stack with the route mark, where the kernel's own
// lookup finds that socket. A listener assigned by bpf_sk_assign would
// bypass that lookup; the request socket the listener then creates
// duplicates the socket in the established hash, inet_ehash_insert()
// reports the duplicate, inet_csk_reqsk_queue_hash_add() fails and
// tcp_conn_request() drops the SYN without an answer (Linux 6.18): the
// client's connect times out. The common
// case is the ztunnel's side of an earlier connection in TIME_WAIT (the
// ztunnel closed first, as it does when the server closes first). There
// tcp_timewait_state_process() accepts the SYN when RFC 6191 allows it (a
// sequence number past the old connection's, or a newer timestamp) and
// tcp_v4_rcv()/tcp_v6_rcv() look up a listener, which runs amber_lookup:
// the same listener this program would have picked. Otherwise the
// TIME_WAIT socket answers with an ACK, as it would without amber. A
// retransmitted SYN of a handshake in progress meets its request socket
// (the SYN-ACK is sent again); a SYN on a live connection gets a challenge
// ACK (RFC 5961).
static __always_inline int assign_listener(struct __sk_buff *skb, struct flow *f, __u32 slot, __u32 reason) {
	if (f->v6)
		slot += SLOT_OUTBOUND6;
	struct bpf_sock *sk = bpf_map_lookup_elem(&amber_listeners, &slot);
	if (!sk)
		return count(R_DROP_NO_LISTENER, TC_ACT_SHOT);
	struct bpf_sock *held = held_socket(skb, f);
	if (held) {
		bpf_sk_release(held);
		bpf_sk_release(sk);
		skb->mark |= route_mark;
		return count(R_PASS_TUPLE_IN_USE, TC_ACT_OK);
	}
	long err = bpf_sk_assign(skb, sk, 0);
	bpf_sk_release(sk);
	if (err)
		return count(R_DROP_ASSIGN_FAILED, TC_ACT_SHOT);
	skb->mark |= route_mark;
	return count(reason, TC_ACT_OK);
}

// inbound_new decides a new connection to a local pod.
static __always_inline int inbound_new(struct __sk_buff *skb, struct flow *f) {
	struct pod_info *dst = bpf_map_lookup_elem(&amber_pods, &f->dst);
	if (!dst || !(dst->flags & POD_CAPTURED))
		return count(R_PASS_NOT_ENROLLED, TC_ACT_OK);
	if (dport(f) == bpf_htons(hbone_port))
		return assign_listener(skb, f, SLOT_HBONE4, R_ASSIGN_HBONE);
	return assign_listener(skb, f, SLOT_INBOUND4, R_ASSIGN_INBOUND);
}

// A packet is on a captured path when it leaves or reaches a captured pod;
// only then are malformed packets and fragments dropped.
static __always_inline int touches_captured(const struct flow *f, int src_captured) {
	if (src_captured)
		return 1;
	if (!f->addrs)
		return 0;
	struct pod_info *dst = bpf_map_lookup_elem(&amber_pods, &f->dst);
	return dst && (dst->flags & POD_CAPTURED);
}

SEC("tc")
int amber_pod(struct __sk_buff *skb) {
	struct flow f = {};
	int p = parse(skb, &f);
	if (p == P_NOT_IP)
		return count(R_PASS_NOT_IP, TC_ACT_OK);

	__u32 ifindex = skb->ifindex;
	struct iface_info *iface = bpf_map_lookup_elem(&amber_ifaces, &ifindex);
	int captured_veth = iface && (iface->flags & IFACE_CAPTURED_POD);

	if (p == P_MALFORMED)
		return touches_captured(&f, captured_veth) ? count(R_DROP_MALFORMED, TC_ACT_SHOT) : count(R_PASS_MALFORMED, TC_ACT_OK);

	// Anti-spoofing: an address of a captured pod may only appear as a
	// source on that pod's veth, and a captured pod's veth only carries
	// its own addresses. Identity is bound to the veth.
	struct pod_info *src = bpf_map_lookup_elem(&amber_pods, &f.src);
	if (src && src->ifindex != ifindex)
		return count(R_DROP_SPOOFED, TC_ACT_SHOT);
	if (captured_veth && !src && !(p == P_NOT_TCP && f.v6 && v6_link_scoped(&f.src)))
		return count(R_DROP_SPOOFED, TC_ACT_SHOT);
	int src_captured = captured_veth && src && (src->flags & POD_CAPTURED);

	if (p == P_NOT_TCP)
		return count(R_PASS_NOT_TCP, TC_ACT_OK);
	if (p == P_FRAGMENT)
		return touches_captured(&f, src_captured) ? count(R_DROP_FRAGMENT, TC_ACT_SHOT) : count(R_PASS_NOT_ENROLLED, TC_ACT_OK);

	if ((skb->mark & bypass_mask) == bypass_mark)
		return count(R_PASS_BYPASS_MARK, TC_ACT_OK);

	if (!f.syn) {
		int r = assign_established(skb, &f);
		if (r >= 0)
			return r;
		return count(src_captured ? R_PASS_ESTABLISHED : R_PASS_NOT_ENROLLED, TC_ACT_OK);
	}
	if (src_captured)
		return assign_listener(skb, &f, SLOT_OUTBOUND4, R_ASSIGN_OUTBOUND);
	return inbound_new(skb, &f);
}

SEC("tc")
int amber_uplink(struct __sk_buff *skb) {
	struct flow f = {};
	int p = parse(skb, &f);
	if (p == P_NOT_IP)
		return count(R_PASS_NOT_IP, TC_ACT_OK);
	if (p == P_MALFORMED)
		return touches_captured(&f, 0) ? count(R_DROP_MALFORMED, TC_ACT_SHOT) : count(R_PASS_MALFORMED, TC_ACT_OK);

	// A captured pod's address arriving from another node is forged:
	// that pod's packets only ever leave through its own veth.
	struct pod_info *src = bpf_map_lookup_elem(&amber_pods, &f.src);
	if (src)
		return count(R_DROP_SPOOFED, TC_ACT_SHOT);

	if (p == P_NOT_TCP)
		return count(R_PASS_NOT_TCP, TC_ACT_OK);
	if (p == P_FRAGMENT)
		return touches_captured(&f, 0) ? count(R_DROP_FRAGMENT, TC_ACT_SHOT) : count(R_PASS_NOT_ENROLLED, TC_ACT_OK);

	if ((skb->mark & bypass_mask) == bypass_mark)
		return count(R_PASS_BYPASS_MARK, TC_ACT_OK);

	if (!f.syn) {
		int r = assign_established(skb, &f);
		if (r >= 0)
			return r;
		return count(R_PASS_NOT_ENROLLED, TC_ACT_OK);
	}
	return inbound_new(skb, &f);
}

// LOOPBACK_IFINDEX: every network namespace's lo has ifindex 1.
#define LOOPBACK_IFINDEX 1

// to_loopback prepares a packet for bpf_redirect to lo's ingress, where
// the route mark makes the node deliver it locally. eth_type_trans() on lo
// wants lo's (all-zero) MAC as destination, or ip_rcv() drops the packet
// as PACKET_OTHERHOST. In the same namespace ____dev_forward_skb() keeps
// the mark and drops the route and the conntrack reference: the packet
// passes PREROUTING again as if it had arrived.
static __always_inline int to_loopback(struct __sk_buff *skb) {
	const __u8 lo_mac[ETH_ALEN] = {};
	if (bpf_skb_store_bytes(skb, 0, lo_mac, ETH_ALEN, 0) < 0)
		return -1;
	skb->mark |= route_mark;
	return 0;
}

// rewrite writes t's addresses and ports into f's packet, keeping the
// IPv4 header checksum and the TCP checksum (pseudo-header included)
// valid by incremental update, as the kernel's own NAT does. A forwarded
// packet is never CHECKSUM_COMPLETE (skb_forward_csum()), so skb->csum
// needs no care: CHECKSUM_PARTIAL gets its pseudo-header sum updated,
// anything else its full checksum.
static __always_inline int rewrite(struct __sk_buff *skb, struct flow *f, struct bpf_sock_tuple *t) {
	__u32 csum = f->l4off + __builtin_offsetof(struct tcphdr, check);
	__s64 d;
	if (f->v6) {
		// saddr and daddr are adjacent in the header and the tuple.
		d = bpf_csum_diff((__be32 *)f->tuple.ipv6.saddr, 32, (__be32 *)t->ipv6.saddr, 32, 0);
		if (d < 0 || bpf_skb_store_bytes(skb, ETH_HLEN + __builtin_offsetof(struct ipv6hdr, saddr), t->ipv6.saddr, 32, 0) < 0 ||
		    bpf_l4_csum_replace(skb, csum, 0, d, BPF_F_PSEUDO_HDR) < 0)
			return -1;
		d = bpf_csum_diff((__be32 *)&f->tuple.ipv6.sport, 4, (__be32 *)&t->ipv6.sport, 4, 0);
		if (d < 0 || bpf_skb_store_bytes(skb, f->l4off, &t->ipv6.sport, 4, 0) < 0)
			return -1;
	} else {
		d = bpf_csum_diff(&f->tuple.ipv4.saddr, 8, &t->ipv4.saddr, 8, 0);
		if (d < 0 || bpf_skb_store_bytes(skb, ETH_HLEN + __builtin_offsetof(struct iphdr, saddr), &t->ipv4.saddr, 8, 0) < 0 ||
		    bpf_l3_csum_replace(skb, ETH_HLEN + __builtin_offsetof(struct iphdr, check), 0, d, 0) < 0 ||
		    bpf_l4_csum_replace(skb, csum, 0, d, BPF_F_PSEUDO_HDR) < 0)
			return -1;
		d = bpf_csum_diff((__be32 *)&f->tuple.ipv4.sport, 4, (__be32 *)&t->ipv4.sport, 4, 0);
		if (d < 0 || bpf_skb_store_bytes(skb, f->l4off, &t->ipv4.sport, 4, 0) < 0)
			return -1;
	}
	return bpf_l4_csum_replace(skb, csum, 0, d, 0) < 0 ? -1 : 0;
}

// steer_escaped turns a new connection that escaped capture back to the
// ztunnel. The ingress programs decide on the destination a SYN carries;
// a Service address (ClusterIP, a node's address at a NodePort, an
// external or load-balancer IP) is no captured pod's, so the SYN passed,
// and the node's DNAT (kube-proxy, PREROUTING) translated it to a captured
// pod afterwards and forwarded it here. Delivered, it would reach the pod
// in plaintext: no mTLS, no authorization, no access log.
//
// Redirected as it is, the translated packet would start a second
// conntrack entry whose reply tuple is the first entry's, and the kernel
// drops such a clash when it confirms the entry. So the packet gets back
// the addresses it had before the node translated it — the original
// direction of the conntrack entry whose reply direction it matches —
// and is redirected to lo's ingress with the route mark. There conntrack
// finds the existing entry in its original direction and translates the
// packet again the same way (DNAT in PREROUTING; for masqueraded NodePort
// traffic also SNAT in INPUT, where the conntrack entry already holds the
// binding), the fwmark rule routes it locally, the socket lookup finds no
// socket for the pod's address and amber_lookup hands it to the inbound
// (or, at :15008, the HBONE) listener, as for any connection to a captured
// pod. The listener's SYN-ACK matches the entry's reply direction and
// leaves with the Service address as its source, as the client expects.
// An untracked or untranslated packet (no NAT on the path, an interface
// without the ingress programs) is redirected as it is.
//
// Fail closed: without the listener the SYN is dropped (the client
// retransmits, as at ingress); a SYN that came in through lo was steered
// once already and routing did not deliver it (the fwmark rule is
// missing), and a packet that cannot be rewritten, are dropped.
static __always_inline int steer_escaped(struct __sk_buff *skb, struct flow *f) {
	if (skb->ingress_ifindex == LOOPBACK_IFINDEX)
		return count(R_DROP_ESCAPED, TC_ACT_SHOT);
	__u32 slot = dport(f) == bpf_htons(hbone_port) ? SLOT_HBONE4 : SLOT_INBOUND4;
	if (f->v6)
		slot += SLOT_OUTBOUND6;
	struct bpf_sock *sk = bpf_map_lookup_elem(&amber_listeners, &slot);
	if (!sk)
		return count(R_DROP_NO_LISTENER, TC_ACT_SHOT);
	bpf_sk_release(sk);
	struct bpf_sock_tuple orig = {};
	if (untranslated(skb, f, &orig) && rewrite(skb, f, &orig) < 0)
		return count(R_DROP_ESCAPED, TC_ACT_SHOT);
	if (to_loopback(skb) < 0)
		return count(R_DROP_ESCAPED, TC_ACT_SHOT);
	return count(R_REDIRECT_ESCAPED, bpf_redirect(LOOPBACK_IFINDEX, BPF_F_INGRESS));
}

// maybe_syn is the forwarded path's cheap first look, by direct packet
// access: 0 when the frame is certainly not a new TCP connection (another
// protocol, or a TCP segment without SYN or with ACK: the packets of
// established connections), 1 when it is, or when the headers are not in
// the linear data, fragmented or behind IPv6 extension headers, which
// parse() then decides.
static __always_inline int maybe_syn(struct __sk_buff *skb) {
	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;
	struct iphdr *ip = data + ETH_HLEN;
	__u8 *flags;
	if (skb->protocol == bpf_htons(ETH_P_IP)) {
		if ((void *)(ip + 1) > end)
			return 1;
		if (ip->ihl < 5 || (ip->frag_off & bpf_htons(0x3fff)))
			return 1;
		if (ip->protocol != IPPROTO_TCP)
			return 0;
		flags = (__u8 *)ip + ip->ihl * 4 + 13;
	} else if (skb->protocol == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr *ip6 = data + ETH_HLEN;
		if ((void *)(ip6 + 1) > end)
			return 1;
		if (ip6->nexthdr != IPPROTO_TCP)
			return ip6->nexthdr != IPPROTO_UDP && ip6->nexthdr != IPPROTO_ICMPV6;
		flags = (__u8 *)(ip6 + 1) + 13;
	} else {
		return 0;
	}
	if ((void *)(flags + 1) > end)
		return 1;
	return (*flags & 0x12) == 0x02;  // SYN without ACK
}

// forwarded_to_pod decides a packet the node forwards to a pod. Every new
// connection to a captured pod is taken by the ingress programs before it
// is routed, so a forwarded SYN to a captured pod escaped them (see
// steer_escaped). Fragmented or unparsable TCP to a captured pod is
// dropped as at ingress: it could hide a SYN. Everything else (packets of
// established connections, other pods' traffic) passes, most of it after
// maybe_syn's look.
static __always_inline int forwarded_to_pod(struct __sk_buff *skb) {
	if (!maybe_syn(skb))
		return count(R_PASS_TO_POD, TC_ACT_OK);
	struct flow f = {};
	int p = parse(skb, &f);
	if (p == P_NOT_IP || p == P_NOT_TCP || (p == P_TCP && !f.syn) || !f.addrs)
		return count(R_PASS_TO_POD, TC_ACT_OK);
	struct pod_info *dst = bpf_map_lookup_elem(&amber_pods, &f.dst);
	if (!dst || !(dst->flags & POD_CAPTURED) || dst->ifindex != skb->ifindex)
		return count(R_PASS_TO_POD, TC_ACT_OK);
	if (p == P_FRAGMENT)
		return count(R_DROP_FRAGMENT, TC_ACT_SHOT);
	if (p == P_MALFORMED)
		return count(R_DROP_MALFORMED, TC_ACT_SHOT);
	return steer_escaped(skb, &f);
}

// amber_to_pod, at TCX egress of every pod veth, has two cases.
//
// A packet the node forwards (it has an ingress interface) is checked for
// a new connection to a captured pod that escaped capture at ingress: see
// forwarded_to_pod. Packets the node sends itself (kubelet probes,
// hostNetwork pods, the node's own Service traffic) are not captured, as
// documented.
//
// A packet the node sends itself may be a reply to the ztunnel: it dialled
// a destination local to the node (a host-network server on one of the
// node's addresses, or a Service address kube-proxy translates to one)
// from a captured pod's address, as Istio's in-pod ztunnel does. The
// server's replies are addressed to the pod, so the node routes them out
// of the pod's veth, where no ingress program sees them and the pod, not
// the ztunnel's socket, would receive them. Such a reply is recognised by
// its socket: the lookup of its 4-tuple in the node netns finds the
// ztunnel's (pods' own sockets live in their own netns). It is turned back
// into the node: redirected to the loopback's ingress with the route mark,
// it is routed locally and the kernel's lookup finds the ztunnel's socket.
//
// Why loopback, not the veth's own ingress: an IPv4 packet received with a
// local source address is a martian (fib_validate_source()) unless the
// receiving device has accept_local, and a veth's reverse-path filter
// (often on, and max(all, dev)) rejects it too. bpf/hostnet sets
// accept_local on lo, and rp_filter loose on lo for the forwarded
// connections steer_escaped sends there, whose source is not local:
// ordinary loopback traffic keeps the route it was sent with and never
// meets either check. IPv6 has no such check.
//
// Cost: a forwarded packet costs a parse, a forwarded SYN a map lookup,
// only one to a captured pod the conntrack lookup and the rewrite; one of
// the ztunnel's own (bypass mark) costs two loads; a packet the node sends
// to a pod port below dial_port_min (kubelet probes, host clients of pods)
// a parse; only the node's TCP to a captured pod at a port the ztunnel
// dials from pays a map and a socket lookup.
SEC("tc")
int amber_to_pod(struct __sk_buff *skb) {
	if (skb->ingress_ifindex)
		return forwarded_to_pod(skb);
	if ((skb->mark & bypass_mask) == bypass_mark)
		return count(R_PASS_TO_POD, TC_ACT_OK);
	struct flow f = {};
	if (parse(skb, &f) != P_TCP || bpf_ntohs(dport(&f)) < dial_port_min)
		return count(R_PASS_TO_POD, TC_ACT_OK);
	struct pod_info *dst = bpf_map_lookup_elem(&amber_pods, &f.dst);
	if (!dst || !(dst->flags & POD_CAPTURED) || dst->ifindex != skb->ifindex)
		return count(R_PASS_TO_POD, TC_ACT_OK);
	struct bpf_sock *sk = connected_lookup(skb, &f);
	if (!sk)
		return count(R_PASS_TO_POD, TC_ACT_OK);
	int host = host_owned(sk);
	bpf_sk_release(sk);
	if (host || to_loopback(skb) < 0)
		return count(R_PASS_TO_POD, TC_ACT_OK);
	return count(R_REDIRECT_HOST_REPLY, bpf_redirect(LOOPBACK_IFINDEX, BPF_F_INGRESS));
}

#define AF_INET 2
#define AF_INET6 10

// amber_lookup runs when the kernel looks up a TCP or UDP listener in the
// node's network namespace (__inet_lookup_listener(),
// inet6_lookup_listener(), before the listening hash). The TC programs
// assign new connections to the ztunnel's listeners themselves; the kernel
// looks one up for a captured connection when assign_listener leaves a
// SYN to it (a 4-tuple in TIME_WAIT), and bpf_skc_lookup_tcp falls back to
// it. It decides as the TC programs do: a connection arriving on a
// captured pod's veth (whose packets carry only the pod's addresses:
// anti-spoofing) -> outbound; one to a captured pod -> HBONE for port
// 15008, inbound otherwise. A missing listener fails closed (SK_DROP: no
// socket, never a host listener on the same port). Everything else — the
// node's own traffic, and the ztunnel's connections to the node's own
// addresses, which come from a pod's address but over loopback — is left
// to the listening hash.
SEC("sk_lookup")
int amber_lookup(struct bpf_sk_lookup *ctx) {
	if (ctx->protocol != IPPROTO_TCP)
		return SK_PASS;
	__u32 slot;
	__u32 ifindex = ctx->ingress_ifindex;
	struct iface_info *iface = bpf_map_lookup_elem(&amber_ifaces, &ifindex);
	if (iface && (iface->flags & IFACE_CAPTURED_POD)) {
		slot = SLOT_OUTBOUND4;
	} else {
		struct ip_key local = {};
		if (ctx->family == AF_INET) {
			map_v4(&local, ctx->local_ip4);
		} else if (ctx->family == AF_INET6) {
			for (int i = 0; i < 4; i++) {
				__u32 w = ctx->local_ip6[i];
				__builtin_memcpy(&local.addr[i * 4], &w, 4);
			}
		} else {
			return SK_PASS;
		}
		struct pod_info *dst = bpf_map_lookup_elem(&amber_pods, &local);
		if (!dst || !(dst->flags & POD_CAPTURED))
			return SK_PASS;
		slot = ctx->local_port == hbone_port ? SLOT_HBONE4 : SLOT_INBOUND4;
	}
	if (ctx->family == AF_INET6)
		slot += SLOT_OUTBOUND6;
	struct bpf_sock *sk = bpf_map_lookup_elem(&amber_listeners, &slot);
	if (!sk)
		return SK_DROP;
	long err = bpf_sk_assign(ctx, sk, BPF_SK_LOOKUP_F_REPLACE);
	bpf_sk_release(sk);
	return err ? SK_DROP : SK_PASS;
}
