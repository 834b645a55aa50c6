package realnode_test

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/amber-mesh/amber/test/cluster"
	"github.com/amber-mesh/amber/test/images"
	"github.com/amber-mesh/amber/test/realnode"
)

// churnPods is how many pods churn creates and deletes (amber-bench
// realnode measures the capture latency and amber's footprint over as
// many).
const churnPods = 100

// churn creates churnPods pods in the labelled namespace, in batches,
// while sleep keeps opening connections to productpage, then deletes them:
// every pod is captured,
// nothing of them is left afterwards (membership, links, veths, IPAM),
// and no connection of the steady stream fails.
func churn(t *testing.T, ctx context.Context, c *cluster.Cluster) {
	target := productpageVIP(t, ctx, c)
	sleepNS, err := realnode.PodNetns(ctx, c, podOf(t, ctx, realnode.HostTarget(c), ns, realnode.Sleep))
	if err != nil {
		t.Fatal(err)
	}
	stop := make(chan struct{})
	var ok, failed atomic.Int64
	var firstErr atomic.Value
	var wg sync.WaitGroup
	wg.Go(func() {
		for {
			select {
			case <-stop:
				return
			case <-time.After(100 * time.Millisecond):
			}
			cctx, cancel := context.WithTimeout(ctx, 20*time.Second)
			conn, err := realnode.DialFrom(cctx, sleepNS, target)
			if err == nil {
				conn.SetDeadline(time.Now().Add(20 * time.Second))
				err = roundTrip(conn)
				conn.Close()
			}
			cancel()
			if err != nil {
				failed.Add(1)
				firstErr.CompareAndSwap(nil, err)
			} else {
				ok.Add(1)
			}
		}
	})
	defer func() { close(stop); wg.Wait() }()

	t0 := time.Now()
	var mu sync.Mutex
	var ips []string
	const batch = 20
	for b := 0; b < churnPods; b += batch {
		var bwg sync.WaitGroup
		for i := b; i < b+batch && i < churnPods; i++ {
			bwg.Go(func() {
				name := fmt.Sprintf("churn-%03d", i)
				created := time.Now()
				p := realnode.SleeperPod(ns, name, realnode.Sleep)
				if _, err := c.Client.CoreV1().Pods(ns).Create(ctx, p, metav1.CreateOptions{}); err != nil {
					t.Errorf("create %s: %v", name, err)
					return
				}
				ip, _, err := realnode.WaitCaptured(ctx, c.Client, ns, name, created)
				if err != nil {
					t.Errorf("%s: %v", name, err)
					return
				}
				mu.Lock()
				ips = append(ips, ip)
				mu.Unlock()
			})
		}
		bwg.Wait()
	}
	if t.Failed() {
		return
	}
	for i := range churnPods {
		name := fmt.Sprintf("churn-%03d", i)
		if err := c.Client.CoreV1().Pods(ns).Delete(ctx, name, metav1.DeleteOptions{}); err != nil {
			t.Errorf("delete %s: %v", name, err)
		}
	}
	// The kubelet tears 100 pods down one sandbox at a time: on the
	// 2-core machine under other engineers' load that took over 90 s
	// (waitFor's bound; 48 of 100 gone), as creating them takes 30 s per
	// batch of 20. amber is not on that path.
	if err := realnode.Retry(ctx, 5*time.Minute, func() error {
		pods, err := c.Client.CoreV1().Pods(ns).List(ctx, metav1.ListOptions{LabelSelector: "churn=true"})
		if err != nil {
			return err
		}
		if len(pods.Items) > 0 {
			return fmt.Errorf("%d left", len(pods.Items))
		}
		return nil
	}); err != nil {
		t.Fatalf("waiting for the churn pods gone: %v", err)
	}
	waitFor(t, ctx, "no trace of the churned pods", func() error { return noTrace(ctx, c, ips) })
	t.Logf("steady stream during the churn: %d ok, %d failed", ok.Load(), failed.Load())
	if failed.Load() > 0 {
		t.Errorf("%d connections sleep → productpage failed during the churn; first: %v", failed.Load(), firstErr.Load())
		if logs, err := realnode.ZtunnelLogs(ctx, c, t0); err == nil {
			for _, l := range strings.Split(logs, "\n") {
				if strings.Contains(l, "error=") || strings.Contains(l, "level=WARN") || strings.Contains(l, "level=ERROR") {
					t.Log(l)
				}
			}
		}
	}
}

