package agent_test

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
	"sync"
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

	"github.com/amber-mesh/amber/agent/capture"
	"github.com/amber-mesh/amber/agent/enrol"
	"github.com/amber-mesh/amber/bpf"
	"github.com/amber-mesh/amber/bpf/hostnet"
	"github.com/amber-mesh/amber/internal/tcptest"
	"github.com/amber-mesh/amber/internal/testutil"
	"github.com/amber-mesh/amber/test/kube"
	"github.com/amber-mesh/amber/test/privileged"
	"github.com/amber-mesh/amber/test/testbed"
	"github.com/amber-mesh/amber/test/tproxy"
)

// The real binaries, built once per test binary: the tests run the agent
// as a process (so it can be SIGKILLed) and exec the plugin as a runtime
// does.
var bins struct {
	once       sync.Once
	dir        string
	err        error
	agent, cni string
}

func binaries(tb testing.TB) (agentBin, cniBin string) {
	tb.Helper()
	bins.once.Do(func() {
		bins.dir, bins.err = os.MkdirTemp("", "amber-agent-test-bin-")
		if bins.err != nil {
			return
		}
		bins.agent = filepath.Join(bins.dir, "amber-agent")
		bins.cni = filepath.Join(bins.dir, "amber-cni")
		cmd := exec.Command("go", "build", "-o", bins.dir+"/", "github.com/amber-mesh/amber/cmd/amber-agent", "github.com/amber-mesh/amber/cmd/amber-cni")
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
		if out, err := cmd.CombinedOutput(); err != nil {
			bins.err = fmt.Errorf("go build: %v\n%s", err, out)
		}
	})
	if bins.err != nil {
		tb.Fatal(bins.err)
	}
	return bins.agent, bins.cni
}

func TestMain(m *testing.M) {
	code := m.Run()
	if bins.dir != "" {
		os.RemoveAll(bins.dir)
	}
	os.Exit(code)
}

const (
	agentUser = "system:serviceaccount:istio-system:ztunnel"
	nodeName  = "n1"
	echoPort  = 8080
)

var rootSeq atomic.Int32

// env is one node (n1) running the agent against a real API server, with
// a transparent proxy standing in for the ztunnel, and a second node (n2)
// with an echo server outside the mesh that n1's pods connect to.
type env struct {
	t       testing.TB
	cp      *kube.ControlPlane
	admin   kubernetes.Interface
	n1, n2  *testbed.Node
	echo    netip.AddrPort
	dir     string
	root    string
	maxPods int
	caps    []string
	kconf   string
	// extraArgs are appended to the agent's command line.
	extraArgs []string
	px        *tproxy.Proxy
	agent     *agentProc
}

type envOptions struct {
	maxPods int
	// caps, when set, runs the agent as root with only these
	// capabilities, as the DaemonSet does.
	caps []string
}

func newEnv(t *testing.T, opts envOptions) *env { return newEnvTB(t, opts) }

func newEnvTB(t testing.TB, opts envOptions) *env {
	t.Helper()
	privileged.Require(t)
	binaries(t)
	ctx := context.Background()
	cp := kube.Start(t, kube.Options{})
	e := &env{t: t, cp: cp, admin: cp.Client, dir: t.TempDir(), maxPods: opts.maxPods, caps: opts.caps}
	// The agent runs with the deploy manifests' RBAC and nothing more,
	// in istio-system (which Istio's base install creates).
	if _, err := cp.Client.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "istio-system"}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	if out, err := cp.Kubectl(ctx, "apply", "-f", filepath.Join("..", "deploy", "manifests", "rbac.yaml")); err != nil {
		t.Fatalf("apply rbac.yaml: %v\n%s", err, out)
	}
	_, e.kconf = cp.UserConfig(t, agentUser)

	e.n1, e.n2 = testbed.MustTwoNodes(t) // e.n1 is nodeName
	srv, err := e.n2.AddPod("echo")
	if err != nil {
		t.Fatal(err)
	}
	mustEcho(t, srv, echoPort)
	e.echo = netip.AddrPortFrom(srv.IPv4, echoPort)

	e.forwardAPIServer()
	e.root = fmt.Sprintf("/sys/fs/bpf/amber-test-%d-agent-%d", os.Getpid(), rootSeq.Add(1))
	t.Cleanup(func() {
		if err := e.n1.Do(func() error {
			return errors.Join(bpf.Uninstall(bpf.Config{PinRoot: e.root}), hostnet.Remove(hostnet.Config{}))
		}); err != nil {
			t.Errorf("uninstall: %v", err)
		}
	})
	e.agent = e.startAgent()
	px, err := tproxy.Start(tproxy.Options{Do: e.n1.Do})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { px.Close() })
	if err := px.Register(e.root); err != nil {
		t.Fatal(err)
	}
	e.px = px
	return e
}

