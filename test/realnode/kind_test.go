//go:build kind

package realnode_test

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/amber-mesh/amber/test/images"
	"github.com/amber-mesh/amber/test/realnode"
)

// Namespaces TestKind works in; it deletes what a previous run left in
// them first.
const (
	kindWalkNS = "amber-e2e"
	kindMeshNS = "amber-e2e-mesh"
)

// TestKind runs, on the cluster of the kubeconfig AMBER_E2E_KUBECONFIG
// names, the checks of TestPrivilegedRealNode that need nothing but the
// API server: Istio's ambient walkthrough, unlabelled pods left alone, a
// new pod captured before its first connection, hostNetwork pods never
// captured. Nodes are read through the API server (realnode.KubeNodes),
// so the cluster may be anywhere and have many nodes.
//
// The cluster needs Istio's base and istiod charts (ambient profile),
// amber's chart, and the test images loaded on every node
// (localhost/amber/{echo,curl,bookinfo-*}:test, imagePullPolicy Never):
// hack/test-kind.sh (make test-kind) sets all that up in kind. KUBECTL
// names the kubectl binary (default: kubectl from PATH).
func TestKind(t *testing.T) {
	kubeconfig := os.Getenv("AMBER_E2E_KUBECONFIG")
	if kubeconfig == "" {
		t.Fatal("AMBER_E2E_KUBECONFIG is not set: TestKind is the path for users' own clusters " +
			"(`make test-kind` creates a kind cluster with istiod and amber and sets it)")
	}
	kubectl := os.Getenv("KUBECTL")
	if kubectl == "" {
		kubectl = "kubectl"
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Minute)
	defer cancel()
	tg, err := realnode.NewKubeTarget(kubeconfig, kubectl, t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	kindRequireAmber(t, ctx, tg)
	for _, ns := range []string{kindWalkNS, kindMeshNS} {
		if err := kindDeleteNamespace(ctx, tg, ns); err != nil {
			t.Fatalf("namespace %s left by an earlier run: %v", ns, err)
		}
	}
	t.Cleanup(func() {
		if t.Failed() {
			kindLogTails(t, tg)
			t.Logf("namespaces %s and %s are left for inspection; the next run deletes them", kindWalkNS, kindMeshNS)
			return
		}
		for _, ns := range []string{kindWalkNS, kindMeshNS} {
			if err := kindDeleteNamespace(context.Background(), tg, ns); err != nil {
				t.Errorf("cleanup: %v", err)
			}
		}
	})

	walked := t.Run("Istio's ambient walkthrough", func(t *testing.T) {
		var out strings.Builder
		w := &realnode.Walkthrough{Target: tg, Out: &out, Namespace: kindWalkNS}
		err := w.Run(ctx)
		t.Logf("walkthrough:\n%s", out.String())
		if err != nil {
			t.Fatal(err)
		}
	})
	if walked {
		// Its pods are idle, but the counters below are per node: leave
		// them alone.
		if err := kindDeleteNamespace(ctx, tg, kindWalkNS); err != nil {
			t.Fatal(err)
		}
	}

	ns := kindMeshNS
	if _, err := tg.Client.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	if err := tg.Apply(ctx, "workloads-"+ns+".yaml", realnode.WorkloadsYAML(ns)); err != nil {
		t.Fatal(err)
	}
	if err := tg.WaitRollout(ctx, ns, realnode.Productpage, realnode.Sleep, realnode.NotSleep); err != nil {
		t.Fatal(err)
	}
	url := fmt.Sprintf("http://%s.%s:%d/", realnode.Productpage, ns, images.EchoPort)
	waitFor(t, ctx, "productpage's endpoints", func() error {
		if out, ok := curlIn(ctx, tg, ns, realnode.Sleep, url); !ok {
			return errors.New(out)
		}
		return nil
	})

	t.Run("unlabelled pods are untouched", func(t *testing.T) {
		sleep := podOf(t, ctx, tg, ns, realnode.Sleep)
		pp := podOf(t, ctx, tg, ns, realnode.Productpage)
		nodes := []string{sleep.Spec.NodeName, pp.Spec.NodeName}
		before := kindCounters(t, ctx, tg, nodes...)
		if out, ok := curlIn(ctx, tg, ns, realnode.Sleep, url); !ok {
			t.Fatalf("sleep → productpage: %s", out)
		}
		if kindCaptured(t, ctx, tg, sleep.Spec.NodeName, sleep.Status.PodIP) {
			t.Errorf("sleep %s captured before its namespace is labelled", sleep.Status.PodIP)
		}
		after := kindCounters(t, ctx, tg, nodes...)
		for _, k := range []string{"assign_outbound", "assign_inbound", "assign_hbone"} {
			if after[k] != before[k] {
				t.Errorf("counter %s moved for unlabelled pods on %v: %d → %d", k, nodes, before[k], after[k])
			}
		}
	})

	if _, err := tg.Kubectl(ctx, "label", "namespace", ns, "istio.io/dataplane-mode=ambient"); err != nil {
		t.Fatal(err)
	}

	t.Run("labelled namespace: running pods are captured and meshed with mTLS", func(t *testing.T) {
		for _, app := range []string{realnode.Productpage, realnode.Sleep, realnode.NotSleep} {
			p := podOf(t, ctx, tg, ns, app)
			waitFor(t, ctx, app+" captured and annotated", func() error {
				if ok, err := tg.Captured(ctx, p.Spec.NodeName, p.Status.PodIP); err != nil || !ok {
					return fmt.Errorf("%s not in the membership map of %s: %v", p.Status.PodIP, p.Spec.NodeName, err)
				}
				got, err := tg.Client.CoreV1().Pods(ns).Get(ctx, p.Name, metav1.GetOptions{})
				if err != nil {
					return err
				}
				if got.Annotations["ambient.istio.io/redirection"] != "enabled" {
					return fmt.Errorf("annotations %v", got.Annotations)
				}
				return nil
			})
		}
		pp := podOf(t, ctx, tg, ns, realnode.Productpage)
		since := time.Now().Add(-time.Second)
		sleepID := "spiffe://cluster.local/ns/" + ns + "/sa/" + realnode.Sleep
		waitFor(t, ctx, "mTLS from sleep to productpage", func() error {
			if out, ok := curlIn(ctx, tg, ns, realnode.Sleep, url); !ok {
				return errors.New(out)
			}
			ms, err := tg.Nodes.Metrics(ctx, pp.Spec.NodeName, "istio_tcp_connections_opened_total")
			if err != nil {
				return err
			}
			if realnode.Sum(ms, map[string]string{
				"reporter":                   "destination",
				"connection_security_policy": "mutual_tls",
				"source_principal":           sleepID,
				"destination_principal":      "spiffe://cluster.local/ns/" + ns + "/sa/" + realnode.Productpage,
			}) == 0 {
				return fmt.Errorf("no mutual_tls connection sleep → productpage in the metrics of %s yet", pp.Spec.NodeName)
			}
			return nil
		})
		logs, err := tg.Nodes.ZtunnelLogs(ctx, "", since)
		if err != nil {
			t.Fatal(err)
		}
		if _, ok := realnode.FindLogLine(logs, func(r realnode.LogRecord) bool { return r["src.identity"] == sleepID }); !ok {
			t.Errorf("access log has no connection from sleep's identity:\n%s", logs)
		}
	})

	t.Run("a pod created after the label is captured before its first connection", func(t *testing.T) {
		since := time.Now().Add(-time.Second)
		done := runClientPod(t, ctx, tg, ns, "first-connection", realnode.Sleep, false, url)
		logs, err := tg.Nodes.ZtunnelLogs(ctx, "", since)
		if err != nil {
			t.Fatal(err)
		}
		if _, ok := realnode.FindLogLine(logs, func(r realnode.LogRecord) bool { return r["src.workload"] == done.Name }); !ok {
			t.Errorf("the pod's first connection is not in the ztunnel's access log:\n%s", logs)
		}
	})

	t.Run("hostNetwork pods are never captured", func(t *testing.T) {
		since := time.Now().Add(-time.Second)
		done := runClientPod(t, ctx, tg, ns, "host-client", "", true, url)
		node, nodeIP := done.Spec.NodeName, done.Status.HostIP
		if kindCaptured(t, ctx, tg, node, nodeIP) {
			t.Errorf("the address of node %s (%s) is in its membership map", node, nodeIP)
		}
		if v, ok := done.Annotations["ambient.istio.io/redirection"]; ok {
			t.Errorf("hostNetwork pod annotated redirection=%s", v)
		}
		logs, err := tg.Nodes.ZtunnelLogs(ctx, node, since)
		if err != nil {
			t.Fatal(err)
		}
		if line, ok := realnode.FindLogLine(logs, func(r realnode.LogRecord) bool {
			return strings.HasPrefix(r["src.addr"], nodeIP+":")
		}); ok {
			t.Errorf("a connection from the node's address went through the ztunnel:\n%s", line)
		}
	})
}

// kindRequireAmber fails unless amber's DaemonSet (not Istio's ztunnel)
// and istiod are installed and ready.
func kindRequireAmber(t *testing.T, ctx context.Context, tg *realnode.Target) {
	t.Helper()
	if _, err := tg.Client.AppsV1().Deployments(realnode.Namespace).Get(ctx, "istiod", metav1.GetOptions{}); err != nil {
		t.Fatalf("istiod: %v (install Istio's base and istiod charts with profile=ambient; hack/test-kind.sh does)", err)
	}
	ds, err := tg.Client.AppsV1().DaemonSets(realnode.Namespace).Get(ctx, realnode.DaemonSet, metav1.GetOptions{})
	if err != nil {
		t.Fatalf("amber's DaemonSet: %v (install deploy/helm/amber; hack/test-kind.sh does)", err)
	}
	amber := false
	for _, c := range ds.Spec.Template.Spec.Containers {
		amber = amber || c.Name == "amber-agent"
	}
	if !amber {
		t.Fatalf("DaemonSet %s/%s has no amber-agent container: it is not amber's (Istio's own ztunnel chart?)", realnode.Namespace, realnode.DaemonSet)
	}
	if err := realnode.WaitDaemonSet(ctx, tg.Client, 3*time.Minute); err != nil {
		t.Fatal(err)
	}
}

// kindDeleteNamespace deletes ns, if there, and waits until it is gone.
func kindDeleteNamespace(ctx context.Context, tg *realnode.Target, ns string) error {
	err := tg.Client.CoreV1().Namespaces().Delete(ctx, ns, metav1.DeleteOptions{})
	if apierrors.IsNotFound(err) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("delete namespace %s: %w", ns, err)
	}
	ctx, cancel := context.WithTimeout(ctx, 3*time.Minute)
	defer cancel()
	for {
		_, err := tg.Client.CoreV1().Namespaces().Get(ctx, ns, metav1.GetOptions{})
		if apierrors.IsNotFound(err) {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("namespace %s still terminating: %w", ns, ctx.Err())
		case <-time.After(time.Second):
		}
	}
}

