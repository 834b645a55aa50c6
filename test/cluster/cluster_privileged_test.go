package cluster_test

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/client-go/kubernetes"

	"github.com/amber-mesh/amber/test/cluster"
	"github.com/amber-mesh/amber/test/images"
)

// TestPrivilegedCluster: the node becomes Ready, a pod from the locally
// built echo image becomes Ready behind a real host-side veth, a client pod
// reaches it by its Service name (CoreDNS + kube-proxy), and Close leaves
// the host as it found it.
func TestPrivilegedCluster(t *testing.T) {
	var before hostState
	c := cluster.Up(t, cluster.Options{Locked: func() { before = snapshotHost(t) }})
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()

	n, err := c.Client.CoreV1().Nodes().Get(ctx, c.NodeName, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if !isReady(n.Status.Conditions) {
		t.Fatalf("node %s not Ready: %+v", c.NodeName, n.Status.Conditions)
	}

	echo := mustEcho(t, ctx, c.Client, "echo")
	route, err := netlink.RouteGet(net.ParseIP(echo.Status.PodIP))
	if err != nil || len(route) == 0 {
		t.Fatalf("ip route get %s: %v", echo.Status.PodIP, err)
	}
	veth, err := netlink.LinkByIndex(route[0].LinkIndex)
	if err != nil {
		t.Fatalf("route to %s: %v", echo.Status.PodIP, err)
	}
	if veth.Type() != "veth" {
		t.Fatalf("route to pod %s goes through %s (%s), want the pod's veth", echo.Status.PodIP, veth.Attrs().Name, veth.Type())
	}
	t.Logf("pod %s is behind %s", echo.Status.PodIP, veth.Attrs().Name)

	url := fmt.Sprintf("http://echo.default.svc.%s/productpage", cluster.ClusterDomain)
	client, logs := runClient(t, ctx, c.Client, "client", url)
	for _, want := range []string{"200 OK", "hostname=echo\n", "path=/productpage\n", "remote=" + client.Status.PodIP + ":"} {
		if !strings.Contains(logs, want) {
			t.Errorf("client output lacks %q:\n%s", want, logs)
		}
	}

	// One cluster per host: a second state directory is refused, and
	// cleaning that directory up leaves the running cluster alone.
	other := t.TempDir()
	if _, err := cluster.Start(ctx, cluster.Options{Dir: other}); !errors.Is(err, cluster.ErrHostBusy) {
		t.Errorf("second cluster: got %v, want ErrHostBusy", err)
	}
	if err := cluster.Stop(ctx, other); err != nil {
		t.Errorf("stop refused cluster: %v", err)
	}
	if st := c.Status(ctx); !st.Healthy() {
		t.Errorf("running cluster hurt by stopping another directory:\n%s", st)
	}

	pids := componentPids(t, c)
	if err := c.Close(); err != nil {
		t.Fatalf("close: %v", err)
	}
	assertClean(t, before, c, pids, veth.Attrs().Name)
	if err := c.Close(); err != nil {
		t.Errorf("second close: %v", err)
	}
}

// TestPrivilegedClusterCrashCleanup: every component is SIGKILLed while
// pods run (a crashed cluster-up, a killed test); Stop still removes
// everything.
func TestPrivilegedClusterCrashCleanup(t *testing.T) {
	var before hostState
	c := cluster.Up(t, cluster.Options{Locked: func() { before = snapshotHost(t) }})
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	echo := mustEcho(t, ctx, c.Client, "echo")
	route, err := netlink.RouteGet(net.ParseIP(echo.Status.PodIP))
	if err != nil || len(route) == 0 {
		t.Fatalf("ip route get %s: %v", echo.Status.PodIP, err)
	}
	veth, _ := netlink.LinkByIndex(route[0].LinkIndex)

	pids := componentPids(t, c)
	for _, pid := range pids {
		_ = syscall.Kill(pid, syscall.SIGKILL)
	}
	if err := cluster.Stop(ctx, c.Dir); err != nil {
		t.Fatalf("stop after crash: %v", err)
	}
	assertClean(t, before, c, pids, veth.Attrs().Name)
}

// BenchmarkPrivilegedPodStart measures pod create → Ready, one pod at a
// time (echo image, readiness probe every second... the probe's first run
// is immediate), and reports the median.
func BenchmarkPrivilegedPodStart(b *testing.B) {
	c := cluster.Up(b, cluster.Options{})
	ctx := context.Background()
	var d []time.Duration
	for i := 0; b.Loop(); i++ {
		t0 := time.Now()
		mustEcho(b, ctx, c.Client, fmt.Sprintf("bench-%d", i))
		d = append(d, time.Since(t0))
	}
	slices.Sort(d)
	b.ReportMetric(float64(d[len(d)/2].Milliseconds()), "p50-ms")
	b.ReportMetric(float64(d[len(d)-1].Milliseconds()), "max-ms")
}

func isReady(conds []corev1.NodeCondition) bool {
	for _, c := range conds {
		if c.Type == corev1.NodeReady {
			return c.Status == corev1.ConditionTrue
		}
	}
	return false
}

// mustEcho creates an echo pod and a Service of the same name and waits
// for the pod to be Ready.
func mustEcho(tb testing.TB, ctx context.Context, cs kubernetes.Interface, name string) *corev1.Pod {
	tb.Helper()
	labels := map[string]string{"app": name}
	pod := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: name, Labels: labels},
		Spec: corev1.PodSpec{
			Containers: []corev1.Container{{
				Name: "echo", Image: images.Echo.Ref, ImagePullPolicy: corev1.PullNever,
				Ports: []corev1.ContainerPort{{ContainerPort: images.EchoPort}},
				ReadinessProbe: &corev1.Probe{
					ProbeHandler:  corev1.ProbeHandler{HTTPGet: &corev1.HTTPGetAction{Path: "/healthz", Port: intstr.FromInt32(images.EchoPort)}},
					PeriodSeconds: 1,
				},
			}},
			TerminationGracePeriodSeconds: new(int64),
		},
	}
	if _, err := cs.CoreV1().Pods("default").Create(ctx, pod, metav1.CreateOptions{}); err != nil {
		tb.Fatalf("create pod %s: %v", name, err)
	}
	svc := &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: name},
		Spec: corev1.ServiceSpec{Selector: labels, Ports: []corev1.ServicePort{
			{Port: 80, TargetPort: intstr.FromInt32(images.EchoPort)},
		}},
	}
	if _, err := cs.CoreV1().Services("default").Create(ctx, svc, metav1.CreateOptions{}); err != nil {
		tb.Fatalf("create service %s: %v", name, err)
	}
	return waitPod(tb, ctx, cs, name, func(p *corev1.Pod) bool {
		for _, c := range p.Status.Conditions {
			if c.Type == corev1.PodReady && c.Status == corev1.ConditionTrue {
				return true
			}
		}
		return false
	})
}