func (e *env) socket() string { return filepath.Join(e.dir, "cni.sock") }
func (e *env) access() string { return filepath.Join(e.dir, "apiserver.json") }

// forwardAPIServer gives the node a loopback address for the API server
// (which listens on the test's loopback) and points the agent's
// kubeconfig at it.
func (e *env) forwardAPIServer() {
	e.t.Helper()
	ln, err := e.n1.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		e.t.Fatal(err)
	}
	target := strings.TrimPrefix(e.cp.URL, "https://")
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
	if !bytes.Contains(data, []byte(e.cp.URL)) {
		e.t.Fatalf("kubeconfig does not name %s", e.cp.URL)
	}
	fwd := filepath.Join(e.dir, "node-kubeconfig")
	data = bytes.ReplaceAll(data, []byte(e.cp.URL), []byte("https://"+ln.Addr().String()))
	if err := os.WriteFile(fwd, data, 0o600); err != nil {
		e.t.Fatal(err)
	}
	e.kconf = fwd
}

// agentProc is a running amber-agent.
type agentProc struct {
	node    *testbed.Node
	cmd     *exec.Cmd
	metrics string
	log     string
	done    chan struct{}
}

var agentSeq atomic.Int32

// startAgent runs amber-agent inside n1's network namespace, as the
// DaemonSet runs it in the node's (hostNetwork), and waits until it is
// ready.
func (e *env) startAgent() *agentProc {
	e.t.Helper()
	a := e.startAgentNoWait()
	testutil.Eventually(e.t, "the agent ready", func() bool {
		select {
		case <-a.done:
			data, _ := os.ReadFile(a.log)
			e.t.Fatalf("agent exited: %s", data)
		default:
		}
		return a.ready()
	})
	return a
}

// startAgentNoWait starts the agent and returns at once.
func (e *env) startAgentNoWait() *agentProc {
	e.t.Helper()
	agentBin, _ := binaries(e.t)
	a := &agentProc{
		node:    e.n1,
		metrics: "127.0.0.1:15014", // in the node's namespace
		log:     filepath.Join(e.dir, fmt.Sprintf("agent-%d.log", agentSeq.Add(1))),
		done:    make(chan struct{}),
	}
	args := []string{
		"-node-name", nodeName, "-kubeconfig", e.kconf,
		"-pin-root", e.root, "-uplinks", e.n1.Uplink, "-cni-socket", e.socket(), "-cni-api-access", e.access(),
		"-metrics-addr", a.metrics, "-log-level", "debug", "-resync", "2s",
	}
	if len(e.extraArgs) == 0 {
		args = append(args, "-cni-skip-install")
	}
	args = append(args, e.extraArgs...)
	if e.maxPods > 0 {
		args = append(args, "-max-pods", fmt.Sprint(e.maxPods))
	}
	if len(e.caps) == 0 {
		a.cmd = e.n1.Command(context.Background(), agentBin, args...)
	} else {
		bounding := "-all"
		for _, c := range e.caps {
			bounding += ",+" + strings.ToLower(c)
		}
		a.cmd = e.n1.Command(context.Background(), "setpriv", append([]string{"--bounding-set=" + bounding, "--inh-caps=-all", "--", agentBin}, args...)...)
	}
	f, err := os.Create(a.log)
	if err != nil {
		e.t.Fatal(err)
	}
	a.cmd.Stdout, a.cmd.Stderr = f, f
	a.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := a.cmd.Start(); err != nil {
		e.t.Fatal(err)
	}
	go func() { a.cmd.Wait(); f.Close(); close(a.done) }()
	e.t.Cleanup(func() {
		a.stop(syscall.SIGKILL)
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

func (a *agentProc) ready() bool {
	resp, err := a.get("/readyz")
	if err != nil {
		return false
	}
	resp.Body.Close()
	return resp.StatusCode == http.StatusOK
}

// get fetches from the agent's metrics port, in whichever namespace it
// listens.
func (a *agentProc) get(path string) (*http.Response, error) {
	c := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
		return a.node.Dial(ctx, network, addr)
	}}}
	return c.Get("http://" + a.metrics + path)
}

