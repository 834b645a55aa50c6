package realnode

import (
	"context"
	"path/filepath"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/amber-mesh/amber/test/kube"
)

// NewKubeTarget against a real API server and kubectl: the kubeconfig
// reaches both, the spec.nodeName field selector picks each node's pod,
// manifests are applied, kubectl's errors carry its standard error. (exec
// and the pod proxy need a kubelet and a routable pod address: TestKind
// covers them.)
func TestIntegrationKubeTarget(t *testing.T) {
	cp := kube.Start(t, kube.Options{})
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	tg, err := NewKubeTarget(cp.Kubeconfig, filepath.Join(cp.BinDir, "kubectl"), t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	if err := tg.Apply(ctx, "ns.yaml", "apiVersion: v1\nkind: Namespace\nmetadata: {name: "+Namespace+"}\n"); err != nil {
		t.Fatal(err)
	}
	if _, err := cp.Client.CoreV1().Namespaces().Get(ctx, Namespace, metav1.GetOptions{}); err != nil {
		t.Fatalf("applied namespace: %v", err)
	}
	for _, p := range []struct{ name, node string }{{"ztunnel-a", "node-a"}, {"ztunnel-b", "node-b"}} {
		pod := &corev1.Pod{
			ObjectMeta: metav1.ObjectMeta{Name: p.name, Namespace: Namespace, Labels: map[string]string{"app": DaemonSet}},
			Spec:       corev1.PodSpec{NodeName: p.node, Containers: []corev1.Container{{Name: "amber-agent", Image: "localhost/amber/amber:test"}}},
		}
		created, err := cp.Client.CoreV1().Pods(Namespace).Create(ctx, pod, metav1.CreateOptions{})
		if err != nil {
			t.Fatal(err)
		}
		// What a kubelet would report.
		created.Status = corev1.PodStatus{Phase: corev1.PodRunning, Conditions: []corev1.PodCondition{{Type: corev1.PodReady, Status: corev1.ConditionTrue}}}
		if _, err := cp.Client.CoreV1().Pods(Namespace).UpdateStatus(ctx, created, metav1.UpdateOptions{}); err != nil {
			t.Fatal(err)
		}
	}

	for _, c := range []struct{ node, pod string }{{"node-a", "ztunnel-a"}, {"node-b", "ztunnel-b"}} {
		cmds, err := tg.Nodes.Commands(ctx, c.node)
		if err != nil {
			t.Fatal(err)
		}
		if !strings.Contains(cmds.Amberctl, " exec "+c.pod+" ") || !strings.HasSuffix(cmds.Metrics, "/pods/"+c.pod+":15020/proxy/metrics") {
			t.Errorf("commands for %s: %+v", c.node, cmds)
		}
	}
	if _, err := tg.Nodes.Commands(ctx, "node-c"); err == nil || !strings.Contains(err.Error(), "node-c") {
		t.Errorf("node without amber: %v", err)
	}
	p, err := tg.RunningPod(ctx, Namespace, DaemonSet)
	if err != nil || !strings.HasPrefix(p.Name, "ztunnel-") {
		t.Errorf("RunningPod = %v, %v", p, err)
	}
	if _, err := tg.Kubectl(ctx, "-n", Namespace, "get", "pod", "no-such-pod"); err == nil || !strings.Contains(err.Error(), "NotFound") {
		t.Errorf("kubectl error without its stderr: %v", err)
	}
}
