package cluster

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/amber-mesh/amber/test/images"
)

// The node's addresses. Everything lives in RFC 2544's benchmarking range
// 198.18.0.0/15, only on interfaces the cluster creates: the node address
// on a host-only veth, pods on their veths, Service IPs routed to the node's
// veth (kube-proxy translates them; what it does not know is dropped where
// the veth's peer receives it).
const (
	// NodeIP is the node's InternalIP, on the interface NodeLink.
	// The API server, the kubelet and cluster DNS listen on it.
	NodeIP = "198.18.0.1"
	// NodeLink is the interface holding NodeIP, one end of a veth pair
	// whose other end (nodePeer) also stays on the host.
	NodeLink = "amber-k8s0"
	nodePeer = "amber-k8s1"
	// PodCIDR is where the CNI's host-local IPAM takes pod addresses.
	PodCIDR = "198.18.1.0/24"
	// ServiceCIDR is the API server's --service-cluster-ip-range.
	ServiceCIDR = "198.18.16.0/20"
	// KubernetesServiceIP is the "kubernetes" Service, in the serving
	// certificate so pods may dial it.
	KubernetesServiceIP = "198.18.16.1"
	// DNSServiceIP is the kube-system/kube-dns Service, the pods'
	// nameserver; its endpoint is CoreDNS on NodeIP:53.
	DNSServiceIP = "198.18.16.10"
	// APIServerPort is the API server's port on NodeIP.
	APIServerPort = 6443
	// ClusterDomain is the DNS domain of Services and pods.
	ClusterDomain = "cluster.local"
	// DefaultNodeName is the node's name unless Options.NodeName is set.
	DefaultNodeName = "amber-node"

	// cniNetwork names the CNI network; libcni caches results as
	// /var/lib/cni/results/<network>-<container>-<if>.
	cniNetwork = "amber-cluster"
	// guardTable is the nftables table that keeps pod traffic on the
	// machine.
	guardTable = "amber-cluster"
	// ptpGateway is the address the ptp plugin puts on every host-side
	// veth (the first of PodCIDR).
	ptpGateway = "198.18.1.1"
)

// Loopback ports of the components that need one (health, metrics). They
// are fixed, not random, so that `amber-cluster status` can find them.
const (
	etcdClientPort  = 12379
	etcdPeerPort    = 12380
	corednsHealth   = "127.0.0.1:18080"
	corednsReady    = "127.0.0.1:18181"
	kubeletHealthz  = 10248
	kubeProxyHealth = "127.0.0.1:10256"
	kubeProxyMetric = "127.0.0.1:10249"
)

// layout names the files under a cluster's state directory.
type layout struct{ dir string }

func (l layout) path(elem ...string) string {
	return filepath.Join(append([]string{l.dir}, elem...)...)
}
func (l layout) pki() string                { return l.path("pki") }
func (l layout) logs() string               { return l.path("logs") }
func (l layout) pids() string               { return l.path("pids") }
func (l layout) containerd() string         { return l.path("containerd") }
func (l layout) criSocket() string          { return l.path("containerd", "containerd.sock") }
func (l layout) kubeletRoot() string        { return l.path("kubelet") }
func (l layout) hostRecord() string         { return l.path("host.json") }
func (l layout) adminKubecfg() string       { return l.path("pki", "admin.kubeconfig") }
func (l layout) cniConfDir() string         { return l.path("cni", "net.d") }
func (l layout) cniBinDir() string          { return l.path("cni", "bin") }
func (l layout) cniIPAMDir() string         { return l.path("cni", "ipam") }
func (l layout) runcRoot() string           { return l.path("containerd", "runc") }
func (l layout) configFile(n string) string { return l.path("config", n) }

// writeConfigs writes containerd's, the CNI's, the kubelet's, kube-proxy's
// and CoreDNS's configuration files.
func writeConfigs(l layout, nodeName string) error {
	files := map[string]string{
		l.configFile("containerd.toml"):                    containerdConfig(l),
		filepath.Join(l.cniConfDir(), "10-amber.conflist"): cniConfig(l),
		l.configFile("kubelet.yaml"):                       kubeletConfig(l),
		l.configFile("kube-proxy.yaml"):                    kubeProxyConfig(l, nodeName),
		l.configFile("Corefile"):                           corefile(l),
		// Pods with dnsPolicy Default and the node itself get the cluster
		// DNS, never the host's resolvers: names stay on the machine.
		l.configFile("resolv.conf"): "nameserver " + NodeIP + "\n",
	}
	if err := linkCNIPlugins(l); err != nil {
		return err
	}
	for path, content := range files {
		if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
			return fmt.Errorf("write config: %w", err)
		}
		if err := os.WriteFile(path, []byte(content), 0o644); err != nil {
			return fmt.Errorf("write config: %w", err)
		}
	}
	return nil
}

// containerdConfig is containerd 1.6's (config version 2) with every path
// under the state directory. restrict_oom_score_adj: without
// CAP_SYS_RESOURCE in the machine's bounding set runc cannot lower
// oom_score_adj and every pod fails with "can't get final child's PID from
// pipe: EOF". disable_apparmor: no AppArmor here. SystemdCgroup=false: no
// systemd; the kubelet uses cgroupfs.
func containerdConfig(l layout) string {
	r := strings.NewReplacer("@DIR@", l.containerd(), "@CNICONF@", l.cniConfDir(), "@CNIBIN@", l.cniBinDir(), "@RUNC@", l.runcRoot(), "@PAUSE@", images.Pause.Ref)
	return r.Replace(`version = 2
root = "@DIR@/root"
state = "@DIR@/state"
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs", "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing"]

[grpc]
  address = "@DIR@/containerd.sock"
[ttrpc]
  address = "@DIR@/containerd.sock.ttrpc"
[debug]
  address = ""
[metrics]
  address = ""

[plugins."io.containerd.internal.v1.opt"]
  path = "@DIR@/opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "@PAUSE@"
  restrict_oom_score_adj = true
  disable_apparmor = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        Root = "@RUNC@"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "@CNIBIN@"
    conf_dir = "@CNICONF@"
    max_conf_num = 1
`)
}

