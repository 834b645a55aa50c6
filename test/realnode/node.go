package realnode

import (
	"context"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"

	"github.com/amber-mesh/amber/bpf"
)

// NodeAccess reads what amber shows on a cluster's nodes: the pinned
// datapath, the ztunnel's metrics and access log, amberctl's and the
// membership map's printouts. HostNode reads them from this machine (the
// test/cluster node); KubeNodes through the API server alone, for any
// cluster.
//
// node is a Node's name. Metrics and ZtunnelLogs also take "" for every
// node: an access-log line or a counter may be on either end of a
// connection.
type NodeAccess interface {
	// Datapath returns the node's pinned datapath (`amberctl -o json`).
	Datapath(ctx context.Context, node string) (*bpf.Status, error)
	// Metrics returns the samples of the node's ztunnel metrics whose
	// name is in names (all when names is empty).
	Metrics(ctx context.Context, node string, names ...string) ([]Metric, error)
	// ZtunnelLogs returns the node's ztunnel container log since t.
	ZtunnelLogs(ctx context.Context, node string, since time.Time) (string, error)
	// Amberctl runs amberctl with args next to the node's agent and
	// returns its output.
	Amberctl(ctx context.Context, node string, args ...string) (string, error)
	// MembershipDump returns the node's membership map (amber_pods) as
	// the node's tools print it.
	MembershipDump(ctx context.Context, node string) (string, error)
	// Commands returns the command lines a user types on this cluster to
	// do what the methods above do on node; the walkthrough prints them.
	Commands(ctx context.Context, node string) (Commands, error)
}

// Commands are the command lines behind NodeAccess's methods, for one
// node.
type Commands struct {
	// Metrics prints the ztunnel's Prometheus text (Metrics).
	Metrics string
	// Logs prints the ztunnel's log (ZtunnelLogs).
	Logs string
	// Amberctl runs amberctl; arguments follow it (Amberctl).
	Amberctl string
	// Membership prints the membership map (MembershipDump).
	Membership string
}

// Target is a cluster with amber installed that the walkthrough and the
// end-to-end checks run against: the local test/cluster node
// (HostTarget) or any cluster reached with a kubeconfig (NewKubeTarget).
type Target struct {
	// Kubectl runs kubectl against the cluster and returns its standard
	// output; the error carries its standard error.
	Kubectl func(ctx context.Context, args ...string) ([]byte, error)
	// Client is a clientset for the cluster.
	Client kubernetes.Interface
	// Manifests is the directory manifests are written to before
	// `kubectl apply -f`, so that the file a printed command names
	// exists.
	Manifests string
	// Nodes reads amber's state on the nodes.
	Nodes NodeAccess
	// Istioctl runs the pinned Istio's istioctl against the cluster and
	// returns its standard output; the error carries its standard error.
	// Nil: the walkthrough's L7 half (RunL7) cannot run.
	Istioctl func(ctx context.Context, args ...string) ([]byte, error)
}

// Apply writes manifest to a file named name in t.Manifests and runs
// `kubectl apply -f` on it.
func (t *Target) Apply(ctx context.Context, name, manifest string) error {
	if err := os.MkdirAll(t.Manifests, 0o755); err != nil {
		return err
	}
	f := filepath.Join(t.Manifests, name)
	if err := os.WriteFile(f, []byte(manifest), 0o644); err != nil {
		return err
	}
	_, err := t.Kubectl(ctx, "apply", "-f", f)
	return err
}

// Captured reports whether ip is in node's membership map.
func (t *Target) Captured(ctx context.Context, node, ip string) (bool, error) {
	a, err := netip.ParseAddr(ip)
	if err != nil {
		return false, err
	}
	st, err := t.Nodes.Datapath(ctx, node)
	if err != nil {
		return false, err
	}
	for _, m := range st.Members {
		if m.Addr == a {
			return true, nil
		}
	}
	return false, nil
}

// WaitRollout waits until the Deployments in ns are rolled out. When one
// is not, the error says why its pods are waiting (on a cluster without
// the test images, ErrImageNeverPull).
func (t *Target) WaitRollout(ctx context.Context, ns string, deployments ...string) error {
	for _, d := range deployments {
		if _, err := t.Kubectl(ctx, "-n", ns, "rollout", "status", "deployment/"+d, "--timeout=120s"); err != nil {
			if why := t.waiting(ctx, ns, d); why != "" {
				return fmt.Errorf("%w (pods: %s)", err, why)
			}
			return err
		}
	}
	return nil
}

// waiting describes why the pods of app are not running, "" if it cannot
// tell.
func (t *Target) waiting(ctx context.Context, ns, app string) string {
	pods, err := t.Client.CoreV1().Pods(ns).List(ctx, metav1.ListOptions{LabelSelector: "app=" + app})
	if err != nil {
		return ""
	}
	var why string
	for _, p := range pods.Items {
		for _, cs := range p.Status.ContainerStatuses {
			if w := cs.State.Waiting; w != nil {
				why += fmt.Sprintf("%s: %s %s; ", p.Name, w.Reason, w.Message)
			}
		}
	}
	return why
}

// RunningPod returns the Running, Ready pod of the app label app in ns.
func (t *Target) RunningPod(ctx context.Context, ns, app string) (*corev1.Pod, error) {
	return t.RunningPodOf(ctx, ns, "app="+app)
}

// RunningPodOf returns a Running, Ready pod in ns matching the label
// selector.
func (t *Target) RunningPodOf(ctx context.Context, ns, selector string) (*corev1.Pod, error) {
	ctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	for {
		pods, err := t.Client.CoreV1().Pods(ns).List(ctx, metav1.ListOptions{LabelSelector: selector})
		if err == nil {
			for i := range pods.Items {
				p := &pods.Items[i]
				if p.DeletionTimestamp == nil && p.Status.Phase == corev1.PodRunning && podReady(p) {
					return p, nil
				}
			}
		}
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("no running pod %s in %s: %w", selector, ns, ctx.Err())
		case <-time.After(200 * time.Millisecond):
		}
	}
}
