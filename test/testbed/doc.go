// Package testbed builds Kubernetes-like nodes and pods out of Linux network
// namespaces on one machine, so datapath and ztunnel tests can send real
// traffic between pods on the same node and across nodes.
//
// A Testbed owns one private fabric namespace; every node is a namespace
// joined to the fabric bridge by an uplink veth, and every pod is a
// namespace joined to its node by a veth pair routed the way kindnet and
// Calico route pods (a /32 and /128 per pod on the host side, proxy ARP, a
// link-scope gateway inside the pod):
//
//	fabric netns  ┌──────────────── br0 198.18.0.254/24 2001:db8:ff::fe/64 ────────────────┐
//	              │ node1                                      node2                       │
//	              └───┬────────────────────────────────────────────┬───────────────────────┘
//	node netns        │ eth0 198.18.0.1/24                         │ eth0 198.18.0.2/24
//	(forwarding on)   │      2001:db8:ff::1/64                     │      2001:db8:ff::2/64
//	                  │ 198.19.2.0/24, 2001:db8:2::/64 via node2   │ 198.19.1.0/24, 2001:db8:1::/64 via node1
//	                  │ default via 198.18.0.254, 2001:db8:ff::fe  │ ...
//	         vethXXXXXXXX  proxy_arp, fe80::1/64     vethYYYYYYYY
//	         198.19.1.1/32 dev vethXXXXXXXX          ...
//	                  │                                            │
//	pod netns         │ eth0 198.19.1.1/32 2001:db8:1::1/128       │ eth0 198.19.2.1/32 ...
//	                    169.254.1.1 dev eth0 scope link
//	                    default via 169.254.1.1 dev eth0
//	                    default via fe80::1 dev eth0
//
// Node N (1..253) has uplink addresses 198.18.0.N and 2001:db8:ff::N and
// owns the pod ranges 198.19.N.0/24 and 2001:db8:N::/64 (the third IPv6
// group holds N as a number, so node 10 owns 2001:db8:a::/64); its pods get
// 198.19.N.M and 2001:db8:N::M. Nodes route each other's pod ranges via
// their uplink addresses, so pod traffic between nodes crosses two uplinks
// and the bridge, never NATed. The fabric's own addresses play the
// data-centre router: nodes need a default route because proxy ARP only
// answers for destinations the node can route, and the fabric does not
// forward, so traffic to anything outside the bed fails fast with an ICMP
// unreachable instead of leaving the machine.
//
// Neighbour resolution is dynamic (ARP, NDP) and DAD is off everywhere, so
// every address is usable as soon as AddNode or AddPod returns. Reverse path
// filtering is off in nodes and pods whatever the host's defaults are.
//
// Namespaces are named amb-<pid>-<seq>-<bed>.<node>[.<pod>] under /run/netns,
// so a person can "ip netns exec" into them while a test is paused. Nothing
// is created in the caller's own namespace: Close (or a crashed run's
// successor, which sweeps namespaces whose pid is gone) removes every
// namespace and kills the processes left inside them, which removes every
// link with them.
package testbed
