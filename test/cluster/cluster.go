package cluster

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/amber-mesh/amber/test/images"
	"github.com/amber-mesh/amber/test/istiod"
)

// Options configure Start. The zero value starts a node named
// DefaultNodeName with its state in <repo>/.cache/cluster/node.
type Options struct {
	// Dir holds the cluster's state: certificates, configuration, logs,
	// etcd's data, containerd's and the kubelet's roots. Stop removes it.
	// Zero: <repo>/.cache/cluster/node.
	Dir string
	// CacheDir holds what is built once and kept: CoreDNS and the test
	// images. Zero: <repo>/.cache/cluster.
	CacheDir string
	// RepoRoot is the amber module's root. Zero: found from the working
	// directory upwards.
	RepoRoot string
	// NodeName is the node's name. Zero: DefaultNodeName.
	NodeName string
	// Logger receives progress (builds, each component, timings). Zero:
	// progress is discarded.
	Logger *slog.Logger
	// ReadyTimeout bounds the wait for each component and for the node to
	// become Ready. Zero: 2 minutes.
	ReadyTimeout time.Duration
	// Istiod also runs istiod (built by hack/istiod-bin.sh, ≈ 3.5 min
	// the first time) in ambient mode, installed as users install it:
	// Istio's and the Gateway API's CRDs, its chart's ConfigMaps; see
	// Istiod and Cluster.Istioctl.
	Istiod bool
}

// Cluster is a running node: control plane, kubelet, containerd,
// kube-proxy and cluster DNS on this machine.
type Cluster struct {
	// Dir is the state directory.
	Dir string
	// Kubeconfig is an admin (system:masters) kubeconfig file.
	Kubeconfig string
	// Config and Client are an admin client configuration and clientset.
	Config *rest.Config
	Client kubernetes.Interface
	// NodeName is the node's name.
	NodeName string
	// BinDir holds the Kubernetes binaries (kubectl among them).
	BinDir string
	// Images are the test images imported into the node's containerd.
	Images []images.Image
	// ContainerdSocket is the node's containerd (CRI) socket.
	ContainerdSocket string
	// CNIBinDir and CNIConfDir are the node's CNI binary and
	// configuration directories (what a CNI-chaining DaemonSet mounts).
	CNIBinDir, CNIConfDir string
	// IPAMDir is host-local's data directory of the pod network: a file
	// per allocated address and last_reserved_ip.0.
	IPAMDir string
	// Istiod is istiod on this node, nil unless Options.Istiod.
	Istiod *Istiod
}

var (
	// ErrHostBusy reports a cluster from another state directory running
	// on this host: there is one node address, one kube-proxy and one
	// kubelet cgroup tree per machine.
	ErrHostBusy = errors.New("another cluster runs on this host")
	// ErrNotRunning reports a state directory without a running cluster.
	ErrNotRunning = errors.New("cluster not running")
)

// ownerFile names the state directory of the cluster that owns the host,
// so that Stop of any directory can find and clean a crashed one.
const ownerFile = "/run/amber-cluster/owner"

// components in start order; Stop goes backwards except that the
// kubelet stops first (the API server can hang on SIGTERM while a kubelet
// exec stream is open).
var components = []string{"containerd", "etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kube-proxy", "coredns", "istiod", "kubelet"}

func (o *Options) defaults() error {
	if o.RepoRoot == "" {
		root, err := RepoRoot()
		if err != nil {
			return err
		}
		o.RepoRoot = root
	}
	if o.CacheDir == "" {
		o.CacheDir = filepath.Join(o.RepoRoot, ".cache", "cluster")
	}
	if o.Dir == "" {
		o.Dir = filepath.Join(o.CacheDir, "node")
	}
	var err error
	if o.Dir, err = filepath.Abs(o.Dir); err != nil {
		return err
	}
	if o.NodeName == "" {
		o.NodeName = DefaultNodeName
	}
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	if o.ReadyTimeout == 0 {
		o.ReadyTimeout = 2 * time.Minute
	}
	return nil
}

// DefaultDir returns the state directory Start uses when Options.Dir is
// empty.
func DefaultDir() (string, error) {
	var o Options
	if err := o.defaults(); err != nil {
		return "", err
	}
	return o.Dir, nil
}

