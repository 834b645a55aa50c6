// Package istiodbed runs amber on testbed nodes against a real istiod, as
// a cluster with amber installed would: a kube-apiserver holding the
// objects a kubelet, the EndpointSlice controller, amber's node agent,
// `istioctl waypoint apply` and istiod's deployment controller leave
// behind for testbed pods; istiod (test/istiod) watching it;
// amber-ztunnel in istiod mode on every node; waypoints as amber-waypoint
// processes in uncaptured pods of their own, given what istiod's waypoint
// template gives their container (meshbed.StartWaypoint). Tests
// (test/e2e) and benchmarks (amber-bench waypoint) share it.
//
// Every process reaches istiod through a meshbed.Forwarder in its own
// namespace; StopIstiod takes istiod away from all of them. Everything is
// removed when the test ends.
package istiodbed

import (
	"context"
	"fmt"
	"io"
	"maps"
	"net/netip"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/amber-mesh/amber/test/istiod"
	"github.com/amber-mesh/amber/test/kube"
	"github.com/amber-mesh/amber/test/meshbed"
	"github.com/amber-mesh/amber/test/testbed"
)

// Namespace is the ambient namespace the mesh's pods and services live in.
const Namespace = "default"

// Kubernetes names as Istio's ambient install and amber's node agent use
// them.
const (
	dataplaneModeLabel = "istio.io/dataplane-mode"
	redirectionAnnot   = "ambient.istio.io/redirection"
	istiodAddress      = "127.0.0.1:15012" // istiod's port, inside each node
)

// Options configure Start.
type Options struct {
	// Nodes is the number of nodes, n1, n2, ... Zero means 1.
	Nodes int
	// ZtunnelBin is amber-ztunnel (meshbed.BuildZtunnel). Required.
	ZtunnelBin string
	// WaypointBin is amber-waypoint (meshbed.BuildWaypoint), for
	// AddWaypoint.
	WaypointBin string
	// Log returns where a process's output goes, by name ("ztunnel-n1",
	// "waypoint-<pod>"). Nil discards it.
	Log func(name string) io.Writer
}

// Mesh is a running mesh.
type Mesh struct {
	CP     *kube.ControlPlane
	Istiod *istiod.Istiod
	Bed    *testbed.Testbed
	Nodes  []*Node

	opts     Options
	dir      string
	rootFile string

	mu         sync.Mutex // guards the fields below
	pods       []*corev1.Pod
	forwarders []*meshbed.Forwarder
}

// Node is a testbed node with the datapath and its ztunnel.
type Node struct {
	*meshbed.Node
	Ztunnel *meshbed.Ztunnel
}

// Start builds the nodes with the datapath, the API server, istiod (with
// the Gateway API), the ztunnel Pod of each node with its pod-bound token,
// and starts the ztunnels; it returns once they are ready. The namespace
// is labelled ambient.
func Start(tb testing.TB, opts Options) *Mesh {
	tb.Helper()
	bed := testbed.New(tb) // the root gate first: no control plane for a skip
	if opts.Nodes == 0 {
		opts.Nodes = 1
	}
	m := &Mesh{Bed: bed, opts: opts, dir: tb.TempDir()}
	binDir := istiod.Binaries(tb)
	m.CP = kube.Start(tb, kube.Options{})
	for i := range opts.Nodes {
		n, err := bed.AddNode(fmt.Sprintf("n%d", i+1))
		if err != nil {
			tb.Fatal(err)
		}
		nd := &Node{Node: meshbed.MustLoadDatapath(tb, n, "amber-istiodbed")}
		m.forwarders = append(m.forwarders, meshbed.MustForward(tb, n, istiodAddress, ""))
		m.Nodes = append(m.Nodes, nd)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	c := m.CP.Client.CoreV1()
	for _, nd := range m.Nodes {
		if _, err := c.Nodes().Create(ctx, &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: nd.Name}}, metav1.CreateOptions{}); err != nil {
			tb.Fatalf("create node %s: %v", nd.Name, err)
		}
	}
	m.LabelNamespace(tb, map[string]string{dataplaneModeLabel: "ambient"})

	m.Istiod = istiod.Start(tb, m.CP, istiod.Options{BinDir: binDir, GatewayAPI: true})
	m.rootFile = filepath.Join(m.dir, "root-cert.pem")
	if err := os.WriteFile(m.rootFile, m.Istiod.RootPEM, 0o644); err != nil {
		tb.Fatal(err)
	}
	for _, f := range m.forwarders {
		f.SetTarget(m.Istiod.Address)
	}
	for _, nd := range m.Nodes {
		m.startZtunnel(tb, ctx, nd)
	}
	return m
}