func (a *agentProc) stop(sig syscall.Signal) {
	select {
	case <-a.done:
		return
	default:
	}
	a.cmd.Process.Signal(sig)
	<-a.done
}

// metric returns the value of a Prometheus sample line prefixed by name.
func (a *agentProc) metric(tb testing.TB, name string) string {
	tb.Helper()
	resp, err := a.get("/metrics")
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

// pod is a pod both in the API server and in the testbed.
type pod struct {
	ns, name string
	uid      types.UID
	tb       *testbed.Pod
}

func (p *pod) key() string { return p.ns + "/" + p.name }

func (e *env) namespace(name string, labels map[string]string) {
	e.t.Helper()
	ctx := context.Background()
	ns, err := e.admin.CoreV1().Namespaces().Get(ctx, name, metav1.GetOptions{})
	if err != nil {
		_, err = e.admin.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: name, Labels: labels}}, metav1.CreateOptions{})
	} else {
		ns.Labels = labels
		_, err = e.admin.CoreV1().Namespaces().Update(ctx, ns, metav1.UpdateOptions{})
	}
	if err != nil {
		e.t.Fatal(err)
	}
}

// createPod makes the API object and the sandbox (the interface plugin's
// work); the CNI ADD is left to the caller.
func (e *env) createPod(ns, name string, labels map[string]string) *pod {
	e.t.Helper()
	api, err := e.admin.CoreV1().Pods(ns).Create(context.Background(), &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: ns, Labels: labels},
		Spec: corev1.PodSpec{
			NodeName:   nodeName,
			Containers: []corev1.Container{{Name: "app", Image: "registry.invalid/app:1"}},
		},
	}, metav1.CreateOptions{})
	if err != nil {
		e.t.Fatal(err)
	}
	tb, err := e.n1.AddPod(ns + "-" + name)
	for attempt := 0; attempt < 3 && errors.Is(err, netlink.ErrDumpInterrupted); attempt++ {
		// testbed's readiness wait does not retry an interrupted netlink
		// dump, which happens with hundreds of veths on a node.
		tb, err = e.n1.AddPod(ns + "-" + name)
	}
	if err != nil {
		e.t.Fatal(err)
	}
	return &pod{ns: ns, name: name, uid: api.UID, tb: tb}
}

// startPod is the kubelet's sequence: sandbox, CNI ADD, and only when it
// succeeds the status with the pod's addresses.
func (e *env) startPod(ns, name string, labels map[string]string) *pod {
	e.t.Helper()
	p := e.createPod(ns, name, labels)
	if out, err := e.cni("ADD", p); err != nil {
		e.t.Fatalf("CNI ADD %s: %v\n%s", p.key(), err, out)
	}
	e.running(p)
	return p
}

// running writes the status a kubelet reports, through the status
// subresource.
func (e *env) running(p *pod) {
	e.t.Helper()
	ctx := context.Background()
	err := retry.RetryOnConflict(retry.DefaultRetry, func() error {
		api, err := e.admin.CoreV1().Pods(p.ns).Get(ctx, p.name, metav1.GetOptions{})
		if err != nil {
			return err
		}
		api.Status = corev1.PodStatus{
			Phase:  corev1.PodRunning,
			HostIP: e.n1.IPv4.String(),
			PodIP:  p.tb.IPv4.String(),
			PodIPs: []corev1.PodIP{{IP: p.tb.IPv4.String()}, {IP: p.tb.IPv6.String()}},
		}
		_, err = e.admin.CoreV1().Pods(p.ns).UpdateStatus(ctx, api, metav1.UpdateOptions{})
		return err
	})
	if err != nil {
		e.t.Fatal(err)
	}
}

// labelPod replaces a pod's labels.
func (e *env) labelPod(p *pod, labels map[string]string) {
	e.t.Helper()
	ctx := context.Background()
	err := retry.RetryOnConflict(retry.DefaultRetry, func() error {
		api, err := e.admin.CoreV1().Pods(p.ns).Get(ctx, p.name, metav1.GetOptions{})
		if err != nil {
			return err
		}
		api.Labels = labels
		_, err = e.admin.CoreV1().Pods(p.ns).Update(ctx, api, metav1.UpdateOptions{})
		return err
	})
	if err != nil {
		e.t.Fatal(err)
	}
}