// Start brings up a node and returns once it is Ready, its not-ready taint
// is gone and the default namespace's service account exists — a pod
// created then is scheduled at once. A healthy cluster already running in
// opts.Dir is reused; anything else left there (a crashed run) is cleaned
// first. Binaries and images are built when missing, with progress on
// opts.Logger: the first run takes minutes, later ones seconds.
func Start(ctx context.Context, opts Options) (*Cluster, error) {
	if err := opts.defaults(); err != nil {
		return nil, fmt.Errorf("start cluster: %w", err)
	}
	log := opts.Logger
	l := layout{opts.Dir}
	t0 := time.Now()

	binDir, err := kubeBins(ctx, opts)
	if err != nil {
		return nil, err
	}
	corednsBin, err := buildCoreDNS(ctx, opts)
	if err != nil {
		return nil, err
	}
	imgs, err := images.Build(ctx, opts.RepoRoot, filepath.Join(opts.CacheDir, "images"))
	if err != nil {
		return nil, err
	}
	var istiodBin string
	if opts.Istiod {
		if istiodBin, err = istiodBins(ctx, opts, istiod.BinaryName); err != nil {
			return nil, err
		}
	}
	log.Info("binaries and images ready", "took", time.Since(t0).Round(time.Millisecond))

	if owner, _ := os.ReadFile(ownerFile); len(owner) > 0 && string(owner) != l.dir {
		other := layout{string(owner)}
		if daemonPid(other, "kube-apiserver") != 0 || daemonPid(other, "kubelet") != 0 {
			return nil, fmt.Errorf("start cluster: %w: state in %s (stop it with amber-cluster down -dir %s)", ErrHostBusy, other.dir, other.dir)
		}
		log.Info("cleaning up a stopped cluster", "dir", other.dir)
		if err := Stop(ctx, other.dir); err != nil {
			return nil, fmt.Errorf("start cluster: clean up %s: %w", other.dir, err)
		}
	}
	if c, err := Open(l.dir); err == nil {
		if st := c.Status(ctx); st.Healthy() {
			log.Info("cluster already running", "dir", l.dir)
			c.BinDir, c.Images = binDir, imgs
			if opts.Istiod {
				if err := c.ensureIstiod(ctx, opts, istiodBin); err != nil {
					return nil, err
				}
			}
			return c, nil
		}
	}
	if err := Stop(ctx, l.dir); err != nil {
		return nil, fmt.Errorf("start cluster: clean up: %w", err)
	}

	c, err := start(ctx, opts, l, binDir, corednsBin, imgs)
	if err == nil && opts.Istiod {
		err = c.ensureIstiod(ctx, opts, istiodBin)
	}
	if err != nil {
		return nil, errors.Join(err, logTails(l))
	}
	log.Info("node ready", "node", c.NodeName, "took", time.Since(t0).Round(time.Millisecond), "kubeconfig", c.Kubeconfig)
	return c, nil
}

