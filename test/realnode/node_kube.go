package realnode

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os/exec"
	"sort"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/amber-mesh/amber/bpf"
)

// NewKubeTarget is the cluster of kubeconfig, reached with the kubectl
// binary (a name looked up in PATH, or a path) and a clientset; nodes are
// read through the API server (KubeNodes). Manifests are written to
// manifests.
func NewKubeTarget(kubeconfig, kubectl, manifests string) (*Target, error) {
	bin, err := exec.LookPath(kubectl)
	if err != nil {
		return nil, fmt.Errorf("kubectl: %w", err)
	}
	cfg, err := clientcmd.BuildConfigFromFlags("", kubeconfig)
	if err != nil {
		return nil, fmt.Errorf("load kubeconfig %s: %w", kubeconfig, err)
	}
	cfg.QPS, cfg.Burst = 50, 100
	client, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		return nil, fmt.Errorf("create clientset: %w", err)
	}
	run := func(ctx context.Context, args ...string) ([]byte, error) {
		cmd := exec.CommandContext(ctx, bin, append([]string{"--kubeconfig=" + kubeconfig}, args...)...)
		var stderr bytes.Buffer
		cmd.Stderr = &stderr
		out, err := cmd.Output()
		if err != nil {
			return out, fmt.Errorf("kubectl %s: %w: %s", strings.Join(args, " "), err, strings.TrimSpace(stderr.String()))
		}
		return out, nil
	}
	return &Target{Kubectl: run, Client: client, Manifests: manifests, Nodes: &KubeNodes{Kubectl: run, Client: client}}, nil
}

// KubeNodes reads amber's nodes with nothing but the API server, so it
// works on any cluster: amberctl runs in the agent container of the
// DaemonSet's pod on the node (`kubectl exec`), metrics come through the
// API server's pod proxy, logs from `kubectl logs`. In a cluster of many
// nodes each call goes to the pod on the node it names.
type KubeNodes struct {
	// Kubectl runs kubectl against the cluster (Target.Kubectl).
	Kubectl func(ctx context.Context, args ...string) ([]byte, error)
	// Client lists the DaemonSet's pods.
	Client kubernetes.Interface
}

var _ NodeAccess = (*KubeNodes)(nil)

// pod returns the name of the DaemonSet's running pod on node.
func (k *KubeNodes) pod(ctx context.Context, node string) (string, error) {
	if node == "" {
		return "", fmt.Errorf("no node named")
	}
	pods, err := k.Client.CoreV1().Pods(Namespace).List(ctx, metav1.ListOptions{
		LabelSelector: "app=" + DaemonSet,
		FieldSelector: fields.OneTermEqualSelector("spec.nodeName", node).String(),
	})
	if err != nil {
		return "", fmt.Errorf("amber's pod on %s: %w", node, err)
	}
	for _, p := range pods.Items {
		// The field selector is the API server's: a fake or an old
		// cache may ignore it.
		if p.Spec.NodeName == node && p.DeletionTimestamp == nil && p.Status.Phase == corev1.PodRunning {
			return p.Name, nil
		}
	}
	return "", fmt.Errorf("no running %s/%s pod on node %s", Namespace, DaemonSet, node)
}

// pods returns the DaemonSet's running pods on node, or on every node
// when node is "", by name.
func (k *KubeNodes) pods(ctx context.Context, node string) ([]string, error) {
	if node != "" {
		p, err := k.pod(ctx, node)
		if err != nil {
			return nil, err
		}
		return []string{p}, nil
	}
	pods, err := k.Client.CoreV1().Pods(Namespace).List(ctx, metav1.ListOptions{LabelSelector: "app=" + DaemonSet})
	if err != nil {
		return nil, fmt.Errorf("amber's pods: %w", err)
	}
	var out []string
	for _, p := range pods.Items {
		if p.DeletionTimestamp == nil && p.Status.Phase == corev1.PodRunning {
			out = append(out, p.Name)
		}
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("no running %s/%s pod", Namespace, DaemonSet)
	}
	sort.Strings(out)
	return out, nil
}