// deletePod is the kubelet's teardown: CNI DEL, sandbox gone, object
// deleted.
func (e *env) deletePod(p *pod) {
	e.t.Helper()
	if out, err := e.cni("DEL", p); err != nil {
		e.t.Fatalf("CNI DEL %s: %v\n%s", p.key(), err, out)
	}
	if err := p.tb.Delete(); err != nil {
		e.t.Fatal(err)
	}
	zero := int64(0)
	if err := e.admin.CoreV1().Pods(p.ns).Delete(context.Background(), p.name, metav1.DeleteOptions{GracePeriodSeconds: &zero}); err != nil {
		e.t.Fatal(err)
	}
}

// cni runs amber-cni the way a container runtime runs a chained plugin:
// in the node's network namespace, CNI_* in the environment, the network
// configuration with the previous plugin's result on stdin, the result
// on stdout.
func (e *env) cni(command string, p *pod) (string, error) {
	_, cniBin := binaries(e.t)
	netns := "/run/netns/" + p.tb.NS
	prev := map[string]any{
		"cniVersion": "1.0.0",
		"interfaces": []map[string]any{{"name": p.tb.HostVeth}, {"name": "eth0", "sandbox": netns}},
		"ips": []map[string]any{
			{"address": p.tb.IPv4.String() + "/32", "interface": 1},
			{"address": p.tb.IPv6.String() + "/128", "interface": 1},
		},
	}
	conf, _ := json.Marshal(map[string]any{
		"cniVersion": "1.0.0", "name": "testbed", "type": "amber-cni",
		"agentSocket": e.socket(), "apiAccessFile": e.access(), "timeoutSeconds": 20, "pinRoot": e.root,
		"prevResult": prev,
	})
	cmd := e.n1.Command(context.Background(), cniBin)
	cmd.Env = []string{
		"CNI_COMMAND=" + command, "CNI_CONTAINERID=sandbox-" + string(p.uid), "CNI_NETNS=" + netns,
		"CNI_IFNAME=eth0", "CNI_PATH=" + filepath.Dir(cniBin),
		fmt.Sprintf("CNI_ARGS=IgnoreUnknown=1;K8S_POD_NAMESPACE=%s;K8S_POD_NAME=%s;K8S_POD_INFRA_CONTAINER_ID=sandbox-%s;K8S_POD_UID=%s", p.ns, p.name, p.uid, p.uid),
	}
	cmd.Stdin = bytes.NewReader(conf)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	err := cmd.Run()
	return out.String(), err
}

// kernel state of a pod, read from the pinned maps and the interface.

func (e *env) pinnedMap(name string) *ebpf.Map {
	e.t.Helper()
	m, err := ebpf.LoadPinnedMap(filepath.Join(e.root, name), nil)
	if err != nil {
		e.t.Fatal(err)
	}
	return m
}