func start(ctx context.Context, opts Options, l layout, binDir, corednsBin string, imgs []images.Image) (*Cluster, error) {
	log := opts.Logger
	t0 := time.Now()
	for _, d := range []string{l.dir, filepath.Dir(ownerFile)} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return nil, fmt.Errorf("start cluster: %w", err)
		}
	}
	if err := os.WriteFile(ownerFile, []byte(l.dir), 0o644); err != nil {
		return nil, fmt.Errorf("start cluster: %w", err)
	}
	if err := prepareHost(l); err != nil {
		return nil, err
	}
	p, err := newPKI(l.pki())
	if err != nil {
		return nil, err
	}
	server := "https://" + NodeIP + ":" + strconv.Itoa(APIServerPort)
	users := []struct{ name, user, group string }{
		{"admin", "amber-admin", "system:masters"},
		{"kubelet", "system:node:" + opts.NodeName, "system:nodes"},
		{"controller-manager", "system:kube-controller-manager", ""},
		{"scheduler", "system:kube-scheduler", ""},
		{"kube-proxy", "system:kube-proxy", ""},
		// CoreDNS reads Services, EndpointSlices, Pods and Namespaces;
		// a throw-away node does not earn it its own ClusterRole.
		{"coredns", "amber-coredns", "system:masters"},
	}
	kc := map[string]string{}
	for _, u := range users {
		var groups []string
		if u.group != "" {
			groups = []string{u.group}
		}
		if kc[u.name], err = p.kubeconfig(u.name, server, u.user, groups...); err != nil {
			return nil, err
		}
	}
	if err := writeConfigs(l, opts.NodeName); err != nil {
		return nil, err
	}
	c := newCluster(l)
	c.Kubeconfig, c.NodeName, c.BinDir, c.Images = kc["admin"], opts.NodeName, binDir, imgs
	if err := c.loadClient(); err != nil {
		return nil, err
	}
	bin := func(n string) string { return filepath.Join(binDir, n) }

	if err := startDaemon(l, "containerd", "/usr/bin/containerd", []string{"--config", l.configFile("containerd.toml")}, nil); err != nil {
		return nil, err
	}
	etcdURL := "http://127.0.0.1:" + strconv.Itoa(etcdClientPort)
	peerURL := "http://127.0.0.1:" + strconv.Itoa(etcdPeerPort)
	if err := startDaemon(l, "etcd", bin("etcd"), []string{
		"--name=amber", "--data-dir=" + l.path("etcd"),
		"--listen-client-urls=" + etcdURL, "--advertise-client-urls=" + etcdURL,
		"--listen-peer-urls=" + peerURL, "--initial-advertise-peer-urls=" + peerURL,
		"--initial-cluster=amber=" + peerURL,
		// Throw-away data: fsync buys nothing and costs seconds.
		"--unsafe-no-fsync",
	}, nil); err != nil {
		return nil, err
	}
	// Import the images while the control plane comes up.
	imported := make(chan error, 1)
	go func() { imported <- importImages(ctx, l, imgs, opts.ReadyTimeout) }()

	if err := waitFor(ctx, opts.ReadyTimeout, l, "etcd", func(ctx context.Context) error {
		return httpOK(ctx, etcdURL+"/health")
	}); err != nil {
		return nil, err
	}
	log.Info("etcd ready", "took", time.Since(t0).Round(time.Millisecond))
	if err := startDaemon(l, "kube-apiserver", bin("kube-apiserver"), []string{
		"--bind-address=" + NodeIP, "--secure-port=" + strconv.Itoa(APIServerPort),
		"--advertise-address=" + NodeIP,
		"--etcd-servers=" + etcdURL,
		// Else it writes self-signed certificates to /var/run/kubernetes.
		"--cert-dir=" + l.path("apiserver-certs"),
		"--tls-cert-file=" + p.ServingCert, "--tls-private-key-file=" + p.ServingKey,
		"--client-ca-file=" + p.CACert,
		"--service-account-issuer=https://kubernetes.default.svc." + ClusterDomain,
		"--service-account-key-file=" + p.ServiceAccountPub, "--service-account-signing-key-file=" + p.ServiceAccountKey,
		"--service-cluster-ip-range=" + ServiceCIDR,
		"--authorization-mode=Node,RBAC",
		"--kubelet-client-certificate=" + p.KubeletClientCert,
		"--kubelet-client-key=" + p.KubeletClientKey,
		// The node's InternalIP is NodeIP; its hostname resolves elsewhere.
		"--kubelet-preferred-address-types=InternalIP,Hostname",
		// amber's node components are privileged DaemonSets.
		"--allow-privileged=true",
		"--shutdown-send-retry-after=true",
		"--profiling=false",
	}, nil); err != nil {
		return nil, err
	}
	rc := c.Client.Discovery().RESTClient()
	if err := waitFor(ctx, opts.ReadyTimeout, l, "kube-apiserver", func(ctx context.Context) error {
		_, err := rc.Get().AbsPath("/readyz").Timeout(5 * time.Second).DoRaw(ctx)
		return err
	}); err != nil {
		return nil, err
	}
	log.Info("kube-apiserver ready", "took", time.Since(t0).Round(time.Millisecond))

	starts := []struct {
		name string
		bin  string
		args []string
	}{
		{"kube-controller-manager", bin("kube-controller-manager"), []string{
			"--kubeconfig=" + kc["controller-manager"], "--secure-port=0", "--leader-elect=false",
			"--use-service-account-credentials=true",
			"--service-account-private-key-file=" + p.ServiceAccountKey, "--root-ca-file=" + p.CACert,
			"--cluster-signing-cert-file=" + p.CACert, "--cluster-signing-key-file=" + p.CAKey,
			"--cluster-name=amber", "--controllers=*",
			// The not-ready taint goes when the node-lifecycle controller
			// next looks (default every 5 s): a node is schedulable sooner.
			"--node-monitor-period=1s",
		}},
		{"kube-scheduler", bin("kube-scheduler"), []string{
			"--kubeconfig=" + kc["scheduler"], "--secure-port=0", "--leader-elect=false",
		}},
		{"kube-proxy", bin("kube-proxy"), []string{"--config=" + l.configFile("kube-proxy.yaml")}},
		{"coredns", corednsBin, []string{"-conf", l.configFile("Corefile")}},
	}
	for _, s := range starts {
		if err := startDaemon(l, s.name, s.bin, s.args, nil); err != nil {
			return nil, err
		}
	}
	if err := createDNSService(ctx, c.Client); err != nil {
		return nil, err
	}
	if err := <-imported; err != nil {
		return nil, err
	}
	log.Info("images imported", "took", time.Since(t0).Round(time.Millisecond))
	if err := startDaemon(l, "kubelet", bin("kubelet"), []string{
		"--config=" + l.configFile("kubelet.yaml"), "--kubeconfig=" + kc["kubelet"],
		"--root-dir=" + l.kubeletRoot(), "--hostname-override=" + opts.NodeName,
		"--node-ip=" + NodeIP,
	}, nil); err != nil {
		return nil, err
	}
	if err := waitFor(ctx, opts.ReadyTimeout, l, "kubelet", func(ctx context.Context) error {
		return c.nodeSchedulable(ctx)
	}); err != nil {
		return nil, err
	}
	log.Info("node schedulable", "took", time.Since(t0).Round(time.Millisecond))
	if err := waitFor(ctx, opts.ReadyTimeout, l, "kube-controller-manager", func(ctx context.Context) error {
		_, err := c.Client.CoreV1().ServiceAccounts("default").Get(ctx, "default", metav1.GetOptions{})
		return err
	}); err != nil {
		return nil, err
	}
	if err := waitFor(ctx, opts.ReadyTimeout, l, "coredns", func(ctx context.Context) error {
		return httpOK(ctx, "http://"+corednsReady+"/ready")
	}); err != nil {
		return nil, err
	}
	return c, nil
}

