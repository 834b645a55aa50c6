package realnode

import (
	"context"
	"fmt"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	"github.com/amber-mesh/amber/bpf"
	"github.com/amber-mesh/amber/test/cluster"
)

// HostTarget is the test/cluster node c: kubectl, istioctl and the
// clientset are c's, manifests go to <c.Dir>/manifests and the node is read from this
// machine (HostNode).
func HostTarget(c *cluster.Cluster) *Target {
	return &Target{Kubectl: c.Kubectl, Client: c.Client, Manifests: filepath.Join(c.Dir, "manifests"), Nodes: HostNode{C: c}, Istioctl: c.Istioctl}
}

// HostNode reads the test/cluster node from the machine it runs on: the
// pins under bpf.DefaultPinRoot, the ztunnel's metrics at
// ZtunnelMetricsURL (the DaemonSet is hostNetwork), bpftool. The cluster
// has one node, so the node arguments are not used.
type HostNode struct {
	C *cluster.Cluster
}

var _ NodeAccess = HostNode{}

// Datapath reads the pins (what amberctl reads).
func (h HostNode) Datapath(context.Context, string) (*bpf.Status, error) { return Datapath() }

// Metrics fetches the ztunnel's metrics from the node's address.
func (h HostNode) Metrics(ctx context.Context, _ string, names ...string) ([]Metric, error) {
	return Metrics(ctx, names...)
}

// ZtunnelLogs returns the ztunnel container's log since t.
func (h HostNode) ZtunnelLogs(ctx context.Context, _ string, since time.Time) (string, error) {
	return ZtunnelLogs(ctx, h.C, since)
}

// Amberctl runs amberctl in the agent container.
func (h HostNode) Amberctl(ctx context.Context, _ string, args ...string) (string, error) {
	out, err := h.C.Kubectl(ctx, append([]string{"-n", Namespace, "exec", "ds/" + DaemonSet, "-c", "amber-agent", "--", "amberctl"}, args...)...)
	return string(out), err
}

// MembershipDump runs bpftool on the membership map's pin.
func (h HostNode) MembershipDump(ctx context.Context, _ string) (string, error) {
	out, err := exec.CommandContext(ctx, "bpftool", "map", "dump", "pinned", membershipPin()).CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("bpftool: %w", err)
	}
	return string(out), nil
}

// Commands returns the commands a user of the node types.
func (h HostNode) Commands(context.Context, string) (Commands, error) {
	return Commands{
		Metrics:    "curl -s " + ZtunnelMetricsURL,
		Logs:       fmt.Sprintf("kubectl -n %s logs ds/%s -c amber-ztunnel", Namespace, DaemonSet),
		Amberctl:   fmt.Sprintf("kubectl -n %s exec ds/%s -c amber-agent -- amberctl", Namespace, DaemonSet),
		Membership: strings.Join([]string{"bpftool", "map", "dump", "pinned", membershipPin()}, " "),
	}, nil
}

func membershipPin() string { return filepath.Join(bpf.DefaultPinRoot, "amber_pods") }