// membership reports whether all of p's addresses are in amber_pods for
// its veth and the veth is marked captured in amber_ifaces.
func membership(pods, ifaces *ebpf.Map, p *testbed.Pod) bool {
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

// anyMembership reports whether any of p's addresses or its veth is in
// the maps.
func anyMembership(pods, ifaces *ebpf.Map, p *testbed.Pod) bool {
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

func (e *env) captured(p *pod) bool {
	pods, ifaces := e.pinnedMap("amber_pods"), e.pinnedMap("amber_ifaces")
	defer pods.Close()
	defer ifaces.Close()
	return membership(pods, ifaces, p.tb)
}

func (e *env) inMaps(p *pod) bool {
	pods, ifaces := e.pinnedMap("amber_pods"), e.pinnedMap("amber_ifaces")
	defer pods.Close()
	defer ifaces.Close()
	return anyMembership(pods, ifaces, p.tb)
}

// hasProgram reports whether the pod's veth runs a TCX ingress program.
func (e *env) hasProgram(p *testbed.Pod) bool { return e.programs([]*testbed.Pod{p})[0] }

// programs is hasProgram for several pods, in one visit to the node.
func (e *env) programs(pods []*testbed.Pod) []bool {
	out := make([]bool, len(pods))
	e.n1.Do(func() error {
		for i, p := range pods {
			res, err := link.QueryPrograms(link.QueryOptions{Target: p.HostIndex, Attach: ebpf.AttachTCXIngress})
			out[i] = err == nil && len(res.Programs) > 0
		}
		return nil
	})
	return out
}

// quarantined reports whether the node has the agent's quarantine rule
// for a (netlink's rule list does not report the action, so the rule is
// recognised by the agent's protocol and priority).
func (e *env) quarantined(a netip.Addr) bool {
	var found bool
	e.n1.Do(func() error {
		fam := netlink.FAMILY_V4
		if a.Is6() {
			fam = netlink.FAMILY_V6
		}
		rules, err := netlink.RuleList(fam)
		for _, r := range rules {
			if err == nil && r.Src != nil && r.Src.IP.Equal(a.AsSlice()) && r.Protocol == 0xa3 && r.Priority == capture.DefaultQuarantinePriority {
				found = true
			}
		}
		return nil
	})
	return found
}

func (e *env) annotated(p *pod) bool {
	api, err := e.admin.CoreV1().Pods(p.ns).Get(context.Background(), p.name, metav1.GetOptions{})
	return err == nil && api.Annotations[enrol.RedirectionAnnotation] == enrol.RedirectionEnabled
}

// connect makes one round trip from the pod to the echo server and says
// whether the transparent proxy carried it.
func (e *env) connect(p *pod) (bool, error) {
	before := e.proxied(p)
	if err := roundTrip(context.Background(), p.tb.Dial, e.echo); err != nil {
		return false, err
	}
	return e.proxied(p) > before, nil
}

func (e *env) proxied(p *pod) int {
	n := 0
	for _, ev := range e.px.Events() {
		if ev.Src.Addr().Unmap() == p.tb.IPv4 {
			n++
		}
	}
	return n
}

// mustCaptured asserts what a user observes of a captured pod.
func (e *env) mustCaptured(p *pod) {
	e.t.Helper()
	if !e.captured(p) {
		e.t.Fatalf("%s: not in the membership maps", p.key())
	}
	ok, err := e.connect(p)
	if err != nil || !ok {
		e.t.Fatalf("%s: connection not captured (proxied=%v err=%v)", p.key(), ok, err)
	}
}

func (e *env) mustDirect(p *pod) {
	e.t.Helper()
	if e.inMaps(p) {
		e.t.Fatalf("%s: still in the membership maps", p.key())
	}
	e.mustDirectNoMaps(p)
}

// mustDirectNoMaps checks a direct connection only (the maps may be gone).
func (e *env) mustDirectNoMaps(p *pod) {
	e.t.Helper()
	ok, err := e.connect(p)
	if err != nil || ok {
		e.t.Fatalf("%s: want a direct connection (proxied=%v err=%v)", p.key(), ok, err)
	}
}

func (e *env) events(p *pod, reason string) []corev1.Event {
	evs, err := e.admin.CoreV1().Events(p.ns).List(context.Background(), metav1.ListOptions{})
	if err != nil {
		e.t.Fatal(err)
	}
	var out []corev1.Event
	for _, ev := range evs.Items {
		if ev.InvolvedObject.UID == p.uid && ev.Reason == reason {
			out = append(out, ev)
		}
	}
	return out
}

// echo server in a pod.
func mustEcho(tb testing.TB, p *testbed.Pod, port int) {
	tb.Helper()
	ln, err := p.Listen("tcp", fmt.Sprintf("[::]:%d", port))
	if err != nil {
		tb.Fatal(err)
	}
	tcptest.Serve(tb, ln, func(c net.Conn) { io.Copy(c, c) })
}

func roundTrip(ctx context.Context, dial func(context.Context, string, string) (net.Conn, error), addr netip.AddrPort) error {
	ctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	c, err := dial(ctx, "tcp", addr.String())
	if err != nil {
		return err
	}
	defer c.Close()
	return echoOnce(c, "hello")
}

func echoOnce(c net.Conn, msg string) error {
	c.SetDeadline(time.Now().Add(2 * time.Second))
	if _, err := io.WriteString(c, msg); err != nil {
		return err
	}
	buf := make([]byte, len(msg))
	if _, err := io.ReadFull(c, buf); err != nil {
		return err
	}
	if string(buf) != msg {
		return fmt.Errorf("echo mismatch: %q", buf)
	}
	return nil
}

var ambient = map[string]string{enrol.DataplaneModeLabel: enrol.DataplaneModeAmbient}
