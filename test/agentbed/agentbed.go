// Package agentbed runs amber-agent on a testbed node against a real
// API server, as the node agent runs in a cluster: the agent process with
// the DaemonSet's RBAC, pods created the kubelet's way (sandbox, CNI
// ADD through amber-cni, status), and readers of the pinned maps and TCX
// programs. The agent's tests (agent/) and amber-bench's agent mode
// share it.
package agentbed

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/vishvananda/netlink"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/util/retry"

	"github.com/amber-mesh/amber/agent/enrol"
	"github.com/amber-mesh/amber/bpf"
	"github.com/amber-mesh/amber/bpf/hostnet"
	"github.com/amber-mesh/amber/internal/tcptest"
	"github.com/amber-mesh/amber/internal/testutil"
	"github.com/amber-mesh/amber/test/cluster"
	"github.com/amber-mesh/amber/test/kube"
	"github.com/amber-mesh/amber/test/privileged"
	"github.com/amber-mesh/amber/test/testbed"
	"github.com/amber-mesh/amber/test/tproxy"
)

const (
	agentUser = "system:serviceaccount:istio-system:ztunnel"
	NodeName  = "n1" // N1's name in the API server
	echoPort  = 8080
)

var rootSeq atomic.Int32

// Env is one node (n1) running the agent against a real API server, with
// a transparent proxy standing in for the ztunnel, and a second node (n2)
// with an echo server outside the mesh that n1's pods connect to.
type Env struct {
	t     testing.TB
	CP    *kube.ControlPlane
	Admin kubernetes.Interface
	// N1 is the node the agent runs on (node name "n1"); N2 holds Echo.
	N1, N2 *testbed.Node
	// Echo is a TCP echo server on N2, outside the mesh.
	Echo netip.AddrPort
	// Dir holds the agent's files (CNI socket, kubeconfig, logs).
	Dir string
	// Root is the agent's bpffs pin root.
	Root  string
	opts  Options
	kconf string
	// ExtraArgs are appended to the command line of agents started
	// after they are set.
	ExtraArgs []string
	// Proxy is the transparent proxy registered as the node's ztunnel.
	Proxy *tproxy.Proxy
	// Agent is the agent New started.
	Agent *Agent
}

// Options configure New.
type Options struct {
	// AgentBin and CNIBin are amber-agent and amber-cni (Build). Required.
	AgentBin, CNIBin string
	// MaxPods, when set, is the agent's -max-pods.
	MaxPods int
	// Caps, when set, runs the agent as root with only these
	// capabilities, as the DaemonSet does.
	Caps []string
}

// Build builds amber-agent and amber-cni into dir (static, as the image
// has them) and returns their paths.
func Build(dir string) (agentBin, cniBin string, err error) {
	cmd := exec.Command("go", "build", "-o", dir+"/", "github.com/amber-mesh/amber/cmd/amber-agent", "github.com/amber-mesh/amber/cmd/amber-cni")
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := cmd.CombinedOutput(); err != nil {
		return "", "", fmt.Errorf("go build: %v\n%s", err, out)
	}
	return filepath.Join(dir, "amber-agent"), filepath.Join(dir, "amber-cni"), nil
}