// Open returns the cluster whose state is in dir, from its files; it
// does not check that the cluster runs (Status does).
func Open(dir string) (*Cluster, error) {
	l := layout{dir}
	if _, err := os.Stat(l.adminKubecfg()); err != nil {
		return nil, fmt.Errorf("open cluster %s: %w", dir, ErrNotRunning)
	}
	c := newCluster(l)
	if b, err := os.ReadFile(l.configFile("kube-proxy.yaml")); err == nil {
		for _, line := range strings.Split(string(b), "\n") {
			if v, ok := strings.CutPrefix(line, "hostnameOverride: "); ok {
				c.NodeName = v
			}
		}
	}
	if b, err := os.ReadFile(filepath.Join(l.pids(), "kubelet.pid")); err == nil {
		if f := strings.Fields(string(b)); len(f) == 2 {
			c.BinDir = filepath.Dir(f[1])
		}
	}
	return c, c.loadClient()
}

func newCluster(l layout) *Cluster {
	return &Cluster{Dir: l.dir, Kubeconfig: l.adminKubecfg(), NodeName: DefaultNodeName,
		ContainerdSocket: l.criSocket(), CNIBinDir: l.cniBinDir(), CNIConfDir: l.cniConfDir(),
		IPAMDir: filepath.Join(l.cniIPAMDir(), cniNetwork)}
}