// startZtunnel creates nd's ztunnel Pod and its token and starts the
// ztunnel, stopped when the test ends.
func (m *Mesh) startZtunnel(tb testing.TB, ctx context.Context, nd *Node) {
	tb.Helper()
	name := "ztunnel-" + nd.Name
	zp, err := kube.RunningPod(ctx, m.CP.Client, &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: istiod.Namespace},
		Spec: corev1.PodSpec{
			NodeName: nd.Name, ServiceAccountName: istiod.ZtunnelServiceAccount, HostNetwork: true,
			Containers: []corev1.Container{{Name: "istio-proxy", Image: "amber"}},
		},
	}, []netip.Addr{nd.IPv4, nd.IPv6}, nd.IPv4, nd.IPv6)
	if err != nil {
		tb.Fatal(err)
	}
	tok, err := m.Istiod.Token(ctx, zp)
	if err != nil {
		tb.Fatal(err)
	}
	tokenFile := filepath.Join(m.dir, "token-"+nd.Name)
	if err := os.WriteFile(tokenFile, []byte(tok), 0o600); err != nil {
		tb.Fatal(err)
	}
	z, err := meshbed.StartZtunnelIstiod(nd.Node, m.opts.ZtunnelBin, meshbed.IstiodConfig{
		Address:      istiodAddress,
		ServerName:   istiod.ServerName,
		RootCertFile: m.rootFile,
		TokenFile:    tokenFile,
		PodName:      name,
		PodNamespace: istiod.Namespace,
	}, m.log(name))
	if err != nil {
		tb.Fatal(err)
	}
	nd.Ztunnel = z
	tb.Cleanup(func() {
		if err := z.Stop(); err != nil {
			tb.Errorf("ztunnel on %s: %v", nd.Name, err)
		}
	})
}

func (m *Mesh) log(name string) io.Writer {
	if m.opts.Log == nil {
		return io.Discard
	}
	return m.opts.Log(name)
}

// LabelNamespace adds labels to the mesh's namespace (such as
// istio.io/use-waypoint).
func (m *Mesh) LabelNamespace(tb testing.TB, labels map[string]string) {
	tb.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	c := m.CP.Client.CoreV1()
	ns, err := c.Namespaces().Get(ctx, Namespace, metav1.GetOptions{})
	if err != nil {
		tb.Fatal(err)
	}
	if ns.Labels == nil {
		ns.Labels = map[string]string{}
	}
	maps.Copy(ns.Labels, labels)
	if _, err := c.Namespaces().Update(ctx, ns, metav1.UpdateOptions{}); err != nil {
		tb.Fatalf("label namespace %s: %v", Namespace, err)
	}
}

// Pod describes a pod AddPod creates.
type Pod struct {
	Name string
	// ServiceAccount is created if needed. Zero means Name.
	ServiceAccount string
	// Labels of the Pod object. Zero means app=Name.
	Labels map[string]string
	// Enrolled pods are captured by the datapath and annotated
	// ambient.istio.io/redirection=enabled, as amber's node agent leaves
	// them; others are outside the mesh's capture.
	Enrolled bool
	// Namespace of the Pod object. Zero means Namespace.
	Namespace string
}

// AddPod adds a testbed pod on nd (the datapath's pod program attached)
// and its running Pod object.
func (m *Mesh) AddPod(tb testing.TB, nd *Node, p Pod) *testbed.Pod {
	tb.Helper()
	tp, _ := m.addPod(tb, nd, p, nil, nil)
	return tp
}

