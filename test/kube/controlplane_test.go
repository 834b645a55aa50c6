package kube_test

import (
	"bufio"
	"context"
	"encoding/hex"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/watch"

	"github.com/amber-mesh/amber/test/kube"
)

// A control plane serves objects, keeps them across an API server restart
// (same etcd), listens only on loopback, and disappears with the test.
func TestIntegrationControlPlane(t *testing.T) {
	var (
		etcdPid, apiPid int
		dir             string
	)
	t.Run("lifecycle", func(t *testing.T) {
		start := time.Now()
		cp := kube.Start(t, kube.Options{})
		t.Logf("control plane ready in %v", time.Since(start).Round(time.Millisecond))
		etcdPid, apiPid = cp.Pids()
		dir = cp.Dir
		lifecycle(t, cp)
	})
	// The subtest's cleanup has run: both processes are gone (a zombie
	// would still answer kill 0, so this also checks they were reaped)
	// and so is every file.
	for _, pid := range []int{etcdPid, apiPid} {
		if pid == 0 {
			continue
		}
		if err := syscall.Kill(pid, 0); !errors.Is(err, syscall.ESRCH) {
			t.Errorf("pid %d still exists after cleanup (kill 0: %v)", pid, err)
		}
	}
	if dir != "" {
		if _, err := os.Stat(dir); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("%s still exists after cleanup (%v)", dir, err)
		}
	}
}

func lifecycle(t *testing.T, cp *kube.ControlPlane) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	c := cp.Client

	// The binaries carry their release version (hack/kube-bins.sh ldflags).
	v, err := c.Discovery().ServerVersion()
	if err != nil {
		t.Fatalf("server version: %v", err)
	}
	if !strings.HasPrefix(v.GitVersion, "v1.") || v.GitVersion == "v0.0.0" {
		t.Errorf("server version %q, want the release version", v.GitVersion)
	}

	etcdPid, apiPid := cp.Pids()
	for name, pid := range map[string]int{"etcd": etcdPid, "kube-apiserver": apiPid} {
		ls := listeners(t, pid)
		if len(ls) == 0 {
			t.Errorf("%s (pid %d) has no listening TCP socket", name, pid)
		}
		for _, l := range ls {
			if !l.Addr().Unmap().IsLoopback() {
				t.Errorf("%s listens on %v, want loopback only", name, l)
			}
		}
	}

	ns, err := c.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{
		ObjectMeta: metav1.ObjectMeta{Name: "amber-it"},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatalf("create namespace: %v", err)
	}

	list, err := c.CoreV1().Pods(ns.Name).List(ctx, metav1.ListOptions{})
	if err != nil {
		t.Fatalf("list pods: %v", err)
	}
	w, err := c.CoreV1().Pods(ns.Name).Watch(ctx, metav1.ListOptions{ResourceVersion: list.ResourceVersion})
	if err != nil {
		t.Fatalf("watch pods: %v", err)
	}
	defer w.Stop()

	pod, err := c.CoreV1().Pods(ns.Name).Create(ctx, &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: "sleep", Labels: map[string]string{"app": "sleep"}},
		Spec: corev1.PodSpec{
			// No kubelet runs it; the image is never pulled.
			Containers: []corev1.Container{{Name: "sleep", Image: "registry.invalid/sleep:1"}},
		},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatalf("create pod (the ServiceAccount admission plugin should be off): %v", err)
	}
	if ev := nextEvent(t, w); ev.Type != watch.Added || ev.Object.(*corev1.Pod).UID != pod.UID {
		t.Fatalf("watch: got %s %v, want ADDED of pod %s", ev.Type, ev.Object, pod.UID)
	}

	stopped := time.Now()
	if err := cp.StopAPIServer(); err != nil {
		t.Fatalf("stop apiserver: %v", err)
	}
	// A watcher sees the server go away, and requests fail.
	select {
	case ev, ok := <-w.ResultChan():
		if ok {
			t.Fatalf("watch: got %s %v after the API server stopped, want the channel closed", ev.Type, ev.Object)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("watch still open 30s after the API server stopped")
	}
	if _, err := c.CoreV1().Pods(ns.Name).Get(ctx, pod.Name, metav1.GetOptions{}); err == nil {
		t.Fatal("get pod succeeded with the API server stopped")
	}

	t.Logf("apiserver stopped in %v", time.Since(stopped).Round(time.Millisecond))
	restart := time.Now()
	cp.StartAPIServer(t)
	t.Logf("apiserver ready again in %v", time.Since(restart).Round(time.Millisecond))
	got, err := c.CoreV1().Pods(ns.Name).Get(ctx, pod.Name, metav1.GetOptions{})
	if err != nil {
		t.Fatalf("get pod after restart: %v", err)
	}
	if got.UID != pod.UID || got.ResourceVersion != pod.ResourceVersion {
		t.Fatalf("pod after restart: uid %s rv %s, want uid %s rv %s (same etcd data)", got.UID, got.ResourceVersion, pod.UID, pod.ResourceVersion)
	}

	// Watches work again. (One resumed from a resource version older than
	// the restart gets 410 Expired: the new API server's watch cache starts
	// at etcd's current revision. Informers relist on that.)
	list, err = c.CoreV1().Pods(ns.Name).List(ctx, metav1.ListOptions{})
	if err != nil {
		t.Fatalf("list pods after restart: %v", err)
	}
	w2, err := c.CoreV1().Pods(ns.Name).Watch(ctx, metav1.ListOptions{ResourceVersion: list.ResourceVersion})
	if err != nil {
		t.Fatalf("watch pods after restart: %v", err)
	}
	defer w2.Stop()
	if _, err := c.CoreV1().Pods(ns.Name).Patch(ctx, pod.Name, types.MergePatchType,
		[]byte(`{"metadata":{"labels":{"restarted":"yes"}}}`), metav1.PatchOptions{}); err != nil {
		t.Fatalf("patch pod: %v", err)
	}
	ev := nextEvent(t, w2)
	if p, ok := ev.Object.(*corev1.Pod); ev.Type != watch.Modified || !ok || p.Labels["restarted"] != "yes" {
		t.Fatalf("watch after restart: got %s %v, want MODIFIED with label restarted=yes", ev.Type, ev.Object)
	}

	// kubectl works with the generated kubeconfig.
	out, err := cp.Kubectl(ctx, "get", "pod", "-n", ns.Name, pod.Name, "-o", "jsonpath={.metadata.uid}")
	if err != nil {
		t.Fatal(err)
	}
	if string(out) != string(pod.UID) {
		t.Errorf("kubectl get pod uid = %q, want %q", out, pod.UID)
	}

	// Identities from UserConfig are subject to RBAC: a node may not list
	// namespaces.
	nodeCfg, nodeKubeconfig := cp.UserConfig(t, "system:node:n1", "system:nodes")
	if _, err := os.Stat(nodeKubeconfig); err != nil {
		t.Errorf("node kubeconfig: %v", err)
	}
	out, err = cp.Kubectl(ctx, "--kubeconfig="+nodeKubeconfig, "auth", "whoami", "-o", "jsonpath={.status.userInfo.username}")
	if err != nil {
		t.Fatal(err)
	}
	if string(out) != "system:node:n1" || nodeCfg.Host != cp.Config.Host {
		t.Errorf("whoami with node kubeconfig = %q (host %s), want system:node:n1 (host %s)", out, nodeCfg.Host, cp.Config.Host)
	}
	if _, err := cp.Kubectl(ctx, "--kubeconfig="+nodeKubeconfig, "get", "namespaces"); err == nil || !strings.Contains(err.Error(), "forbidden") {
		t.Errorf("node listing namespaces: err %v, want forbidden", err)
	}
}