func (c *Cluster) loadClient() error {
	cfg, err := clientcmd.BuildConfigFromFlags("", c.Kubeconfig)
	if err != nil {
		return fmt.Errorf("load kubeconfig: %w", err)
	}
	// client-go's default (5 QPS) throttles test setup loops.
	cfg.QPS, cfg.Burst = 100, 200
	c.Config = cfg
	if c.Client, err = kubernetes.NewForConfig(cfg); err != nil {
		return fmt.Errorf("create clientset: %w", err)
	}
	return nil
}

// Kubectl runs kubectl as admin and returns its standard output; the
// error carries its standard error.
func (c *Cluster) Kubectl(ctx context.Context, args ...string) ([]byte, error) {
	return runTool(ctx, filepath.Join(c.BinDir, "kubectl"), []string{"--kubeconfig=" + c.Kubeconfig, "--cache-dir=" + filepath.Join(c.Dir, "kubectl-cache")}, args)
}

// runTool runs bin with flags then args and returns its standard output;
// the error names the tool and args and carries its standard error.
func runTool(ctx context.Context, bin string, flags, args []string) ([]byte, error) {
	cmd := exec.CommandContext(ctx, bin, append(slices.Clone(flags), args...)...)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return out, fmt.Errorf("%s %s: %w: %s", filepath.Base(bin), strings.Join(args, " "), err, strings.TrimSpace(stderr.String()))
	}
	return out, nil
}

// Close stops the cluster and removes everything it created (Stop).
func (c *Cluster) Close() error {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	return Stop(ctx, c.Dir)
}

// nodeSchedulable succeeds once the node is Ready without the not-ready
// taint, which the node-lifecycle controller removes a moment later.
func (c *Cluster) nodeSchedulable(ctx context.Context) error {
	n, err := c.Client.CoreV1().Nodes().Get(ctx, c.NodeName, metav1.GetOptions{})
	if err != nil {
		return err
	}
	if !nodeReady(n) {
		return fmt.Errorf("node %s not Ready", c.NodeName)
	}
	for _, t := range n.Spec.Taints {
		if t.Key == corev1.TaintNodeNotReady {
			return fmt.Errorf("node %s still tainted %s", c.NodeName, t.Key)
		}
	}
	return nil
}

func nodeReady(n *corev1.Node) bool {
	for _, cond := range n.Status.Conditions {
		if cond.Type == corev1.NodeReady {
			return cond.Status == corev1.ConditionTrue
		}
	}
	return false
}

// createDNSService publishes CoreDNS, a host process on NodeIP:53, as the
// kube-system/kube-dns Service, so that pods reach it at DNSServiceIP
// through kube-proxy like any cluster DNS.
func createDNSService(ctx context.Context, cs kubernetes.Interface) error {
	return publishHostService(ctx, cs, "kube-system", "kube-dns", DNSServiceIP, map[string]string{"k8s-app": "kube-dns"}, []corev1.ServicePort{
		{Name: "dns", Port: 53, Protocol: corev1.ProtocolUDP},
		{Name: "dns-tcp", Port: 53, Protocol: corev1.ProtocolTCP},
	})
}

// publishHostService publishes a host process listening on NodeIP at
// the ports' numbers as a selector-less Service with a hand-made
// EndpointSlice.
func publishHostService(ctx context.Context, cs kubernetes.Interface, ns, name, clusterIP string, labels map[string]string, ports []corev1.ServicePort) error {
	for i := range ports {
		ports[i].TargetPort = intstr.FromInt32(ports[i].Port)
	}
	svc := &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: ns, Labels: labels},
		Spec:       corev1.ServiceSpec{ClusterIP: clusterIP, Ports: ports},
	}
	// Already there when the process is started again (StartIstiod): the
	// API server would refuse the create for its taken cluster IP before
	// it looks at the name.
	if _, err := cs.CoreV1().Services(ns).Get(ctx, name, metav1.GetOptions{}); apierrors.IsNotFound(err) {
		if _, err := cs.CoreV1().Services(ns).Create(ctx, svc, metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
			return fmt.Errorf("create %s/%s service: %w", ns, name, err)
		}
	} else if err != nil {
		return fmt.Errorf("get %s/%s service: %w", ns, name, err)
	}
	ready := true
	var eps []discoveryv1.EndpointPort
	for _, p := range ports {
		eps = append(eps, discoveryv1.EndpointPort{Name: &p.Name, Port: &p.Port, Protocol: &p.Protocol})
	}
	slice := &discoveryv1.EndpointSlice{
		ObjectMeta: metav1.ObjectMeta{Name: name + "-node", Namespace: ns,
			Labels: map[string]string{discoveryv1.LabelServiceName: name}},
		AddressType: discoveryv1.AddressTypeIPv4,
		Endpoints:   []discoveryv1.Endpoint{{Addresses: []string{NodeIP}, Conditions: discoveryv1.EndpointConditions{Ready: &ready}}},
		Ports:       eps,
	}
	if _, err := cs.DiscoveryV1().EndpointSlices(ns).Create(ctx, slice, metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
		return fmt.Errorf("create %s/%s endpoints: %w", ns, name, err)
	}
	return nil
}

