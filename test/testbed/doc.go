// Package testbed builds Kubernetes-like nodes and pods out of Linux network
// namespaces on one machine, so datapath and ztunnel tests can send real
// traffic between pods on the same node and across nodes.
//
// A Testbed owns a private fabric namespace holding a bridge. Every node is
// a namespace joined to the bridge by an uplink veth; every pod is a
// namespace joined to its node by a veth pair and routed the way kindnet
// and Calico route pods: a /32 and /128 per pod on the host side, proxy
// ARP, and a link-scope gateway inside the pod. Two nodes with one pod each:
//
//	fabric   br0  198.18.0.254/24  2001:db8:ff::fe/64   (forwarding off)
//	          |  port node1                       |  port node2
//	          |                                   |
//	node1    eth0 198.18.0.1/24                  eth0 198.18.0.2/24          node2
//	              2001:db8:ff::1/64                   2001:db8:ff::2/64
//	         default via 198.18.0.254, 2001:db8:ff::fe
//	         198.19.2.0/24   via 198.18.0.2      198.19.1.0/24   via 198.18.0.1
//	         2001:db8:2::/64 via 2001:db8:ff::2  2001:db8:1::/64 via 2001:db8:ff::1
//	         198.19.1.1/32   dev vethXXXXXXXX    198.19.2.1/32   dev vethYYYYYYYY
//	         2001:db8:1::1   dev vethXXXXXXXX    2001:db8:2::1   dev vethYYYYYYYY
//	          |  vethXXXXXXXX                     |  vethYYYYYYYY
//	          |  proxy_arp=1, fe80::1/64          |  proxy_arp=1, fe80::1/64
//	          |                                   |
//	pod      eth0 198.19.1.1/32                  eth0 198.19.2.1/32          pod
//	              2001:db8:1::1/128                   2001:db8:2::1/128
//	         169.254.1.1 dev eth0 scope link
//	         default via 169.254.1.1 dev eth0
//	         default via fe80::1 dev eth0
//
// Node N (1..253) has uplink addresses 198.18.0.N and 2001:db8:ff::N and
// owns the pod ranges 198.19.N.0/24 and 2001:db8:N::/64; its pods get
// 198.19.N.M and 2001:db8:N::M (M in 1..254; IPv6 groups are written in
// hex, so node 10's range is 2001:db8:a::/64). Nodes route each other's pod
// ranges via their uplink addresses, so pod traffic between nodes crosses
// both uplinks and the bridge, and nothing on the path NATs. The bridge's
// own addresses stand in for the data-centre router: nodes need a default
// route because proxy ARP answers only for destinations the node can
// route, and since the fabric does not forward, traffic to anything outside
// the bed goes nowhere instead of leaving the machine.
//
// Neighbour resolution is dynamic (ARP, NDP; no static entries), DAD is off
// everywhere and AddNode and AddPod wait for carrier and link-local
// addresses, so everything is usable as soon as they return. IPv4 reverse
// path filtering is off in nodes and pods whatever the host's defaults.
//
// Namespaces are named amb-<pid>-<seq>-<bed>.<node>[.<pod>] under /run/netns
// so a person can "ip netns exec" into them while a test is paused. Nothing
// is created in the caller's own namespace. Close, Pod.Delete and, after a
// crash, the next NewBed in any process (it sweeps namespaces whose pid is
// gone) unmount the namespaces and kill the processes inside them; the
// kernel then removes every interface and route with them.
package testbed