// runClient runs the curl image against url to completion and returns the
// pod and its output; it fails the test unless curl succeeded.
func runClient(tb testing.TB, ctx context.Context, cs kubernetes.Interface, name, url string) (*corev1.Pod, string) {
	tb.Helper()
	pod := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: name},
		Spec: corev1.PodSpec{
			RestartPolicy: corev1.RestartPolicyNever,
			Containers: []corev1.Container{{
				Name: "curl", Image: images.Curl.Ref, ImagePullPolicy: corev1.PullNever,
				// kube-proxy may program the Service a moment after the
				// endpoint is Ready.
				Args: []string{"-retry", "20", url},
			}},
		},
	}
	if _, err := cs.CoreV1().Pods("default").Create(ctx, pod, metav1.CreateOptions{}); err != nil {
		tb.Fatalf("create pod %s: %v", name, err)
	}
	p := waitPod(tb, ctx, cs, name, func(p *corev1.Pod) bool {
		return p.Status.Phase == corev1.PodSucceeded || p.Status.Phase == corev1.PodFailed
	})
	b, err := cs.CoreV1().Pods("default").GetLogs(name, &corev1.PodLogOptions{}).DoRaw(ctx)
	if err != nil {
		tb.Fatalf("logs of %s: %v", name, err)
	}
	if p.Status.Phase != corev1.PodSucceeded {
		tb.Fatalf("client %s: %s:\n%s", name, p.Status.Phase, b)
	}
	return p, string(b)
}