// ImportImages imports image archives into the node's containerd, for
// pods with imagePullPolicy Never.
func (c *Cluster) ImportImages(ctx context.Context, imgs ...images.Image) error {
	return importImages(ctx, layout{c.Dir}, imgs, time.Minute)
}

// importImages waits for containerd and imports the archives into its
// k8s.io namespace, where the CRI plugin looks.
func importImages(ctx context.Context, l layout, imgs []images.Image, timeout time.Duration) error {
	if err := waitFor(ctx, timeout, l, "containerd", func(ctx context.Context) error {
		return exec.CommandContext(ctx, "ctr", "-a", l.criSocket(), "version").Run()
	}); err != nil {
		return err
	}
	for _, img := range imgs {
		out, err := exec.CommandContext(ctx, "ctr", "-a", l.criSocket(), "-n", "k8s.io", "images", "import", "--no-unpack", img.Archive).CombinedOutput()
		if err != nil {
			return fmt.Errorf("import image %s: %w: %s", img.Ref, err, strings.TrimSpace(string(out)))
		}
	}
	return nil
}

// waitFor polls check every 100ms until it succeeds, the component exits,
// ctx ends or timeout passes.
func waitFor(ctx context.Context, timeout time.Duration, l layout, name string, check func(context.Context) error) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	var last error
	for {
		if daemonPid(l, name) == 0 {
			return fmt.Errorf("%s exited; log %s:\n%s", name, filepath.Join(l.logs(), name+".log"), tail(filepath.Join(l.logs(), name+".log"), 20))
		}
		cctx, ccancel := context.WithTimeout(ctx, 5*time.Second)
		last = check(cctx)
		ccancel()
		if last == nil {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("%s not ready: %w (last: %v)", name, ctx.Err(), last)
		case <-time.After(100 * time.Millisecond):
		}
	}
}

var healthClient = &http.Client{Timeout: 2 * time.Second}

func httpOK(ctx context.Context, url string) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return err
	}
	resp, err := healthClient.Do(req)
	if err != nil {
		return err
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("GET %s: %s", url, resp.Status)
	}
	return nil
}

// logTails returns the end of every component's log, for a failed start.
func logTails(l layout) error {
	var b strings.Builder
	for _, n := range components {
		f := filepath.Join(l.logs(), n+".log")
		if _, err := os.Stat(f); err == nil {
			fmt.Fprintf(&b, "--- %s (tail)\n%s\n", f, tail(f, 8))
		}
	}
	if b.Len() == 0 {
		return nil
	}
	return errors.New(b.String())
}

func tail(file string, n int) string {
	b, err := os.ReadFile(file)
	if err != nil {
		return fmt.Sprintf("(read %s: %v)", file, err)
	}
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// RepoRoot finds the amber module's root from the working directory up.
func RepoRoot() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for {
		b, err := os.ReadFile(filepath.Join(dir, "go.mod"))
		if err == nil && bytes.HasPrefix(bytes.TrimSpace(b), []byte("module github.com/amber-mesh/amber\n")) {
			return dir, nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", errors.New("find repository root: no go.mod of github.com/amber-mesh/amber above the working directory")
		}
		dir = parent
	}
}

