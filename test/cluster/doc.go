// Package cluster runs a real single-node Kubernetes cluster on this
// machine: etcd, kube-apiserver, kube-controller-manager, kube-scheduler,
// kubelet and kube-proxy v1.37.2 (built by hack/kube-bins.sh), containerd,
// runc and the ptp/host-local CNI plugins from Debian, and CoreDNS built
// from the Go module proxy (tools/coredns). Pods run from the locally
// built images of test/images, imported into the node's containerd, with
// imagePullPolicy Never.
//
// # Use
//
//	func TestPrivilegedSomething(t *testing.T) {
//		c := cluster.Up(t, cluster.Options{})
//		c.Client.CoreV1().Pods("default").Create(...)
//		out, err := c.Kubectl(ctx, "get", "pods", "-o", "wide")
//	}
//
// or from a shell: `make cluster-up` (state in .cache/cluster/node, prints
// the KUBECONFIG to export), `make cluster-down`, and
// `go run ./test/cmd/amber-cluster status`.
//
// # Addresses
//
// Everything is in 198.18.0.0/15 (RFC 2544) on interfaces the cluster
// creates: the node's InternalIP NodeIP on a host-only veth (NodeLink),
// where the API server (port 6443), the kubelet and CoreDNS (port 53)
// listen; pods in PodCIDR on their ptp veths (`ip route get <podIP>` names
// the pod's host-side veth); Services in ServiceCIDR, translated by
// kube-proxy in nftables mode (also for the host's own sockets: ServiceCIDR
// routes to NodeLink, and what kube-proxy does not translate is dropped
// where NodeLink's peer receives it). etcd and the components' health and
// metrics ports are on 127.0.0.1. An nftables table (inet amber-cluster)
// drops pod packets forwarded anywhere outside 198.18.0.0/15, and CoreDNS
// has no
// upstream: nothing leaves the machine. Cluster DNS is CoreDNS as a host
// process, published as the kube-system/kube-dns Service (DNSServiceIP)
// through a hand-made EndpointSlice; with Options.Istiod, istiod is
// published the same way as istio-system/istiod (IstiodServiceIP, port
// 15012 on NodeIP).
//
// # istiod
//
// With Options.Istiod, istiod (pilot-discovery, unmodified, built from the
// pinned istio.io/istio module) runs as a host process, installed as
// Istio's ambient Helm instructions install it: Istio's CRDs, the Gateway
// API CRDs, and the ConfigMaps its chart (istio-discovery, same module)
// renders with profile=ambient — the mesh configuration (istio), which
// istiod reads and watches, and the injector configuration
// (istio-sidecar-injector) with the waypoint template, created before
// istiod starts because istiod looks for it only then. `istioctl waypoint
// apply` (Cluster.Istioctl: istioctl from the same module) therefore gets
// a waypoint Deployment rendered by istiod, as on any Istio install. No
// webhook configuration points at istiod.
//
// # Lifetime and cleanup
//
// Components run detached, in their own sessions, with pid files, so that
// `amber-cluster up` can return. Start reuses a healthy cluster in the
// same directory and cleans up anything else it finds there. Only one
// cluster runs per machine (one node address, one kube-proxy, one pod
// cgroup tree): /run/amber-cluster/owner names the state directory of the
// current one; Start refuses (ErrHostBusy) while another directory's
// cluster runs and cleans it up if it is dead.
//
// Stop (`make cluster-down`, Cluster.Close) stops the kubelet first, has
// containerd stop and remove every pod sandbox (CNI DEL releases veths and
// addresses), stops the other components, then sweeps what a crashed run
// could have left: processes naming the state directory (shims), pod
// cgroups (kubepods), mounts under the state directory, containerd's pod
// network namespaces (cni-* holding a PodCIDR address), host-side ptp
// veths, kube-proxy's and the guard's nftables tables, the node interface
// and route, and the host paths the kubelet and containerd create
// (/var/lib/kubelet, /var/log/containers, /var/lib/cni, /run/containerd, …)
// when they did not exist before. The sysctls the kubelet and the CNI change
// (vm.overcommit_memory, kernel.panic, kernel.panic_on_oops,
// net.ipv4.ip_forward) are recorded before Start changes anything and
// restored. Stop is idempotent. It never removes the state directory
// while something is still mounted under it.
//
// # Settings this machine needs
//
// From docs/facts.md §5: containerd with restrict_oom_score_adj (no
// CAP_SYS_RESOURCE), disable_apparmor, SystemdCgroup=false and the local
// pause image as sandbox_image; the kubelet with failCgroupV1 false
// (cgroup v1 here), cgroupDriver cgroupfs, failSwapOn false,
// makeIPTablesUtilChains false, its logs and volume plugins under the
// state directory; the node's client certificate O=system:nodes,
// CN=system:node:NAME; the API server with Node,RBAC authorization and
// InternalIP-first kubelet addresses. This kernel has no dummy interface
// driver, hence the veth for the node address; the machine has nft but no
// iptables, hence kube-proxy's nftables mode.
//
// # Timings (2-core development machine)
//
// Cold, with every binary to build: ≈ 12.5 min for the Kubernetes binaries
// (hack/kube-bins.sh) plus ≈ 2 min for CoreDNS. Warm: nothing → node Ready
// and schedulable in ≈ 10 s. See the README for pod start times.
//
// # Tests
//
// Tests that use Up are privileged (TestPrivileged...): they skip when not
// root, unless CI=true, where they fail.
package cluster
