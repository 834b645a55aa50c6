package realnode_test

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/amber-mesh/amber/bpf"
	"github.com/amber-mesh/amber/internal/testutil"
	"github.com/amber-mesh/amber/test/cluster"
	"github.com/amber-mesh/amber/test/images"
	"github.com/amber-mesh/amber/test/privileged"
	"github.com/amber-mesh/amber/test/realnode"
)

const ns = "mesh"

// TestPrivilegedRealNode installs amber with its Helm chart on a real
// node with istiod and walks through what a user does with it, in order:
// each step builds on the previous one's state.
func TestPrivilegedRealNode(t *testing.T) {
	privileged.Require(t)
	log := slog.New(slog.NewTextHandler(tlog{t}, nil))

	c := cluster.Up(t, cluster.Options{Istiod: true, Logger: log})
	// The budget starts once the node runs: a cold Up builds Kubernetes,
	// istiod and CoreDNS, bounded by the test's own deadline.
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Minute)
	defer cancel()
	a, installed := mustInstall(t, ctx, c, log)

	t.Run("Istio's ambient walkthrough (make demo)", func(t *testing.T) {
		var out strings.Builder
		w := &realnode.Walkthrough{Target: realnode.HostTarget(c), Out: &out}
		err := w.Run(ctx)
		t.Logf("walkthrough:\n%s", out.String())
		if err != nil {
			t.Fatal(err)
		}
		out.Reset()
		err = w.RunL7(ctx)
		t.Logf("walkthrough, L7 half:\n%s", out.String())
		if err != nil {
			t.Fatal(err)
		}
	})

	if _, err := c.Client.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	if err := realnode.HostTarget(c).Apply(ctx, "workloads.yaml", realnode.WorkloadsYAML(ns)); err != nil {
		t.Fatal(err)
	}
	if err := realnode.HostTarget(c).WaitRollout(ctx, ns, realnode.Productpage, realnode.Sleep, realnode.NotSleep); err != nil {
		t.Fatal(err)
	}
	url := fmt.Sprintf("http://%s.%s:%d/", realnode.Productpage, ns, images.EchoPort)

	// The Service's endpoints reach kube-proxy a moment after the pods
	// are Ready.
	waitFor(t, ctx, "productpage's endpoints", func() error {
		if out, ok := curlIn(ctx, realnode.HostTarget(c), ns, realnode.Sleep, url); !ok {
			return errors.New(out)
		}
		return nil
	})

	t.Run("unlabelled pods are untouched", func(t *testing.T) {
		before := counters(t)
		curl(t, ctx, c, realnode.Sleep, url, true)
		sleep := podOf(t, ctx, realnode.HostTarget(c), ns, realnode.Sleep)
		if captured(t, sleep.Status.PodIP) {
			t.Errorf("sleep %s captured before its namespace is labelled", sleep.Status.PodIP)
		}
		after := counters(t)
		for _, k := range []string{"assign_outbound", "assign_inbound", "assign_hbone"} {
			if after[k] != before[k] {
				t.Errorf("counter %s moved for unlabelled pods: %d → %d", k, before[k], after[k])
			}
		}
	})

	if _, err := c.Kubectl(ctx, "label", "namespace", ns, "istio.io/dataplane-mode=ambient"); err != nil {
		t.Fatal(err)
	}

	t.Run("labelled namespace: running pods are captured and meshed with mTLS", func(t *testing.T) {
		waitMeshed(t, ctx, c, ns, realnode.Productpage, realnode.Sleep, realnode.NotSleep)
		since := time.Now().Add(-time.Second)
		before := counters(t)
		// istiod learns of the annotation and pushes the workloads as
		// HBONE: until then the ztunnel uses passthrough.
		waitFor(t, ctx, "mTLS from sleep to productpage", func() error {
			curl(t, ctx, c, realnode.Sleep, url, true)
			ms, err := realnode.Metrics(ctx, "istio_tcp_connections_opened_total")
			if err != nil {
				return err
			}
			n := realnode.Sum(ms, map[string]string{
				"reporter":                   "destination",
				"connection_security_policy": "mutual_tls",
				"source_principal":           "spiffe://cluster.local/ns/" + ns + "/sa/" + realnode.Sleep,
				"destination_principal":      "spiffe://cluster.local/ns/" + ns + "/sa/" + realnode.Productpage,
			})
			if n == 0 {
				return fmt.Errorf("no mutual_tls connection sleep → productpage in the metrics yet")
			}
			return nil
		})
		after := counters(t)
		// Same node: the ztunnel takes the connection leaving sleep
		// (outbound SYN, then its packets under the Service address
		// kube-proxy translates) and reaches productpage itself.
		if after["assign_outbound"] <= before["assign_outbound"] || after["assign_established"] <= before["assign_established"] {
			t.Errorf("BPF counters did not move: before %v after %v", before, after)
		}
		ms, err := realnode.Metrics(ctx, "istio_tcp_connections_opened_total")
		if err != nil {
			t.Fatal(err)
		}
		svc := realnode.Productpage + "." + ns + ".svc.cluster.local"
		if realnode.Sum(ms, map[string]string{"reporter": "source", "destination_service": svc}) == 0 {
			t.Errorf("no connection to the Service %s in the metrics (the Service address is lost after kube-proxy's DNAT?)", svc)
		}
		logs, err := realnode.ZtunnelLogs(ctx, c, since)
		if err != nil {
			t.Fatal(err)
		}
		if !strings.Contains(logs, "src.identity=spiffe://cluster.local/ns/"+ns+"/sa/"+realnode.Sleep) {
			t.Errorf("access log has no connection from sleep's identity:\n%s", logs)
		}
	})

	t.Run("a captured pod reaches its node: CoreDNS over TCP, the API server with its token", func(t *testing.T) {
		nodeDestinations(t, ctx, c)
	})

	t.Run("a pod created after the label is captured before its first connection", func(t *testing.T) {
		since := time.Now().Add(-time.Second)
		done := runClientPod(t, ctx, realnode.HostTarget(c), ns, "first-connection", realnode.Sleep, false, url)
		logs, err := realnode.ZtunnelLogs(ctx, c, since)
		if err != nil {
			t.Fatal(err)
		}
		if !strings.Contains(logs, "src.workload="+done.Name) {
			t.Errorf("the pod's first connection is not in the ztunnel's access log:\n%s", logs)
		}
	})

	t.Run("hostNetwork pods are never captured", func(t *testing.T) {
		since := time.Now().Add(-time.Second)
		done := runClientPod(t, ctx, realnode.HostTarget(c), ns, "host-client", "", true, url)
		if captured(t, cluster.NodeIP) {
			t.Error("the node's address is in the membership map")
		}
		got, err := c.Client.CoreV1().Pods(ns).Get(ctx, done.Name, metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		if v, ok := got.Annotations["ambient.istio.io/redirection"]; ok {
			t.Errorf("hostNetwork pod annotated redirection=%s", v)
		}
		logs, err := realnode.ZtunnelLogs(ctx, c, since)
		if err != nil {
			t.Fatal(err)
		}
		if strings.Contains(logs, "src.addr="+cluster.NodeIP+":") {
			t.Errorf("a connection from the node's address went through the ztunnel:\n%s", logs)
		}
	})

	t.Run("PeerAuthentication STRICT from istiod: plaintext refused, mTLS admitted, port-level PERMISSIVE honoured", func(t *testing.T) {
		peerAuthentication(t, ctx, c, url)
	})

	t.Run("L4 AuthorizationPolicy from istiod is enforced", func(t *testing.T) {
		if err := realnode.HostTarget(c).Apply(ctx, "policy.yaml", realnode.L4PolicyYAML(ns)); err != nil {
			t.Fatal(err)
		}
		waitFor(t, ctx, "notsleep denied", func() error { return refusedIn(ctx, realnode.HostTarget(c), ns, realnode.NotSleep, url) })
		curl(t, ctx, c, realnode.Sleep, url, true)
		// The first refusal can come before istiod has sent the policy a
		// workload names (a refusal too, but not by this policy): ask
		// again until the policy's own DENY is counted.
		notsleep := "spiffe://cluster.local/ns/" + ns + "/sa/" + realnode.NotSleep
		since := time.Now().Add(-time.Second)
		err := realnode.Retry(ctx, 30*time.Second, func() error {
			if err := refusedIn(ctx, realnode.HostTarget(c), ns, realnode.NotSleep, url); err != nil {
				return err
			}
			ms, err := realnode.Metrics(ctx, "istio_tcp_connections_opened_total")
			if err != nil {
				return err
			}
			if realnode.Sum(ms, map[string]string{"reporter": "destination", "response_flags": "DENY", "source_principal": notsleep}) == 0 {
				return errors.New("no DENY connection from notsleep in the metrics")
			}
			return nil
		})
		if err != nil {
			logs, _ := realnode.ZtunnelLogs(ctx, c, since)
			t.Errorf("%v; ztunnel log since the policy:\n%s", err, logs)
		}
	})

	t.Run(fmt.Sprintf("%d pods created and deleted under traffic: all captured, no trace left", churnPods), func(t *testing.T) {
		churn(t, ctx, c)
	})

	t.Run("an address reused by a new pod has the new pod's identity", func(t *testing.T) {
		ipReuse(t, ctx, c, url)
	})

	t.Run("rollout restart: no new connection fails, none bypasses the policy", func(t *testing.T) {
		rolloutRestart(t, ctx, c, a)
	})

	t.Run("helm uninstall: capture stops, pods keep working unmeshed, the node is clean", func(t *testing.T) {
		if err := a.Uninstall(ctx); err != nil {
			t.Fatal(err)
		}
		*installed = false
		for _, p := range []string{bpf.DefaultPinRoot, realnode.RunDir} {
			if _, err := os.Stat(p); !os.IsNotExist(err) {
				t.Errorf("%s still there after uninstall (%v)", p, err)
			}
		}
		rules, err := netlink.RuleList(netlink.FAMILY_ALL)
		if err != nil {
			t.Fatal(err)
		}
		for _, r := range rules {
			if r.Table == 133 {
				t.Errorf("routing rule left: %v", r)
			}
		}
		conf, err := os.ReadFile(filepath.Join(c.CNIConfDir, "10-amber.conflist"))
		if err != nil {
			t.Fatal(err)
		}
		if strings.Contains(string(conf), "amber-cni") {
			t.Errorf("amber-cni still chained:\n%s", conf)
		}
		if _, err := os.Stat(filepath.Join(c.CNIBinDir, "amber-cni")); !os.IsNotExist(err) {
			t.Errorf("amber-cni binary left in %s (%v)", c.CNIBinDir, err)
		}
		// The policy is istiod's: without a ztunnel nothing enforces it,
		// as with Istio's own uninstall.
		curl(t, ctx, c, realnode.Sleep, url, true)
		curl(t, ctx, c, realnode.NotSleep, url, true)
	})
}