// New starts the API server with amber's RBAC, the two nodes, the echo
// server, the agent (ready) and the stand-in ztunnel. Everything is
// removed when tb's test ends.
func New(t testing.TB, opts Options) *Env {
	t.Helper()
	privileged.Require(t)
	if opts.AgentBin == "" || opts.CNIBin == "" {
		t.Fatal("agentbed: Options.AgentBin and CNIBin are required")
	}
	root, err := cluster.RepoRoot()
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	cp := kube.Start(t, kube.Options{})
	e := &Env{t: t, CP: cp, Admin: cp.Client, Dir: t.TempDir(), opts: opts}
	// The agent runs with the deploy manifests' RBAC and nothing more,
	// in istio-system (which Istio's base install creates).
	if _, err := cp.Client.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "istio-system"}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	if out, err := cp.Kubectl(ctx, "apply", "-f", filepath.Join(root, "deploy", "manifests", "rbac.yaml")); err != nil {
		t.Fatalf("apply rbac.yaml: %v\n%s", err, out)
	}
	_, e.kconf = cp.UserConfig(t, agentUser)

	e.N1, e.N2 = testbed.MustTwoNodes(t) // e.N1 is NodeName
	srv, err := e.N2.AddPod("echo")
	if err != nil {
		t.Fatal(err)
	}
	ln, err := srv.Listen("tcp", fmt.Sprintf("[::]:%d", echoPort))
	if err != nil {
		t.Fatal(err)
	}
	tcptest.Serve(t, ln, func(c net.Conn) { io.Copy(c, c) })
	e.Echo = netip.AddrPortFrom(srv.IPv4, echoPort)

	e.forwardAPIServer()
	e.Root = fmt.Sprintf("/sys/fs/bpf/amber-test-%d-agent-%d", os.Getpid(), rootSeq.Add(1))
	t.Cleanup(func() {
		if err := e.N1.Do(func() error {
			return errors.Join(bpf.Uninstall(bpf.Config{PinRoot: e.Root}), hostnet.Remove(hostnet.Config{}))
		}); err != nil {
			t.Errorf("uninstall: %v", err)
		}
	})
	e.Agent = e.StartAgent()
	px, err := tproxy.Start(tproxy.Options{Do: e.N1.Do})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { px.Close() })
	if err := px.Register(e.Root); err != nil {
		t.Fatal(err)
	}
	e.Proxy = px
	return e
}

func (e *Env) socket() string { return filepath.Join(e.Dir, "cni.sock") }
func (e *Env) access() string { return filepath.Join(e.Dir, "apiserver.json") }

// forwardAPIServer gives the node a loopback address for the API server
// (which listens on the test's loopback) and points the agent's
// kubeconfig at it.
func (e *Env) forwardAPIServer() {
	e.t.Helper()
	ln, err := e.N1.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		e.t.Fatal(err)
	}
	target := strings.TrimPrefix(e.CP.URL, "https://")
	tcptest.Serve(e.t, ln, func(c net.Conn) {
		up, err := net.Dial("tcp", target)
		if err != nil {
			return
		}
		defer up.Close()
		go func() { io.Copy(up, c); up.(*net.TCPConn).CloseWrite() }()
		io.Copy(c, up)
	})
	data, err := os.ReadFile(e.kconf)
	if err != nil {
		e.t.Fatal(err)
	}
	if !bytes.Contains(data, []byte(e.CP.URL)) {
		e.t.Fatalf("kubeconfig does not name %s", e.CP.URL)
	}
	fwd := filepath.Join(e.Dir, "node-kubeconfig")
	data = bytes.ReplaceAll(data, []byte(e.CP.URL), []byte("https://"+ln.Addr().String()))
	if err := os.WriteFile(fwd, data, 0o600); err != nil {
		e.t.Fatal(err)
	}
	e.kconf = fwd
}

// Agent is a running amber-agent.
type Agent struct {
	node *testbed.Node
	// Cmd is the agent's process.
	Cmd     *exec.Cmd
	metrics string
	log     string
	done    chan struct{}
}

var agentSeq atomic.Int32

// StartAgent runs amber-agent inside n1's network namespace, as the
// DaemonSet runs it in the node's (hostNetwork), and waits until it is
// ready.
func (e *Env) StartAgent() *Agent {
	e.t.Helper()
	a := e.StartAgentNoWait()
	testutil.Eventually(e.t, "the agent ready", func() bool {
		select {
		case <-a.done:
			data, _ := os.ReadFile(a.log)
			e.t.Fatalf("agent exited: %s", data)
		default:
		}
		return a.Ready()
	})
	return a
}