func (m *Mesh) addPod(tb testing.TB, nd *Node, p Pod, annotations map[string]string, containers []corev1.Container) (*testbed.Pod, *corev1.Pod) {
	tb.Helper()
	if p.ServiceAccount == "" {
		p.ServiceAccount = p.Name
	}
	if p.Namespace == "" {
		p.Namespace = Namespace
	}
	if p.Labels == nil {
		p.Labels = map[string]string{"app": p.Name}
	}
	if containers == nil {
		containers = []corev1.Container{{Name: p.Name, Image: p.Name}}
	}
	tp, err := nd.AddPod(p.Name)
	if err != nil {
		tb.Fatal(err)
	}
	if err := nd.Attach(tp); err != nil {
		tb.Fatal(err)
	}
	if p.Enrolled {
		nd.MustCapture(tb, tp)
		annotations = map[string]string{redirectionAnnot: "enabled"}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	_, err = m.CP.Client.CoreV1().ServiceAccounts(p.Namespace).Create(ctx, &corev1.ServiceAccount{
		ObjectMeta: metav1.ObjectMeta{Name: p.ServiceAccount},
	}, metav1.CreateOptions{})
	if err != nil && !apierrors.IsAlreadyExists(err) {
		tb.Fatalf("create service account %s: %v", p.ServiceAccount, err)
	}
	obj, err := kube.RunningPod(ctx, m.CP.Client, &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: p.Name, Namespace: p.Namespace, Labels: p.Labels, Annotations: annotations},
		Spec:       corev1.PodSpec{NodeName: nd.Name, ServiceAccountName: p.ServiceAccount, Containers: containers},
	}, []netip.Addr{nd.IPv4, nd.IPv6}, tp.IPv4, tp.IPv6)
	if err != nil {
		tb.Fatal(err)
	}
	m.mu.Lock()
	m.pods = append(m.pods, obj)
	m.mu.Unlock()
	return tp, obj
}

// AddService creates svc in its namespace (zero: the mesh's) with the
// EndpointSlice of the pods (added so far) its selector selects there, and
// returns it as stored, with its cluster IP.
func (m *Mesh) AddService(tb testing.TB, svc *corev1.Service) *corev1.Service {
	tb.Helper()
	if svc.Namespace == "" {
		svc.Namespace = Namespace
	}
	var backends []*corev1.Pod
	m.mu.Lock()
	for _, p := range m.pods {
		if p.Namespace == svc.Namespace && selects(svc.Spec.Selector, p.Labels) {
			backends = append(backends, p)
		}
	}
	m.mu.Unlock()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	s, err := kube.CreateService(ctx, m.CP.Client, svc, backends)
	if err != nil {
		tb.Fatal(err)
	}
	return s
}

func selects(selector, labels map[string]string) bool {
	if len(selector) == 0 {
		return false
	}
	for k, v := range selector {
		if labels[k] != v {
			return false
		}
	}
	return true
}

// Apply applies a manifest with kubectl.
func (m *Mesh) Apply(tb testing.TB, manifest string) {
	tb.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := m.CP.Apply(ctx, manifest); err != nil {
		tb.Fatal(err)
	}
}

// CreateWaypoint does what `istioctl waypoint apply --name name` and
// istiod's deployment controller do, and the kubelet for one pod of the
// waypoint on nd, outside the capture: the Gateway, the service account,
// the pod (the template's labels and annotations), its Service and
// EndpointSlice. It waits until istiod has given the Gateway an address
// (only then does istiod publish the waypoint to the ztunnels) and
// returns the pod as the waypoint's container gets it, with a token bound
// to it.
func (m *Mesh) CreateWaypoint(tb testing.TB, nd *Node, name string) meshbed.WaypointPod {
	tb.Helper()
	m.Apply(tb, istiod.GatewayYAML(Namespace, name))
	podName := name + "-5d8f7c9b4-k2x9q"
	tp, obj := m.addPod(tb, nd, Pod{Name: podName, ServiceAccount: name, Labels: istiod.WaypointLabels(name)},
		istiod.WaypointAnnotations(), []corev1.Container{istiod.WaypointContainerSpec("amber-waypoint")})
	m.AddService(tb, istiod.WaypointService(Namespace, name))
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if _, err := istiod.WaitGatewayAddress(ctx, m.CP, Namespace, name); err != nil {
		tb.Fatal(err)
	}
	tok, err := m.Istiod.TokenFor(ctx, Namespace, name, obj)
	if err != nil {
		tb.Fatal(err)
	}
	return meshbed.WaypointPod{
		Pod: tp, Name: podName, Namespace: Namespace, ServiceAccount: name, NodeName: nd.Name, Gateway: name,
		Labels: obj.Labels, Annotations: obj.Annotations,
		Token: []byte(tok), RootPEM: m.Istiod.RootPEM, Istiod: m.Istiod.Address,
	}
}

// StartWaypoint runs amber-waypoint (Options.WaypointBin) for wp; it is
// stopped when the test ends, unless killed before.
func (m *Mesh) StartWaypoint(tb testing.TB, wp meshbed.WaypointPod) *meshbed.Waypoint {
	tb.Helper()
	if m.opts.WaypointBin == "" {
		tb.Fatal("istiodbed: no Options.WaypointBin")
	}
	w, err := meshbed.StartWaypoint(m.opts.WaypointBin, wp, m.log("waypoint-"+wp.Name))
	if err != nil {
		tb.Fatal(err)
	}
	m.mu.Lock()
	m.forwarders = append(m.forwarders, w.Forwarder)
	m.mu.Unlock()
	tb.Cleanup(func() {
		if done, _ := w.Exited(); !done {
			if err := w.Stop(); err != nil {
				tb.Errorf("waypoint %s: %v", wp.Name, err)
			}
		}
		if err := w.Close(); err != nil {
			tb.Errorf("waypoint %s: %v", wp.Name, err)
		}
	})
	return w
}

