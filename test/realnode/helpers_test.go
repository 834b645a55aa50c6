package realnode_test

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/amber-mesh/amber/bpf"
	"github.com/amber-mesh/amber/bpf/hostnet"
	"github.com/amber-mesh/amber/test/cluster"
	"github.com/amber-mesh/amber/test/images"
	"github.com/amber-mesh/amber/test/realnode"
)

// mustInstall installs amber on c with its chart and registers its
// uninstall, logging amber's containers' log tails when the test failed
// and removing what a failed uninstall left on the host. The test sets
// *installed to false once it uninstalled amber itself.
func mustInstall(t *testing.T, ctx context.Context, c *cluster.Cluster, log *slog.Logger) (a *realnode.Amber, installed *bool) {
	t.Helper()
	a, err := realnode.Install(ctx, c, realnode.Options{Logger: log})
	if err != nil {
		t.Fatal(err)
	}
	installed = new(bool)
	*installed = true
	t.Cleanup(func() {
		if t.Failed() {
			for _, ctr := range []string{"amber-agent", "amber-ztunnel"} {
				out, _ := c.Kubectl(context.Background(), "-n", realnode.Namespace, "logs", "ds/"+realnode.DaemonSet, "-c", ctr, "--tail=60")
				t.Logf("%s log tail:\n%s", ctr, out)
			}
		}
		if *installed {
			if err := a.Uninstall(context.Background()); err != nil {
				t.Errorf("cleanup: %v", err)
			}
		}
		// Whatever an uninstall that failed left on the host.
		if _, err := os.Stat(bpf.DefaultPinRoot); err == nil {
			t.Errorf("cleanup: %s left behind; removing it", bpf.DefaultPinRoot)
			if err := errors.Join(bpf.Uninstall(bpf.Config{}), hostnet.Remove(hostnet.Config{})); err != nil {
				t.Errorf("cleanup: %v", err)
			}
		}
	})
	return a, installed
}

// podOf returns the running, ready pod of app in ns.
func podOf(t *testing.T, ctx context.Context, tg *realnode.Target, ns, app string) *corev1.Pod {
	t.Helper()
	p, err := tg.RunningPod(ctx, ns, app)
	if err != nil {
		t.Fatal(err)
	}
	return p
}

// curlIn runs `kubectl exec deploy/APP -- curl URL` in ns.
func curlIn(ctx context.Context, tg *realnode.Target, ns, app, url string) (string, bool) {
	out, err := tg.Kubectl(ctx, "-n", ns, "exec", "deploy/"+app, "--", "curl", "-timeout=5s", url)
	if err != nil {
		return fmt.Sprintf("%s%v", out, err), false
	}
	return string(out), true
}

// refusedIn runs `kubectl exec deploy/APP -- curl URL` in ns and returns
// nil when curl itself failed (refused), an error when it succeeded or
// kubectl could not run it.
func refusedIn(ctx context.Context, tg *realnode.Target, ns, app, url string) error {
	out, err := tg.Kubectl(ctx, "-n", ns, "exec", "deploy/"+app, "--", "curl", "-timeout=5s", url)
	if realnode.ClientFailed(err) {
		return nil
	}
	return fmt.Errorf("%s → %s not refused: %v %s", app, url, err, out)
}

// waitPodDone waits until the pod has succeeded or failed.
func waitPodDone(t *testing.T, ctx context.Context, tg *realnode.Target, ns, name string) *corev1.Pod {
	t.Helper()
	var p *corev1.Pod
	waitFor(t, ctx, "pod "+name+" to finish", func() error {
		var err error
		if p, err = tg.Client.CoreV1().Pods(ns).Get(ctx, name, metav1.GetOptions{}); err != nil {
			return err
		}
		if p.Status.Phase != corev1.PodSucceeded && p.Status.Phase != corev1.PodFailed {
			return fmt.Errorf("phase %s", p.Status.Phase)
		}
		return nil
	})
	return p
}

// waitFor calls check every 250 ms until it succeeds, and fails the test
// with its last error after 90 s.
func waitFor(t *testing.T, ctx context.Context, what string, check func() error) {
	t.Helper()
	if err := realnode.Retry(ctx, 90*time.Second, check); err != nil {
		t.Fatalf("waiting for %s: %v", what, err)
	}
}