// rolloutRestart runs a steady stream of new connections from sleep and
// notsleep and 100 long-lived ones from sleep while the DaemonSet is
// restarted: every sleep connection must succeed (the datapath holds SYNs
// while no ztunnel listens; they are retransmitted), no notsleep one may.
func rolloutRestart(t *testing.T, ctx context.Context, c *cluster.Cluster, a *realnode.Amber) {
	pp := podOf(t, ctx, realnode.HostTarget(c), ns, realnode.Productpage)
	svc, err := c.Client.CoreV1().Services(ns).Get(ctx, realnode.Productpage, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	target := net.JoinHostPort(svc.Spec.ClusterIP, fmt.Sprint(images.EchoPort))
	sleepNS, err := realnode.PodNetns(ctx, c, podOf(t, ctx, realnode.HostTarget(c), ns, realnode.Sleep))
	if err != nil {
		t.Fatal(err)
	}
	notNS, err := realnode.PodNetns(ctx, c, podOf(t, ctx, realnode.HostTarget(c), ns, realnode.NotSleep))
	if err != nil {
		t.Fatal(err)
	}
	_ = pp

	var long []net.Conn
	for range 100 {
		conn, err := realnode.DialFrom(ctx, sleepNS, target)
		if err != nil {
			t.Fatalf("long-lived connection: %v", err)
		}
		if err := roundTrip(conn); err != nil {
			t.Fatalf("long-lived connection: %v", err)
		}
		long = append(long, conn)
	}
	defer func() {
		for _, c := range long {
			c.Close()
		}
	}()

	stop := make(chan struct{})
	var wg sync.WaitGroup
	var okSleep, failSleep, okNot, deniedNot atomic.Int64
	var firstErr atomic.Value
	stream := func(nsPath string, ok, bad *atomic.Int64, wantOK bool) {
		defer wg.Done()
		for {
			select {
			case <-stop:
				return
			case <-time.After(50 * time.Millisecond):
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				cctx, cancel := context.WithTimeout(ctx, 30*time.Second)
				defer cancel()
				conn, err := realnode.DialFrom(cctx, nsPath, target)
				if err == nil {
					conn.SetDeadline(time.Now().Add(30 * time.Second))
					err = roundTrip(conn)
					conn.Close()
				}
				if (err == nil) == wantOK {
					ok.Add(1)
					return
				}
				bad.Add(1)
				if wantOK {
					firstErr.CompareAndSwap(nil, err)
				}
			}()
		}
	}
	wg.Add(2)
	go stream(sleepNS, &okSleep, &failSleep, true)
	go stream(notNS, &deniedNot, &okNot, false)
	// progress waits until both streams have answered n more connections.
	progress := func(what string, n int64) {
		s, d := okSleep.Load(), deniedNot.Load()
		testutil.Eventually(t, what, func() bool { return okSleep.Load() >= s+n && deniedNot.Load() >= d+n })
	}

	progress("both streams answered before the restart", 10)
	t0 := time.Now()
	if _, err := c.Kubectl(ctx, "-n", realnode.Namespace, "rollout", "restart", "daemonset/"+realnode.DaemonSet); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Kubectl(ctx, "-n", realnode.Namespace, "rollout", "status", "daemonset/"+realnode.DaemonSet, "--timeout=180s"); err != nil {
		t.Fatal(err)
	}
	if err := a.WaitReady(ctx); err != nil {
		t.Fatal(err)
	}
	progress("both streams answered by the new ztunnel", 20)
	close(stop)
	wg.Wait()

	var survived, closed int
	for _, conn := range long {
		conn.SetDeadline(time.Now().Add(5 * time.Second))
		if err := roundTrip(conn); err == nil {
			survived++
		} else {
			closed++
		}
	}
	t.Logf("new connections during the restart: sleep %d ok / %d failed; notsleep %d denied / %d let through",
		okSleep.Load(), failSleep.Load(), deniedNot.Load(), okNot.Load())
	t.Logf("long-lived connections: %d survived, %d closed (they were proxied by the old ztunnel process, whose sockets end with it)", survived, closed)
	if failSleep.Load() != 0 {
		t.Errorf("%d new connections from sleep failed; first: %v", failSleep.Load(), firstErr.Load())
		logs, _ := realnode.ZtunnelLogs(ctx, c, t0.Add(-5*time.Second))
		for _, l := range strings.Split(logs, "\n") {
			if !strings.Contains(l, "src.identity=spiffe://cluster.local/ns/"+ns+"/sa/"+realnode.NotSleep) && (strings.Contains(l, "level=WARN") || strings.Contains(l, "level=ERROR") || strings.Contains(l, "drain") || strings.Contains(l, "ready")) {
				t.Log(l)
			}
		}
		st, _ := realnode.Datapath()
		if st != nil {
			t.Logf("counters: %v", st.Counters)
		}
	}
	if okNot.Load() != 0 {
		t.Errorf("%d connections from notsleep got through the policy during the restart", okNot.Load())
	}
	if okSleep.Load() < 20 || deniedNot.Load() < 20 {
		t.Errorf("too little traffic to judge: sleep ok %d, notsleep denied %d", okSleep.Load(), deniedNot.Load())
	}
}

// roundTrip sends one HTTP/1.1 GET / on a kept-alive connection to
// productpage and reads the full response.
func roundTrip(conn net.Conn) error { return getPage(conn, "productpage", "/") }

func counters(t *testing.T) bpf.Counters {
	t.Helper()
	st, err := realnode.Datapath()
	if err != nil {
		t.Fatal(err)
	}
	return st.Counters
}

func captured(t *testing.T, ip string) bool {
	t.Helper()
	ok, err := realnode.Captured(ip)
	if err != nil {
		t.Fatal(err)
	}
	return ok
}

func curl(t *testing.T, ctx context.Context, c *cluster.Cluster, app, url string, wantOK bool) {
	t.Helper()
	out, ok := curlIn(ctx, realnode.HostTarget(c), ns, app, url)
	if ok != wantOK {
		t.Fatalf("%s → %s: ok=%v, want %v:\n%s", app, url, ok, wantOK, out)
	}
}

type tlog struct{ t *testing.T }

func (w tlog) Write(b []byte) (int, error) {
	w.t.Log(strings.TrimRight(string(b), "\n"))
	return len(b), nil
}