// kindLogTails logs the end of both containers' logs on every node.
func kindLogTails(t *testing.T, tg *realnode.Target) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	pods, err := tg.Client.CoreV1().Pods(realnode.Namespace).List(ctx, metav1.ListOptions{LabelSelector: "app=" + realnode.DaemonSet})
	if err != nil {
		t.Logf("amber's pods: %v", err)
		return
	}
	for _, p := range pods.Items {
		for _, c := range []string{"amber-agent", "amber-ztunnel"} {
			out, err := tg.Kubectl(ctx, "-n", realnode.Namespace, "logs", p.Name, "-c", c, "--tail=60")
			t.Logf("%s on %s, log tail (%v):\n%s", c, p.Spec.NodeName, err, out)
		}
	}
}

func kindCaptured(t *testing.T, ctx context.Context, tg *realnode.Target, node, ip string) bool {
	t.Helper()
	ok, err := tg.Captured(ctx, node, ip)
	if err != nil {
		t.Fatal(err)
	}
	return ok
}

// kindCounters sums the datapath counters of the nodes (each once).
func kindCounters(t *testing.T, ctx context.Context, tg *realnode.Target, nodes ...string) map[string]uint64 {
	t.Helper()
	sum := map[string]uint64{}
	seen := map[string]bool{}
	for _, n := range nodes {
		if seen[n] {
			continue
		}
		seen[n] = true
		st, err := tg.Nodes.Datapath(ctx, n)
		if err != nil {
			t.Fatal(err)
		}
		for k, v := range st.Counters {
			sum[k] += v
		}
	}
	return sum
}