// runClientPod runs a pod whose only container GETs url once (as service
// account sa, on the node's network with hostNetwork), waits for it to
// finish and fails the test unless it succeeded.
func runClientPod(t *testing.T, ctx context.Context, tg *realnode.Target, ns, name, sa string, hostNetwork bool, url string) *corev1.Pod {
	t.Helper()
	p := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: ns},
		Spec: corev1.PodSpec{
			ServiceAccountName: sa, RestartPolicy: corev1.RestartPolicyNever,
			Containers: []corev1.Container{{Name: "curl", Image: images.Curl.Ref, ImagePullPolicy: corev1.PullNever,
				Args: []string{"-timeout=20s", url}}},
		},
	}
	if hostNetwork {
		p.Spec.HostNetwork, p.Spec.DNSPolicy = true, corev1.DNSClusterFirstWithHostNet
	}
	if _, err := tg.Client.CoreV1().Pods(ns).Create(ctx, p, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	done := waitPodDone(t, ctx, tg, ns, name)
	if done.Status.Phase != corev1.PodSucceeded {
		out, _ := tg.Kubectl(ctx, "-n", ns, "logs", name)
		t.Fatalf("%s pod %s:\n%s", name, done.Status.Phase, out)
	}
	return done
}

// waitMeshed waits until the running pods of each app in ns are
// captured and annotated by amber.
func waitMeshed(t *testing.T, ctx context.Context, c *cluster.Cluster, ns string, apps ...string) {
	t.Helper()
	for _, app := range apps {
		pods, err := c.Client.CoreV1().Pods(ns).List(ctx, metav1.ListOptions{LabelSelector: "app=" + app})
		if err != nil {
			t.Fatal(err)
		}
		for _, p := range pods.Items {
			waitFor(t, ctx, p.Name+" captured and annotated", func() error {
				if !captured(t, p.Status.PodIP) {
					return fmt.Errorf("%s not in the membership map", p.Status.PodIP)
				}
				got, err := c.Client.CoreV1().Pods(ns).Get(ctx, p.Name, metav1.GetOptions{})
				if err != nil {
					return err
				}
				if got.Annotations["ambient.istio.io/redirection"] != "enabled" {
					return fmt.Errorf("annotations %v", got.Annotations)
				}
				return nil
			})
		}
	}
}

// readyPod waits until a pod in ns matching selector is Ready and not
// being deleted, and returns it; while it waits, the error shows the tail
// of the log of deploy (a Deployment's name).
func readyPod(t *testing.T, ctx context.Context, c *cluster.Cluster, ns, selector, deploy string) *corev1.Pod {
	t.Helper()
	var pod *corev1.Pod
	waitFor(t, ctx, "a Ready pod "+selector+" in "+ns, func() error {
		pods, err := c.Client.CoreV1().Pods(ns).List(ctx, metav1.ListOptions{LabelSelector: selector})
		if err != nil {
			return err
		}
		for i := range pods.Items {
			p := &pods.Items[i]
			for _, cond := range p.Status.Conditions {
				if cond.Type == corev1.PodReady && cond.Status == corev1.ConditionTrue && p.DeletionTimestamp == nil {
					pod = p
					return nil
				}
			}
		}
		out, _ := c.Kubectl(ctx, "-n", ns, "logs", "deploy/"+deploy, "--tail=20")
		return fmt.Errorf("not Ready; log tail:\n%s", out)
	})
	return pod
}

// deployBookinfo deploys Bookinfo (with the reviews-v1/v2/v3 Services),
// sleep and notsleep in ns, enrols ns in the mesh and waits until every
// pod is captured.
func deployBookinfo(t *testing.T, ctx context.Context, c *cluster.Cluster, ns string) {
	t.Helper()
	if err := realnode.HostTarget(c).DeployBookinfo(ctx, ns); err != nil {
		t.Fatal(err)
	}
	waitMeshed(t, ctx, c, ns, "productpage", "details", "reviews", "ratings", realnode.Sleep, realnode.NotSleep)
}