// noTrace checks that none of ips is in the membership map, in host-local's
// allocations or on a host-side veth, and that every datapath attachment
// is on an interface that exists.
func noTrace(ctx context.Context, c *cluster.Cluster, ips []string) error {
	st, err := realnode.Datapath()
	if err != nil {
		return err
	}
	for _, m := range st.Members {
		if slices.Contains(ips, m.Addr.String()) {
			return fmt.Errorf("membership still has %s", m.Addr)
		}
	}
	for _, a := range st.Attachments {
		if !a.Live {
			return fmt.Errorf("attachment pinned at %s on vanished interface %d", a.Pin, a.Ifindex)
		}
	}
	for _, ip := range ips {
		if _, err := os.Stat(filepath.Join(c.IPAMDir, ip)); err == nil {
			return fmt.Errorf("host-local still holds %s", ip)
		}
		routes, err := netlink.RouteGet(net.ParseIP(ip))
		if err == nil && len(routes) > 0 {
			if l, err := netlink.LinkByIndex(routes[0].LinkIndex); err == nil && strings.HasPrefix(l.Attrs().Name, "veth") {
				return fmt.Errorf("%s still routed to %s", ip, l.Attrs().Name)
			}
		}
	}
	return nil
}

// ipReuse deletes a sleep pod, makes host-local hand its address to the
// next pod, and creates that pod with notsleep's service account: the
// ztunnel must know it as notsleep (refused by the policy), never as the
// sleep pod that had the address before.
func ipReuse(t *testing.T, ctx context.Context, c *cluster.Cluster, url string) {
	first := realnode.SleeperPod(ns, "reuse-first", realnode.Sleep)
	if _, err := c.Client.CoreV1().Pods(ns).Create(ctx, first, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	ip, _, err := realnode.WaitCaptured(ctx, c.Client, ns, first.Name, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	if out, err := c.Kubectl(ctx, "-n", ns, "exec", first.Name, "--", "curl", "-timeout=10s", url); err != nil {
		t.Fatalf("sleep's pod refused: %v\n%s", err, out)
	}
	if err := c.Client.CoreV1().Pods(ns).Delete(ctx, first.Name, metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, ctx, "first pod gone", func() error {
		if _, err := c.Client.CoreV1().Pods(ns).Get(ctx, first.Name, metav1.GetOptions{}); err == nil {
			return fmt.Errorf("still there")
		}
		return noTrace(ctx, c, []string{ip})
	})
	// host-local hands out the address after last_reserved_ip.
	prev := netip.MustParseAddr(ip).Prev()
	if err := os.WriteFile(filepath.Join(c.IPAMDir, "last_reserved_ip.0"), []byte(prev.String()), 0o644); err != nil {
		t.Fatal(err)
	}
	second := realnode.SleeperPod(ns, "reuse-second", realnode.NotSleep)
	if _, err := c.Client.CoreV1().Pods(ns).Create(ctx, second, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	ip2, _, err := realnode.WaitCaptured(ctx, c.Client, ns, second.Name, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	if ip2 != ip {
		t.Fatalf("host-local gave %s, not the reused %s", ip2, ip)
	}
	since := time.Now().Add(-time.Second)
	if out, err := c.Kubectl(ctx, "-n", ns, "exec", second.Name, "--", "curl", "-timeout=10s", url); err == nil {
		t.Fatalf("notsleep's pod on sleep's old address %s was let through:\n%s", ip, out)
	}
	logs, err := realnode.ZtunnelLogs(ctx, c, since)
	if err != nil {
		t.Fatal(err)
	}
	want := "src.addr=" + ip + ":"
	var line string
	for _, l := range strings.Split(logs, "\n") {
		if strings.Contains(l, want) && strings.Contains(l, "reporter=destination") {
			line = l
		}
	}
	if !strings.Contains(line, "src.identity=spiffe://cluster.local/ns/"+ns+"/sa/"+realnode.NotSleep) || !strings.Contains(line, "src.workload="+second.Name) {
		t.Errorf("the reused address is not known as the new pod:\n%s", line)
	}
	if err := c.Client.CoreV1().Pods(ns).Delete(ctx, second.Name, metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
}

func productpageVIP(t *testing.T, ctx context.Context, c *cluster.Cluster) string {
	svc, err := c.Client.CoreV1().Services(ns).Get(ctx, realnode.Productpage, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	return net.JoinHostPort(svc.Spec.ClusterIP, strconv.Itoa(images.EchoPort))
}