func nextEvent(t *testing.T, w watch.Interface) watch.Event {
	t.Helper()
	select {
	case ev, ok := <-w.ResultChan():
		if !ok {
			t.Fatal("watch closed")
		}
		return ev
	case <-time.After(30 * time.Second):
		t.Fatal("no watch event in 30s")
	}
	panic("unreachable")
}

// listeners returns the local addresses of the listening TCP sockets that
// process pid holds open.
func listeners(t *testing.T, pid int) []netip.AddrPort {
	t.Helper()
	fds, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	if err != nil {
		t.Fatalf("list fds of %d: %v", pid, err)
	}
	inodes := map[string]bool{}
	for _, fd := range fds {
		link, err := os.Readlink(filepath.Join(fmt.Sprintf("/proc/%d/fd", pid), fd.Name()))
		if err == nil && strings.HasPrefix(link, "socket:[") {
			inodes[strings.TrimSuffix(strings.TrimPrefix(link, "socket:["), "]")] = true
		}
	}
	var out []netip.AddrPort
	for _, file := range []string{"tcp", "tcp6"} {
		f, err := os.Open(fmt.Sprintf("/proc/%d/net/%s", pid, file))
		if err != nil {
			t.Fatalf("read sockets of %d: %v", pid, err)
		}
		s := bufio.NewScanner(f)
		s.Scan() // header
		for s.Scan() {
			// sl local_address rem_address st ... inode (field 9)
			fields := strings.Fields(s.Text())
			const listen = "0A"
			if len(fields) < 10 || fields[3] != listen || !inodes[fields[9]] {
				continue
			}
			out = append(out, parseProcAddr(t, fields[1]))
		}
		f.Close()
	}
	return out
}

// parseProcAddr decodes /proc/net/tcp's "ADDR:PORT": the address is hex
// of the in-kernel 32-bit words, each in host (little-endian) order.
func parseProcAddr(t *testing.T, s string) netip.AddrPort {
	t.Helper()
	addrHex, portHex, _ := strings.Cut(s, ":")
	raw, err := hex.DecodeString(addrHex)
	port, perr := strconv.ParseUint(portHex, 16, 16)
	if err != nil || perr != nil || (len(raw) != 4 && len(raw) != 16) {
		t.Fatalf("parse /proc/net/tcp address %q", s)
	}
	for i := 0; i < len(raw); i += 4 {
		raw[i], raw[i+1], raw[i+2], raw[i+3] = raw[i+3], raw[i+2], raw[i+1], raw[i]
	}
	addr, _ := netip.AddrFromSlice(raw)
	return netip.AddrPortFrom(addr, uint16(port))
}