// CreateIngress does what Istio's legacy gateway chart
// (manifests/charts/gateways/istio-ingress) and the kubelet do for one
// pod of the walkthrough's istio-ingressgateway on nd, in istio-system,
// outside the capture (the chart's dataplane-mode none): its service
// account, the pod with the chart's labels, the Service (80 → 8080) and
// its EndpointSlice. It returns the pod as the gateway's container gets
// it, with a token bound to it, for StartWaypoint.
func (m *Mesh) CreateIngress(tb testing.TB, nd *Node) (meshbed.WaypointPod, *corev1.Service) {
	tb.Helper()
	podName := istiod.IngressName + "-6f8d9c7b5-q4w7z"
	tp, obj := m.addPod(tb, nd, Pod{Name: podName, ServiceAccount: istiod.IngressServiceAccount, Labels: istiod.IngressLabels(), Namespace: istiod.Namespace},
		nil, []corev1.Container{{Name: "istio-proxy", Image: "amber-waypoint"}})
	svc := m.AddService(tb, istiod.IngressService())
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	tok, err := m.Istiod.TokenFor(ctx, istiod.Namespace, istiod.IngressServiceAccount, obj)
	if err != nil {
		tb.Fatal(err)
	}
	return meshbed.WaypointPod{
		Pod: tp, Name: podName, Namespace: istiod.Namespace, ServiceAccount: istiod.IngressServiceAccount, NodeName: nd.Name,
		Gateway: istiod.IngressName, Labels: obj.Labels, Annotations: obj.Annotations,
		Token: []byte(tok), RootPEM: m.Istiod.RootPEM, Istiod: m.Istiod.Address, Router: true,
	}, svc
}

// CreateGatewayAPIPod does what istiod's deployment controller and the
// kubelet do for one pod of Gateway gw of class istio on nd (test/istiod
// runs istiod without the kube-gateway template, so nothing deploys it):
// the service account <gw>-istio, the pod with the template's labels
// outside the capture, and the Service <gw>-istio with an HTTP port and
// the HTTPS ones. The
// Gateway itself is the test's to apply. The container runs as the
// kube-gateway template's (WaypointPod.KubeGateway).
func (m *Mesh) CreateGatewayAPIPod(tb testing.TB, nd *Node, gw string, port int32, https ...int32) (meshbed.WaypointPod, *corev1.Service) {
	tb.Helper()
	name := istiod.GatewayAPIName(gw)
	podName := name + "-7b9c8d6f5-r2t4v"
	tp, obj := m.addPod(tb, nd, Pod{Name: podName, ServiceAccount: name, Labels: istiod.GatewayAPILabels(gw)},
		nil, []corev1.Container{{Name: "istio-proxy", Image: "amber-waypoint"}})
	svc := m.AddService(tb, istiod.GatewayAPIService(Namespace, gw, port, https...))
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	tok, err := m.Istiod.TokenFor(ctx, Namespace, name, obj)
	if err != nil {
		tb.Fatal(err)
	}
	return meshbed.WaypointPod{
		Pod: tp, Name: podName, Namespace: Namespace, ServiceAccount: name, NodeName: nd.Name,
		Gateway: name, Labels: obj.Labels, Annotations: obj.Annotations,
		Token: []byte(tok), RootPEM: m.Istiod.RootPEM, Istiod: m.Istiod.Address, Router: true, KubeGateway: true,
	}, svc
}

// AddWaypoint is CreateWaypoint and StartWaypoint.
func (m *Mesh) AddWaypoint(tb testing.TB, nd *Node, name string) *meshbed.Waypoint {
	tb.Helper()
	return m.StartWaypoint(tb, m.CreateWaypoint(tb, nd, name))
}

// StopIstiod stops istiod and points every forwarder nowhere (a Service
// without endpoints), so nothing reaches a process that might take its
// port: the ztunnels and waypoints keep what they have.
func (m *Mesh) StopIstiod() error {
	m.mu.Lock()
	for _, f := range m.forwarders {
		f.SetTarget("")
	}
	m.mu.Unlock()
	return m.Istiod.Stop()
}