// StartAgentNoWait starts the agent and returns at once.
func (e *Env) StartAgentNoWait() *Agent {
	e.t.Helper()
	agentBin := e.opts.AgentBin
	a := &Agent{
		node:    e.N1,
		metrics: "127.0.0.1:15014", // in the node's namespace
		log:     filepath.Join(e.Dir, fmt.Sprintf("agent-%d.log", agentSeq.Add(1))),
		done:    make(chan struct{}),
	}
	args := []string{
		"-node-name", NodeName, "-kubeconfig", e.kconf,
		"-pin-root", e.Root, "-uplinks", e.N1.Uplink, "-cni-socket", e.socket(), "-cni-api-access", e.access(),
		"-metrics-addr", a.metrics, "-log-level", "debug", "-resync", "2s",
	}
	if len(e.ExtraArgs) == 0 {
		args = append(args, "-cni-skip-install")
	}
	args = append(args, e.ExtraArgs...)
	if e.opts.MaxPods > 0 {
		args = append(args, "-max-pods", fmt.Sprint(e.opts.MaxPods))
	}
	if len(e.opts.Caps) == 0 {
		a.Cmd = e.N1.Command(context.Background(), agentBin, args...)
	} else {
		bounding := "-all"
		for _, c := range e.opts.Caps {
			bounding += ",+" + strings.ToLower(c)
		}
		a.Cmd = e.N1.Command(context.Background(), "setpriv", append([]string{"--bounding-set=" + bounding, "--inh-caps=-all", "--", agentBin}, args...)...)
	}
	f, err := os.Create(a.log)
	if err != nil {
		e.t.Fatal(err)
	}
	a.Cmd.Stdout, a.Cmd.Stderr = f, f
	a.Cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := a.Cmd.Start(); err != nil {
		e.t.Fatal(err)
	}
	go func() { a.Cmd.Wait(); f.Close(); close(a.done) }()
	e.t.Cleanup(func() {
		a.Stop(syscall.SIGKILL)
		if e.t.Failed() {
			data, _ := os.ReadFile(a.log)
			if len(data) > 6000 {
				data = data[len(data)-6000:]
			}
			e.t.Logf("%s (tail):\n%s", filepath.Base(a.log), data)
		}
	})
	return a
}

// Ready reports whether the agent answers /readyz with 200.
func (a *Agent) Ready() bool {
	resp, err := a.Get("/readyz")
	if err != nil {
		return false
	}
	resp.Body.Close()
	return resp.StatusCode == http.StatusOK
}

// Get fetches from the agent's metrics port, in whichever namespace it
// listens.
func (a *Agent) Get(path string) (*http.Response, error) {
	c := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
		return a.node.Dial(ctx, network, addr)
	}}}
	return c.Get("http://" + a.metrics + path)
}

// Stop signals the agent and waits for it to exit.
func (a *Agent) Stop(sig syscall.Signal) {
	select {
	case <-a.done:
		return
	default:
	}
	a.Cmd.Process.Signal(sig)
	<-a.done
}

// WaitLog waits until the agent's log holds s.
func (a *Agent) WaitLog(tb testing.TB, s string) {
	tb.Helper()
	testutil.Eventually(tb, fmt.Sprintf("%q in %s", s, a.log), func() bool {
		data, _ := os.ReadFile(a.log)
		return strings.Contains(string(data), s)
	})
}

// Metric returns the value of a Prometheus sample line prefixed by name.
func (a *Agent) Metric(tb testing.TB, name string) string {
	tb.Helper()
	resp, err := a.Get("/metrics")
	if err != nil {
		tb.Fatal(err)
	}
	defer resp.Body.Close()
	data, _ := io.ReadAll(resp.Body)
	for _, line := range strings.Split(string(data), "\n") {
		if strings.HasPrefix(line, name+" ") {
			return strings.TrimPrefix(line, name+" ")
		}
	}
	return ""
}

// Pod is a pod both in the API server and in the testbed.
type Pod struct {
	NS, Name string
	UID      types.UID
	// TB is the pod's sandbox on the testbed node.
	TB *testbed.Pod
}

// Key is namespace/name.
func (p *Pod) Key() string { return p.NS + "/" + p.Name }

// Namespace creates namespace name or replaces its labels.
func (e *Env) Namespace(name string, labels map[string]string) {
	e.t.Helper()
	ctx := context.Background()
	ns, err := e.Admin.CoreV1().Namespaces().Get(ctx, name, metav1.GetOptions{})
	if err != nil {
		_, err = e.Admin.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: name, Labels: labels}}, metav1.CreateOptions{})
	} else {
		ns.Labels = labels
		_, err = e.Admin.CoreV1().Namespaces().Update(ctx, ns, metav1.UpdateOptions{})
	}
	if err != nil {
		e.t.Fatal(err)
	}
}

