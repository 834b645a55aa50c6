package cluster

import (
	"context"
	"fmt"
	"strings"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// Status is what `amber-cluster status` reports.
type Status struct {
	// Pids maps each component to its pid; 0 for one not running.
	Pids map[string]int
	// APIServer is nil when /readyz answered ok.
	APIServer error
	// NodeReady reports the node's Ready condition.
	NodeReady bool
	// Pods counts the pods of every namespace by phase.
	Pods map[string]int
}

// Healthy reports whether every component runs and the node is Ready.
func (s Status) Healthy() bool {
	for _, pid := range s.Pids {
		if pid == 0 {
			return false
		}
	}
	return s.APIServer == nil && s.NodeReady
}

func (s Status) String() string {
	var b strings.Builder
	for _, n := range components {
		if _, ok := s.Pids[n]; !ok {
			continue
		}
		state := "stopped"
		if pid := s.Pids[n]; pid != 0 {
			state = fmt.Sprintf("running (pid %d)", pid)
		}
		fmt.Fprintf(&b, "%-24s %s\n", n, state)
	}
	api := "ready"
	if s.APIServer != nil {
		api = s.APIServer.Error()
	}
	fmt.Fprintf(&b, "%-24s %s\n%-24s %v\n%-24s %v\n", "api /readyz", api, "node Ready", s.NodeReady, "pods by phase", s.Pods)
	return b.String()
}

// Status checks the processes, the API server and the node.
func (c *Cluster) Status(ctx context.Context) Status {
	l := layout{c.Dir}
	s := Status{Pids: map[string]int{}, Pods: map[string]int{}}
	for _, n := range components {
		if n == "istiod" && !istiodEnabled(l) {
			continue
		}
		s.Pids[n] = daemonPid(l, n)
	}
	_, s.APIServer = c.Client.Discovery().RESTClient().Get().AbsPath("/readyz").DoRaw(ctx)
	if s.APIServer != nil {
		return s
	}
	if n, err := c.Client.CoreV1().Nodes().Get(ctx, c.NodeName, metav1.GetOptions{}); err == nil {
		s.NodeReady = nodeReady(n)
	}
	if pods, err := c.Client.CoreV1().Pods("").List(ctx, metav1.ListOptions{}); err == nil {
		for _, p := range pods.Items {
			s.Pods[string(p.Status.Phase)]++
		}
	}
	return s
}
