package realnode_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/amber-mesh/amber/bpf"
	"github.com/amber-mesh/amber/test/cluster"
	"github.com/amber-mesh/amber/test/realnode"
)

// nodeDestinations: a captured pod reaches servers of its own node — the
// node's CoreDNS, a host process behind the kube-dns Service, over TCP,
// and the API server behind the `kubernetes` Service with its
// service-account token (client-go in-cluster) — through the ztunnel.
// The agent set the host routing it needs under Helm (amberctl in its
// container reports it complete).
func nodeDestinations(t *testing.T, ctx context.Context, c *cluster.Cluster) {
	tg := realnode.HostTarget(c)
	out, err := tg.Nodes.Amberctl(ctx, "", "-o", "json")
	if err != nil {
		t.Fatalf("amberctl: %v\n%s", err, out)
	}
	var st bpf.Status
	if err := json.Unmarshal([]byte(out), &st); err != nil {
		t.Fatalf("amberctl -o json: %v\n%s", err, out)
	}
	if st.Routing != "ok" {
		t.Errorf("amberctl in the agent's container: host routing %q, want ok", st.Routing)
	}

	sleep := podOf(t, ctx, tg, ns, realnode.Sleep)
	since := time.Now().Add(-time.Second)
	// The pod's resolv.conf names the kube-dns Service, which kube-proxy
	// translates to CoreDNS on the node's address.
	name := "kubernetes.default.svc." + cluster.ClusterDomain + "."
	got, err := tg.Kubectl(ctx, "-n", ns, "exec", "deploy/"+realnode.Sleep, "--", "curl", "-timeout=10s", "-resolve-tcp", name)
	if err != nil {
		t.Fatalf("sleep: resolve %s over TCP: %v\n%s", name, err, got)
	}
	if !strings.Contains(string(got), cluster.KubernetesServiceIP) {
		t.Errorf("sleep resolved %s over TCP to %q, want %s", name, got, cluster.KubernetesServiceIP)
	}
	got, err = tg.Kubectl(ctx, "-n", ns, "exec", "deploy/"+realnode.Sleep, "--", "curl", "-timeout=10s", "-whoami")
	if err != nil {
		t.Fatalf("sleep: whoami through the kubernetes Service: %v\n%s", err, got)
	}
	if want := "system:serviceaccount:" + ns + ":" + realnode.Sleep; strings.TrimSpace(string(got)) != want {
		t.Errorf("the API server authenticated sleep as %q, want %q", got, want)
	}
	// Both went through the ztunnel, from sleep's address. istiod
	// describes both Services and their endpoints (workloads made from
	// their EndpointSlices, at the node's address), so the ztunnel dials
	// the node's address itself rather than passing the Service address
	// through to kube-proxy.
	for _, s := range []struct{ dst, service string }{
		{net.JoinHostPort(cluster.DNSServiceIP, "53"), "kube-dns.kube-system.svc." + cluster.ClusterDomain},
		{net.JoinHostPort(cluster.KubernetesServiceIP, "443"), "kubernetes.default.svc." + cluster.ClusterDomain},
	} {
		waitFor(t, ctx, "the access-log line of sleep → "+s.dst, func() error {
			logs, err := realnode.ZtunnelLogs(ctx, c, since)
			if err != nil {
				return err
			}
			line, ok := realnode.FindLogLine(logs, func(r realnode.LogRecord) bool {
				return r["reporter"] == "source" && strings.HasPrefix(r["src.addr"], sleep.Status.PodIP+":") && r["dst.addr"] == s.dst
			})
			if !ok {
				return errors.New("no such line")
			}
			r, _ := realnode.ParseLogLine(line)
			if r["dst.service"] != s.service || r["dst.workload"] == "" || r["error"] != "" {
				return fmt.Errorf("want the Service %s, an endpoint workload and no error: %s", s.service, line)
			}
			return nil
		})
	}
}