// CreatePod makes the API object and the sandbox (the interface plugin's
// work); the CNI ADD is left to the caller.
func (e *Env) CreatePod(ns, name string, labels map[string]string) *Pod {
	e.t.Helper()
	api, err := e.Admin.CoreV1().Pods(ns).Create(context.Background(), &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: ns, Labels: labels},
		Spec: corev1.PodSpec{
			NodeName:   NodeName,
			Containers: []corev1.Container{{Name: "app", Image: "registry.invalid/app:1"}},
		},
	}, metav1.CreateOptions{})
	if err != nil {
		e.t.Fatal(err)
	}
	tb, err := e.N1.AddPod(ns + "-" + name)
	for attempt := 0; attempt < 3 && errors.Is(err, netlink.ErrDumpInterrupted); attempt++ {
		// testbed's readiness wait does not retry an interrupted netlink
		// dump, which happens with hundreds of veths on a node.
		tb, err = e.N1.AddPod(ns + "-" + name)
	}
	if err != nil {
		e.t.Fatal(err)
	}
	return &Pod{NS: ns, Name: name, UID: api.UID, TB: tb}
}

// StartPod is the kubelet's sequence: sandbox, CNI ADD, and only when it
// succeeds the status with the pod's addresses.
func (e *Env) StartPod(ns, name string, labels map[string]string) *Pod {
	e.t.Helper()
	p := e.CreatePod(ns, name, labels)
	if out, err := e.CNI("ADD", p); err != nil {
		e.t.Fatalf("CNI ADD %s: %v\n%s", p.Key(), err, out)
	}
	e.Running(p)
	return p
}

// Running writes the status a kubelet reports, through the status
// subresource.
func (e *Env) Running(p *Pod) {
	e.t.Helper()
	e.updatePod(p, true, func(api *corev1.Pod) {
		api.Status = corev1.PodStatus{
			Phase:  corev1.PodRunning,
			HostIP: e.N1.IPv4.String(),
			PodIP:  p.TB.IPv4.String(),
			PodIPs: []corev1.PodIP{{IP: p.TB.IPv4.String()}, {IP: p.TB.IPv6.String()}},
		}
	})
}

// LabelPod replaces a pod's labels.
func (e *Env) LabelPod(p *Pod, labels map[string]string) {
	e.t.Helper()
	e.updatePod(p, false, func(api *corev1.Pod) { api.Labels = labels })
}

// updatePod applies change to p's current object and writes it back, to
// its status subresource when status is set, again after a conflict.
func (e *Env) updatePod(p *Pod, status bool, change func(*corev1.Pod)) {
	e.t.Helper()
	ctx := context.Background()
	pods := e.Admin.CoreV1().Pods(p.NS)
	err := retry.RetryOnConflict(retry.DefaultRetry, func() error {
		api, err := pods.Get(ctx, p.Name, metav1.GetOptions{})
		if err != nil {
			return err
		}
		change(api)
		if status {
			_, err = pods.UpdateStatus(ctx, api, metav1.UpdateOptions{})
		} else {
			_, err = pods.Update(ctx, api, metav1.UpdateOptions{})
		}
		return err
	})
	if err != nil {
		e.t.Fatal(err)
	}
}

// DeletePod is the kubelet's teardown: CNI DEL, sandbox gone, object
// deleted.
func (e *Env) DeletePod(p *Pod) {
	e.t.Helper()
	if out, err := e.CNI("DEL", p); err != nil {
		e.t.Fatalf("CNI DEL %s: %v\n%s", p.Key(), err, out)
	}
	if err := p.TB.Delete(); err != nil {
		e.t.Fatal(err)
	}
	zero := int64(0)
	if err := e.Admin.CoreV1().Pods(p.NS).Delete(context.Background(), p.Name, metav1.DeleteOptions{GracePeriodSeconds: &zero}); err != nil {
		e.t.Fatal(err)
	}
}