func execArgs(pod string) []string {
	return []string{"-n", Namespace, "exec", pod, "-c", "amber-agent", "--", "amberctl"}
}

func metricsPath(pod string) string {
	return fmt.Sprintf("/api/v1/namespaces/%s/pods/%s:15020/proxy/metrics", Namespace, pod)
}

// Datapath decodes `amberctl -o json` run in the node's agent container.
func (k *KubeNodes) Datapath(ctx context.Context, node string) (*bpf.Status, error) {
	pod, err := k.pod(ctx, node)
	if err != nil {
		return nil, err
	}
	out, err := k.Kubectl(ctx, append(execArgs(pod), "-o", "json")...)
	if err != nil {
		return nil, err
	}
	var st bpf.Status
	if err := json.Unmarshal(out, &st); err != nil {
		return nil, fmt.Errorf("amberctl -o json on %s: %w", node, err)
	}
	return &st, nil
}

// Metrics fetches the metrics of the ztunnel on node (every node's when
// node is "") through the API server's proxy to the pod's port 15020.
func (k *KubeNodes) Metrics(ctx context.Context, node string, names ...string) ([]Metric, error) {
	pods, err := k.pods(ctx, node)
	if err != nil {
		return nil, err
	}
	var all []Metric
	for _, pod := range pods {
		out, err := k.Kubectl(ctx, "get", "--raw", metricsPath(pod))
		if err != nil {
			return nil, fmt.Errorf("ztunnel metrics: %w", err)
		}
		ms, err := parseMetrics(bytes.NewReader(out), names)
		if err != nil {
			return nil, fmt.Errorf("ztunnel metrics of %s: %w", pod, err)
		}
		all = append(all, ms...)
	}
	return all, nil
}

// ZtunnelLogs returns the ztunnel container's log on node (every node's,
// one after the other, when node is "") since t.
func (k *KubeNodes) ZtunnelLogs(ctx context.Context, node string, since time.Time) (string, error) {
	pods, err := k.pods(ctx, node)
	if err != nil {
		return "", err
	}
	var b strings.Builder
	for _, pod := range pods {
		out, err := k.Kubectl(ctx, "-n", Namespace, "logs", pod, "-c", "amber-ztunnel", "--since-time="+since.UTC().Format(time.RFC3339))
		if err != nil {
			return "", err
		}
		b.Write(out)
	}
	return b.String(), nil
}

// Amberctl runs amberctl in the node's agent container.
func (k *KubeNodes) Amberctl(ctx context.Context, node string, args ...string) (string, error) {
	pod, err := k.pod(ctx, node)
	if err != nil {
		return "", err
	}
	out, err := k.Kubectl(ctx, append(execArgs(pod), args...)...)
	return string(out), err
}

// MembershipDump prints the membership map from `amberctl -o json`: the
// image has no bpftool, and the agent container holds the pins.
func (k *KubeNodes) MembershipDump(ctx context.Context, node string) (string, error) {
	st, err := k.Datapath(ctx, node)
	if err != nil {
		return "", err
	}
	members := st.Members
	if members == nil {
		members = []bpf.Member{}
	}
	out, err := json.MarshalIndent(members, "", "  ")
	if err != nil {
		return "", err
	}
	return string(out) + "\n", nil
}

// Commands returns the commands for node's pod (every pod's logs when
// node is "").
func (k *KubeNodes) Commands(ctx context.Context, node string) (Commands, error) {
	if node == "" {
		return Commands{Logs: fmt.Sprintf("kubectl -n %s logs -l app=%s -c amber-ztunnel --tail=-1", Namespace, DaemonSet)}, nil
	}
	pod, err := k.pod(ctx, node)
	if err != nil {
		return Commands{}, err
	}
	amberctl := "kubectl " + strings.Join(execArgs(pod), " ")
	return Commands{
		Metrics:    "kubectl get --raw " + metricsPath(pod),
		Logs:       fmt.Sprintf("kubectl -n %s logs %s -c amber-ztunnel", Namespace, pod),
		Amberctl:   amberctl,
		Membership: amberctl + " -o json | jq .members",
	}, nil
}