// cniConfig: ptp gives each pod a veth pair and a /32 route on the host,
// the host-side veth named in `ip route get <podIP>`; no bridge and no
// masquerade, so pod traffic is routed (and guarded) by the host.
func cniConfig(l layout) string {
	return fmt.Sprintf(`{
  "cniVersion": "0.4.0",
  "name": %q,
  "plugins": [{
    "type": "ptp",
    "ipMasq": false,
    "ipam": {
      "type": "host-local",
      "ranges": [[{"subnet": %q, "gateway": %q}]],
      "routes": [{"dst": "0.0.0.0/0"}],
      "dataDir": %q
    }
  }]
}
`, cniNetwork, PodCIDR, ptpGateway, l.cniIPAMDir())
}

// kubeletConfig: the settings docs/facts.md §5 lists as necessary on this
// kind of machine (cgroup v1, no systemd, no swap accounting, no iptables
// chains), with every directory the kubelet lets us move under the state
// directory.
func kubeletConfig(l layout) string {
	r := strings.NewReplacer("@PKI@", l.pki(), "@ROOT@", l.kubeletRoot(), "@SOCK@", l.criSocket(),
		"@NODEIP@", NodeIP, "@DNS@", DNSServiceIP, "@DOMAIN@", ClusterDomain,
		"@RESOLV@", l.configFile("resolv.conf"), "@HEALTHZ@", fmt.Sprint(kubeletHealthz))
	return r.Replace(`apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: @NODEIP@
port: 10250
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: @HEALTHZ@
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: @PKI@/ca.crt}
authorization: {mode: Webhook}
containerRuntimeEndpoint: unix://@SOCK@
cgroupDriver: cgroupfs
failCgroupV1: false
failSwapOn: false
makeIPTablesUtilChains: false
protectKernelDefaults: false
clusterDNS: [@DNS@]
clusterDomain: @DOMAIN@
resolvConf: @RESOLV@
podLogsDir: @ROOT@/pod-logs
volumePluginDir: @ROOT@/volume-plugins
serializeImagePulls: false
# Kubernetes' default of 110 is less than the walkthrough's Bookinfo,
# sleep and notsleep plus the 100 pods the real-node tests churn; the pod
# network (PodCIDR, a /24) has 253 addresses.
maxPods: 200
nodeStatusUpdateFrequency: 4s
evictionHard: {memory.available: 100Mi, nodefs.available: 1%, imagefs.available: 1%, nodefs.inodesFree: 1%}
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
`)
}

// kubeProxyConfig: nftables mode (the machine has nft 1.0.6 and no
// iptables binary); conntrack limits and timeouts 0 = leave the host's
// sysctls alone.
func kubeProxyConfig(l layout, nodeName string) string {
	return fmt.Sprintf(`apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
mode: nftables
clientConnection: {kubeconfig: %s}
hostnameOverride: %s
bindAddress: %s
healthzBindAddress: %s
metricsBindAddress: %s
clusterCIDR: %s
nodePortAddresses: [%s/32]
conntrack: {maxPerCore: 0, min: 0, tcpEstablishedTimeout: 0s, tcpCloseWaitTimeout: 0s, udpTimeout: 0s, udpStreamTimeout: 0s}
`, filepath.Join(l.pki(), "kube-proxy.kubeconfig"), nodeName, NodeIP, kubeProxyHealth, kubeProxyMetric, PodCIDR, NodeIP)
}

// corefile serves cluster.local and the reverse zones from the API server.
// No forward plugin: other names fail rather than leave the machine.
func corefile(l layout) string {
	return fmt.Sprintf(`.:53 {
    bind %s
    errors
    health %s
    ready %s
    kubernetes %s in-addr.arpa ip6.arpa {
        kubeconfig %s amber
        pods insecure
        fallthrough in-addr.arpa ip6.arpa
    }
    cache 5
    loadbalance
}
`, NodeIP, corednsHealth, corednsReady, ClusterDomain, filepath.Join(l.pki(), "coredns.kubeconfig"))
}

// debianCNIBin is where Debian's containernetworking-plugins installs.
const debianCNIBin = "/usr/lib/cni"

// linkCNIPlugins makes the node's CNI binary directory (CNIBinDir): links
// to Debian's plugins, in a directory of the cluster's own so that a
// chained plugin (amber-cni) installed by a DaemonSet lands under the
// state directory rather than in /usr/lib/cni.
func linkCNIPlugins(l layout) error {
	ents, err := os.ReadDir(debianCNIBin)
	if err != nil {
		return fmt.Errorf("cni plugins: %w (install containernetworking-plugins: make deps)", err)
	}
	if err := os.MkdirAll(l.cniBinDir(), 0o755); err != nil {
		return fmt.Errorf("cni plugins: %w", err)
	}
	for _, e := range ents {
		link := filepath.Join(l.cniBinDir(), e.Name())
		if err := os.Symlink(filepath.Join(debianCNIBin, e.Name()), link); err != nil && !os.IsExist(err) {
			return fmt.Errorf("cni plugins: %w", err)
		}
	}
	return nil
}