// CNI runs amber-cni the way a container runtime runs a chained plugin:
// in the node's network namespace, CNI_* in the environment, the network
// configuration with the previous plugin's result on stdin, the result
// on stdout.
func (e *Env) CNI(command string, p *Pod) (string, error) {
	cniBin := e.opts.CNIBin
	netns := "/run/netns/" + p.TB.NS
	prev := map[string]any{
		"cniVersion": "1.0.0",
		"interfaces": []map[string]any{{"name": p.TB.HostVeth}, {"name": "eth0", "sandbox": netns}},
		"ips": []map[string]any{
			{"address": p.TB.IPv4.String() + "/32", "interface": 1},
			{"address": p.TB.IPv6.String() + "/128", "interface": 1},
		},
	}
	conf, _ := json.Marshal(map[string]any{
		"cniVersion": "1.0.0", "name": "testbed", "type": "amber-cni",
		"agentSocket": e.socket(), "apiAccessFile": e.access(), "timeoutSeconds": 20, "pinRoot": e.Root,
		"prevResult": prev,
	})
	cmd := e.N1.Command(context.Background(), cniBin)
	cmd.Env = []string{
		"CNI_COMMAND=" + command, "CNI_CONTAINERID=sandbox-" + string(p.UID), "CNI_NETNS=" + netns,
		"CNI_IFNAME=eth0", "CNI_PATH=" + filepath.Dir(cniBin),
		fmt.Sprintf("CNI_ARGS=IgnoreUnknown=1;K8S_POD_NAMESPACE=%s;K8S_POD_NAME=%s;K8S_POD_INFRA_CONTAINER_ID=sandbox-%s;K8S_POD_UID=%s", p.NS, p.Name, p.UID, p.UID),
	}
	cmd.Stdin = bytes.NewReader(conf)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	err := cmd.Run()
	return out.String(), err
}

// Kernel state of a pod, read from the pinned maps and the interface.

// PinnedMap opens one of the agent's pinned maps; the caller closes it.
func (e *Env) PinnedMap(name string) *ebpf.Map {
	e.t.Helper()
	m, err := ebpf.LoadPinnedMap(filepath.Join(e.Root, name), nil)
	if err != nil {
		e.t.Fatal(err)
	}
	return m
}

// Membership reports whether all of p's addresses are in amber_pods for
// its veth and the veth is marked captured in amber_ifaces.
func Membership(pods, ifaces *ebpf.Map, p *testbed.Pod) bool {
	var flags uint32
	if err := ifaces.Lookup(uint32(p.HostIndex), &flags); err != nil || flags&1 == 0 {
		return false
	}
	for _, a := range []netip.Addr{p.IPv4, p.IPv6} {
		var v [8]byte
		k := a.As16()
		if err := pods.Lookup(k, &v); err != nil || binary.NativeEndian.Uint32(v[0:4]) != uint32(p.HostIndex) {
			return false
		}
	}
	return true
}

// AnyMembership reports whether any of p's addresses or its veth is in
// the maps.
func AnyMembership(pods, ifaces *ebpf.Map, p *testbed.Pod) bool {
	var flags uint32
	if ifaces.Lookup(uint32(p.HostIndex), &flags) == nil {
		return true
	}
	for _, a := range []netip.Addr{p.IPv4, p.IPv6} {
		var v [8]byte
		if pods.Lookup(a.As16(), &v) == nil {
			return true
		}
	}
	return false
}

// Captured reports Membership of p in the pinned maps.
func (e *Env) Captured(p *Pod) bool {
	pods, ifaces := e.PinnedMap("amber_pods"), e.PinnedMap("amber_ifaces")
	defer pods.Close()
	defer ifaces.Close()
	return Membership(pods, ifaces, p.TB)
}

// InMaps reports AnyMembership of p in the pinned maps.
func (e *Env) InMaps(p *Pod) bool {
	pods, ifaces := e.PinnedMap("amber_pods"), e.PinnedMap("amber_ifaces")
	defer pods.Close()
	defer ifaces.Close()
	return AnyMembership(pods, ifaces, p.TB)
}

// HasProgram reports whether the pod's veth runs a TCX ingress program.
func (e *Env) HasProgram(p *testbed.Pod) bool { return e.Programs([]*testbed.Pod{p})[0] }

// Programs is HasProgram for several pods, in one visit to the node.
func (e *Env) Programs(pods []*testbed.Pod) []bool {
	out := make([]bool, len(pods))
	e.N1.Do(func() error {
		for i, p := range pods {
			res, err := link.QueryPrograms(link.QueryOptions{Target: p.HostIndex, Attach: ebpf.AttachTCXIngress})
			out[i] = err == nil && len(res.Programs) > 0
		}
		return nil
	})
	return out
}

// Ambient is the namespace label that enrols pods.
var Ambient = map[string]string{enrol.DataplaneModeLabel: enrol.DataplaneModeAmbient}