// kubeBins runs hack/kube-bins.sh for every Kubernetes binary; it builds
// only what is missing or stale, its progress going to the logger.
func kubeBins(ctx context.Context, opts Options) (string, error) {
	dir, err := hackScript(ctx, opts, "kube-bins.sh", "all")
	if err != nil {
		return "", fmt.Errorf("build kubernetes binaries: %w", err)
	}
	return dir, nil
}

// hackScript runs hack/<script> (a cached build that prints its output
// directory), its progress going to the logger; cancelling ctx interrupts
// it, and it stops its whole build.
func hackScript(ctx context.Context, opts Options, script string, args ...string) (string, error) {
	cmd := exec.CommandContext(ctx, "bash", append([]string{filepath.Join(opts.RepoRoot, "hack", script)}, args...)...)
	cmd.Dir = opts.RepoRoot
	var stdout bytes.Buffer
	cmd.Stdout = &stdout
	cmd.Stderr = logWriter{opts.Logger}
	cmd.Cancel = func() error { return cmd.Process.Signal(os.Interrupt) }
	if err := cmd.Run(); err != nil {
		return "", err
	}
	return strings.TrimSpace(stdout.String()), nil
}

// coreDNSStamp is what tools/coredns is built from: the SHA-256 of its
// go.mod, go.sum and main.go, in hex. hack/coredns.sh, which make test
// runs first, writes the same stamp.
func coreDNSStamp(src string) (string, error) {
	h := sha256.New()
	for _, f := range []string{"go.mod", "go.sum", "main.go"} {
		b, err := os.ReadFile(filepath.Join(src, f))
		if err != nil {
			return "", err
		}
		h.Write(b)
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}

// buildCoreDNS builds tools/coredns into CacheDir/bin unless the binary
// there was built from the same go.mod, go.sum and main.go.
func buildCoreDNS(ctx context.Context, opts Options) (string, error) {
	src := filepath.Join(opts.RepoRoot, "test", "cluster", "tools", "coredns")
	bin := filepath.Join(opts.CacheDir, "bin", "coredns")
	stamp, err := coreDNSStamp(src)
	if err != nil {
		return "", fmt.Errorf("build coredns: %w", err)
	}
	if old, err := os.ReadFile(bin + ".stamp"); err == nil && string(old) == stamp {
		if _, err := os.Stat(bin); err == nil {
			return bin, nil
		}
	}
	opts.Logger.Info("building coredns (first time: about 2 minutes)")
	t0 := time.Now()
	cmd := exec.CommandContext(ctx, "go", "build", "-trimpath", "-ldflags=-s -w", "-o", bin+".tmp", ".")
	cmd.Dir = src
	cmd.Env = append(os.Environ(), "GOWORK=off", "CGO_ENABLED=0", "GOFLAGS=-mod=readonly")
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	done := make(chan error, 1)
	if err := cmd.Start(); err != nil {
		return "", fmt.Errorf("build coredns: %w", err)
	}
	go func() { done <- cmd.Wait() }()
	tick := time.NewTicker(30 * time.Second)
	defer tick.Stop()
	for {
		select {
		case err := <-done:
			if err != nil {
				return "", fmt.Errorf("build coredns: %w: %s", err, strings.TrimSpace(out.String()))
			}
			if err := os.Rename(bin+".tmp", bin); err != nil {
				return "", fmt.Errorf("build coredns: %w", err)
			}
			opts.Logger.Info("built coredns", "took", time.Since(t0).Round(time.Second))
			return bin, os.WriteFile(bin+".stamp", []byte(stamp), 0o644)
		case <-tick.C:
			opts.Logger.Info("still building coredns", "elapsed", time.Since(t0).Round(time.Second))
		}
	}
}

// logWriter turns a child's stderr lines into log records.
type logWriter struct{ log *slog.Logger }

var logMu sync.Mutex

func (w logWriter) Write(b []byte) (int, error) {
	logMu.Lock()
	defer logMu.Unlock()
	for _, line := range strings.Split(strings.TrimRight(string(b), "\n"), "\n") {
		if line != "" {
			w.log.Info(line)
		}
	}
	return len(b), nil
}

var _ io.Writer = logWriter{}