func waitPod(tb testing.TB, ctx context.Context, cs kubernetes.Interface, name string, done func(*corev1.Pod) bool) *corev1.Pod {
	tb.Helper()
	var p *corev1.Pod
	var err error
	for {
		p, err = cs.CoreV1().Pods("default").Get(ctx, name, metav1.GetOptions{})
		if err == nil && done(p) {
			return p
		}
		select {
		case <-ctx.Done():
			tb.Fatalf("pod %s: %v (last: %v, status %+v)", name, ctx.Err(), err, p.Status)
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// hostState is what a stopped cluster must leave as it was.
type hostState struct {
	sysctls map[string]string
	paths   map[string]bool // exists
	netns   []string
	links   []string
}

var (
	watchedSysctls = []string{"vm/overcommit_memory", "kernel/panic", "kernel/panic_on_oops", "net/ipv4/ip_forward"}
	watchedPaths   = []string{"/var/lib/kubelet", "/var/log/containers", "/var/log/pods", "/var/lib/cni", "/run/containerd", "/etc/cni", "/run/amber-cluster"}
)

func snapshotHost(tb testing.TB) hostState {
	tb.Helper()
	s := hostState{sysctls: map[string]string{}, paths: map[string]bool{}}
	for _, k := range watchedSysctls {
		b, err := os.ReadFile("/proc/sys/" + k)
		if err != nil {
			tb.Fatalf("read sysctl: %v", err)
		}
		s.sysctls[k] = strings.TrimSpace(string(b))
	}
	for _, p := range watchedPaths {
		_, err := os.Lstat(p)
		s.paths[p] = !errors.Is(err, fs.ErrNotExist)
	}
	ents, _ := os.ReadDir("/run/netns")
	for _, e := range ents {
		if strings.HasPrefix(e.Name(), "cni-") {
			s.netns = append(s.netns, e.Name())
		}
	}
	return s
}

func componentPids(tb testing.TB, c *cluster.Cluster) map[string]int {
	tb.Helper()
	st := c.Status(context.Background())
	for n, pid := range st.Pids {
		if pid == 0 {
			tb.Fatalf("%s not running", n)
		}
	}
	return st.Pids
}

func assertClean(t *testing.T, before hostState, c *cluster.Cluster, pids map[string]int, podVeth string) {
	t.Helper()
	after := snapshotHost(t)
	for k, v := range before.sysctls {
		if after.sysctls[k] != v {
			t.Errorf("sysctl %s = %s after stop, was %s", k, after.sysctls[k], v)
		}
	}
	for p, existed := range before.paths {
		if after.paths[p] != existed {
			t.Errorf("%s exists=%v after stop, was %v", p, after.paths[p], existed)
		}
	}
	if !slices.Equal(before.netns, after.netns) {
		t.Errorf("pod netns after stop: %v, before: %v", after.netns, before.netns)
	}
	for n, pid := range pids {
		if b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid)); err == nil && !strings.Contains(string(b), ") Z ") {
			t.Errorf("%s (pid %d) still running", n, pid)
		}
	}
	for _, link := range []string{cluster.NodeLink, podVeth} {
		if _, err := netlink.LinkByName(link); err == nil {
			t.Errorf("interface %s still there", link)
		}
	}
	if _, err := os.Stat(c.Dir); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("state dir %s still there: %v", c.Dir, err)
	}
	mi, _ := os.ReadFile("/proc/self/mountinfo")
	if strings.Contains(string(mi), c.Dir) {
		t.Errorf("mounts under %s left", c.Dir)
	}
	out, err := exec.Command("nft", "list", "tables").CombinedOutput()
	if err != nil {
		t.Errorf("nft list tables: %v: %s", err, out)
	}
	for _, tbl := range []string{"kube-proxy", "amber-cluster"} {
		if strings.Contains(string(out), " "+tbl+"\n") {
			t.Errorf("nftables table %s left:\n%s", tbl, out)
		}
	}
	if _, err := exec.LookPath("iptables-save"); err == nil {
		out, _ := exec.Command("iptables-save").CombinedOutput()
		if strings.Contains(string(out), "KUBE-") {
			t.Errorf("iptables KUBE- chains left")
		}
	}
	cgs, _ := filepath.Glob("/sys/fs/cgroup/*/kubepods")
	sort.Strings(cgs)
	if len(cgs) > 0 {
		t.Errorf("pod cgroups left: %v", cgs)
	}
	routes, _ := netlink.RouteList(nil, netlink.FAMILY_V4)
	for _, r := range routes {
		if r.Dst != nil && strings.HasPrefix(r.Dst.String(), "198.18.") && r.Dst.String() != "198.18.0.0/15" {
			// Only our own ranges: 198.18.0.1, pods, Services.
			_, pods, _ := net.ParseCIDR(cluster.PodCIDR)
			_, svcs, _ := net.ParseCIDR(cluster.ServiceCIDR)
			if pods.Contains(r.Dst.IP) || svcs.Contains(r.Dst.IP) {
				t.Errorf("route %s left", r.Dst)
			}
		}
	}
}
