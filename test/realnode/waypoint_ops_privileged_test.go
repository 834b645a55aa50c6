package realnode_test

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/dynamic"
	"sigs.k8s.io/yaml"

	"github.com/amber-mesh/amber/test/cluster"
	"github.com/amber-mesh/amber/test/images"
	"github.com/amber-mesh/amber/test/istiod"
	"github.com/amber-mesh/amber/test/privileged"
	"github.com/amber-mesh/amber/test/realnode"
)

// policyDeadline is how soon after `kubectl apply` a changed L7 policy
// must be enforced (issue 14).
const policyDeadline = 2 * time.Second

// TestPrivilegedRealNodeWaypointOps runs the walkthrough's namespace
// waypoint (Bookinfo, `istioctl waypoint apply --enroll-namespace`, the
// GET-only policy for productpage) through what operators do to it:
// `istioctl proxy-config routes` on its pod, a policy change, istiod
// restarted, the waypoint's Deployment rolled under load, and the
// waypoint gone. Requests come from sleep's and notsleep's own network
// namespaces (captured by amber as theirs) to productpage's Service
// address.
func TestPrivilegedRealNodeWaypointOps(t *testing.T) {
	privileged.Require(t)
	log := slog.New(slog.NewTextHandler(tlog{t}, nil))
	c := cluster.Up(t, cluster.Options{Istiod: true, Logger: log})
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Minute)
	defer cancel()
	mustInstall(t, ctx, c, log)
	tg := realnode.HostTarget(c)

	const ns = "default"
	deployBookinfo(t, ctx, c, ns)
	if out, err := c.Istioctl(ctx, "waypoint", "apply", "-n", ns, "--enroll-namespace", "--wait"); err != nil {
		t.Fatalf("istioctl waypoint apply: %v\n%s", err, out)
	}
	waitDeployment(t, ctx, c, ns, realnode.Waypoint, amberWaypoint)
	waypointPod(t, ctx, c, ns)
	if err := tg.Apply(ctx, "productpage-viewer.yaml", istiod.ViewerPolicy(ns, realnode.BookinfoProductpage, "GET")); err != nil {
		t.Fatal(err)
	}

	p := newPageClients(t, ctx, c, ns)
	waitFor(t, ctx, "the L7 policy enforced", p.enforced)

	t.Run("istioctl proxy-config routes on the waypoint pod prints its routes", func(t *testing.T) {
		pod, err := tg.RunningPodOf(ctx, ns, "gateway.networking.k8s.io/gateway-name="+realnode.Waypoint)
		if err != nil {
			t.Fatal(err)
		}
		out, err := c.Istioctl(ctx, "proxy-config", "routes", pod.Name+"."+ns)
		t.Logf("$ istioctl proxy-config routes %s.%s\n%s", pod.Name, ns, out)
		if err != nil {
			t.Fatal(err)
		}
		for _, svc := range []string{"productpage", "details", "reviews", "ratings"} {
			if fqdn := svc + "." + ns + ".svc.cluster.local"; !strings.Contains(string(out), fqdn) {
				t.Errorf("no route for %s", fqdn)
			}
		}
		if !strings.HasPrefix(string(out), "NAME") {
			t.Errorf("no table header")
		}
	})

	t.Run(fmt.Sprintf("a policy change is enforced within %v", policyDeadline), func(t *testing.T) {
		open := strings.Replace(istiod.ViewerPolicy(ns, realnode.BookinfoProductpage, "GET"),
			"- cluster.local/ns/"+ns+"/sa/sleep\n", "- cluster.local/ns/"+ns+"/sa/sleep\n        - cluster.local/ns/"+ns+"/sa/"+realnode.NotSleep+"\n", 1)
		for _, step := range []struct {
			what, manifest string
			enforced       func() error
		}{
			{"notsleep admitted", open, func() error { return p.status(p.notsleep, http.MethodGet, http.StatusOK) }},
			{"notsleep denied again", istiod.ViewerPolicy(ns, realnode.BookinfoProductpage, "GET"), func() error { return p.denied(p.notsleep, http.MethodGet) }},
		} {
			t0 := time.Now()
			if err := applyPolicy(ctx, c, step.manifest); err != nil {
				t.Fatal(err)
			}
			applied := time.Since(t0)
			var err error
			for time.Since(t0) < 2*policyDeadline {
				if err = step.enforced(); err == nil {
					break
				}
			}
			took := time.Since(t0)
			t.Logf("%s: enforced %v after the apply was sent (the API server answered it in %v)", step.what, took.Round(time.Millisecond), applied.Round(time.Millisecond))
			if err != nil || took > policyDeadline {
				t.Errorf("%s: not enforced within %v (%v): %v", step.what, policyDeadline, took.Round(time.Millisecond), err)
			}
		}
	})

	t.Run("istiod restarted: the L7 policy is enforced during the outage and after", func(t *testing.T) {
		if err := c.StopIstiod(); err != nil {
			t.Fatal(err)
		}
		restarted := false
		defer func() {
			if !restarted {
				if err := c.StartIstiod(context.WithoutCancel(ctx)); err != nil {
					t.Errorf("restart istiod: %v", err)
				}
			}
		}()
		// Several rounds over fresh connections: the ztunnels and the
		// waypoint keep their last configuration while istiod is away.
		for i := range 5 {
			if err := p.enforced(); err != nil {
				t.Errorf("istiod down, round %d: %v", i, err)
			}
		}
		if err := c.StartIstiod(ctx); err != nil {
			t.Fatal(err)
		}
		restarted = true
		// The waypoint and the ztunnel reconnect; nothing must change
		// while they resynchronise, nor after.
		waitFor(t, ctx, "the waypoint back on istiod's xDS", func() error { return xdsConnects(ctx, tg, ns, 2) })
		for i := range 5 {
			if err := p.enforced(); err != nil {
				t.Errorf("istiod back, round %d: %v", i, err)
			}
		}
	})

	t.Run("the waypoint's Deployment rolled under 20 GET/s: no request fails", func(t *testing.T) {
		old, err := tg.RunningPodOf(ctx, ns, "gateway.networking.k8s.io/gateway-name="+realnode.Waypoint)
		if err != nil {
			t.Fatal(err)
		}
		lctx, stop := context.WithCancel(ctx)
		defer stop()
		load := realnode.StartLoad(lctx, 20, p.page)
		answered := func(what string, n int) {
			ok0, bad0 := load.Answered()
			waitFor(t, ctx, what, func() error {
				if ok, bad := load.Answered(); ok+bad < ok0+bad0+n {
					return fmt.Errorf("%d of %d answered", ok+bad-ok0-bad0, n)
				}
				return nil
			})
		}
		answered("40 requests before the restart", 40)
		t0 := time.Now()
		if out, err := c.Kubectl(ctx, "-n", ns, "rollout", "restart", "deployment/"+realnode.Waypoint); err != nil {
			t.Fatalf("%v\n%s", err, out)
		}
		if out, err := c.Kubectl(ctx, "-n", ns, "rollout", "status", "deployment/"+realnode.Waypoint, "--timeout=180s"); err != nil {
			t.Fatalf("%v\n%s", err, out)
		}
		waitFor(t, ctx, "the old waypoint pod gone", func() error {
			if _, err := c.Client.CoreV1().Pods(ns).Get(ctx, old.Name, metav1.GetOptions{}); err == nil {
				return fmt.Errorf("%s still there", old.Name)
			}
			return nil
		})
		t.Logf("rolled in %v", time.Since(t0).Round(time.Millisecond))
		answered("40 requests after the old pod is gone", 40)
		stop()
		l := load.Wait()
		t.Logf("sleep GET /productpage at 20/s across the roll: %d ok, %d failed (%d started late); p50 %v p99 %v",
			l.OK, l.Failed, l.Late, l.Quantile(0.5).Round(time.Millisecond), l.Quantile(0.99).Round(time.Millisecond))
		if l.Failed != 0 {
			t.Errorf("%d requests failed; first: %q", l.Failed, l.Errors)
		}
		if err := p.enforced(); err != nil {
			t.Errorf("after the roll: %v", err)
		}
	})

	t.Run("the waypoint gone: requests to productpage fail, none bypasses it", func(t *testing.T) {
		since := metav1.Now()
		// The Deployment is the user's to scale (istiod renders no
		// replicas); the Gateway stays, Programmed once, its address
		// published: productpage is still bound to it.
		if out, err := c.Kubectl(ctx, "-n", ns, "scale", "deployment/"+realnode.Waypoint, "--replicas=0"); err != nil {
			t.Fatalf("%v\n%s", err, out)
		}
		scaledBack := false
		defer func() {
			if !scaledBack {
				c.Kubectl(context.WithoutCancel(ctx), "-n", ns, "scale", "deployment/"+realnode.Waypoint, "--replicas=1")
			}
		}()
		waitFor(t, ctx, "no waypoint pod", func() error {
			pods, err := c.Client.CoreV1().Pods(ns).List(ctx, metav1.ListOptions{LabelSelector: "gateway.networking.k8s.io/gateway-name=" + realnode.Waypoint})
			if err != nil {
				return err
			}
			if len(pods.Items) > 0 {
				return fmt.Errorf("%d pods left", len(pods.Items))
			}
			return nil
		})
		direct0 := directToProductpage(t, ctx, ns)
		// Sleep's GETs (allowed by the policy), sleep's DELETEs and
		// notsleep's GETs (forbidden by it): none may be answered.
		var answered []string
		for range 10 {
			for _, r := range []struct {
				who    string
				c      *http.Client
				method string
			}{{"sleep", p.sleep, http.MethodGet}, {"sleep", p.sleep, http.MethodDelete}, {"notsleep", p.notsleep, http.MethodGet}} {
				if resp, err := p.do(r.c, r.method); err == nil {
					answered = append(answered, fmt.Sprintf("%s %s → %d", r.who, r.method, resp.Status))
				}
			}
		}
		if len(answered) > 0 {
			t.Errorf("answered without a waypoint: %q", answered)
		}
		if d := directToProductpage(t, ctx, ns) - direct0; d != 0 {
			t.Errorf("productpage's ztunnel accepted %v connections straight from sleep or notsleep", d)
		}
		if out, err := c.Kubectl(ctx, "-n", ns, "scale", "deployment/"+realnode.Waypoint, "--replicas=1"); err != nil {
			t.Fatalf("%v\n%s", err, out)
		}
		scaledBack = true
		waypointPod(t, ctx, c, ns)
		waitFor(t, ctx, "the policy enforced by the new waypoint", p.enforced)
		// productpage logs every request it serves: a DELETE there got
		// past the policy at some point of the test.
		logs, err := c.Client.CoreV1().Pods(ns).GetLogs(podOf(t, ctx, tg, ns, realnode.BookinfoProductpage).Name,
			&corev1.PodLogOptions{SinceTime: &since}).DoRaw(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if strings.Contains(string(logs), " DELETE ") {
			t.Errorf("productpage served a DELETE:\n%s", logs)
		}
	})

	t.Run("an HTTPRoute split at reviews' own waypoint", func(t *testing.T) {
		reviewsWaypointSplit(t, ctx, c, p, ns)
	})
}

// reviewsWaypointSplit splits reviews 90/10 with an HTTPRoute while
// reviews is bound to a waypoint of its own (the 2022 walkthrough's
// per-service waypoint) and its backends reviews-v1/v2 to the
// namespace's: every page must carry reviews from v1 or v2. What the
// waypoint was given is logged (`istioctl proxy-config`), to tell a
// waypoint fault from istiod's configuration.
func reviewsWaypointSplit(t *testing.T, ctx context.Context, c *cluster.Cluster, p *pageClients, ns string) {
	tg := realnode.HostTarget(c)
	if out, err := c.Istioctl(ctx, "waypoint", "apply", "-n", ns, "--name", realnode.ReviewsWaypoint, "--wait"); err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	if out, err := c.Kubectl(ctx, "-n", ns, "label", "service", realnode.BookinfoReviews, "istio.io/use-waypoint="+realnode.ReviewsWaypoint); err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	waitDeployment(t, ctx, c, ns, realnode.ReviewsWaypoint, amberWaypoint)
	if err := tg.WaitRollout(ctx, ns, realnode.ReviewsWaypoint); err != nil {
		t.Fatal(err)
	}
	// Until reviews-waypoint serves reviews, v3 answers a third of the
	// pages through the namespace's waypoint.
	if err := tg.Apply(ctx, "reviews-90-10-httproute.yaml", istiod.ReviewsRoute9010(ns)); err != nil {
		t.Fatal(err)
	}
	defer c.Kubectl(context.WithoutCancel(ctx), "-n", ns, "delete", "--ignore-not-found", "httproute/"+realnode.BookinfoReviews)
	pod, err := tg.RunningPodOf(ctx, ns, "gateway.networking.k8s.io/gateway-name="+realnode.ReviewsWaypoint)
	if err != nil {
		t.Fatal(err)
	}
	var last string
	err = realnode.Retry(ctx, 60*time.Second, func() error {
		count := map[string]int{}
		for range 20 {
			r, err := realnode.Get(ctx, p.sleep, http.MethodGet, p.url, p.host)
			if err := realnode.PageError(r, err); err != nil {
				last = r.Body
				return err
			}
			_, versions := realnode.ReviewsPods(r.Body)
			for _, v := range versions {
				count[v]++
			}
		}
		if count["v3"] > 0 || count["v1"]+count["v2"] == 0 {
			return fmt.Errorf("reviews versions %v", count)
		}
		t.Logf("20 pages through reviews-waypoint's split: %v", count)
		return nil
	})
	if err != nil {
		t.Errorf("HTTPRoute split at %s: %v\nlast page:\n%s", realnode.ReviewsWaypoint, err, last)
	}
	for _, args := range [][]string{
		{"proxy-config", "routes", pod.Name + "." + ns},
		{"proxy-config", "clusters", pod.Name + "." + ns},
		{"proxy-config", "endpoints", pod.Name + "." + ns},
		{"proxy-config", "clusters", pod.Name + "." + ns, "--fqdn", "reviews-v1.default.svc.cluster.local", "-o", "json"},
	} {
		out, err := c.Istioctl(ctx, args...)
		t.Logf("$ istioctl %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	out, _ := c.Kubectl(ctx, "-n", ns, "logs", pod.Name, "--tail=5")
	t.Logf("%s log tail:\n%s", pod.Name, out)
	// amber-waypoint NACKs what it refuses, and istiod logs the reason.
	if log, err := os.ReadFile(filepath.Join(c.Dir, "logs", "istiod.log")); err == nil {
		for _, line := range strings.Split(string(log), "\n") {
			if strings.Contains(line, "ACK ERROR") && strings.Contains(line, realnode.ReviewsWaypoint) {
				t.Logf("istiod: %.2000s", line)
			}
		}
	}
	out, _ = c.Kubectl(ctx, "-n", ns, "logs", "deploy/productpage-v1", "--tail=10")
	t.Logf("productpage log tail:\n%s", out)
}

// pageClients send requests to productpage's Service address from sleep
// and from notsleep.
type pageClients struct {
	ctx             context.Context
	sleep, notsleep *http.Client
	url, host       string
}

func newPageClients(t *testing.T, ctx context.Context, c *cluster.Cluster, ns string) *pageClients {
	t.Helper()
	tg := realnode.HostTarget(c)
	svc, err := c.Client.CoreV1().Services(ns).Get(ctx, realnode.BookinfoProductpage, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	port := strconv.Itoa(images.BookinfoPort)
	p := &pageClients{ctx: ctx,
		url:  "http://" + net.JoinHostPort(svc.Spec.ClusterIP, port) + "/productpage",
		host: realnode.BookinfoProductpage + ":" + port}
	for _, x := range []struct {
		app string
		c   **http.Client
	}{{realnode.Sleep, &p.sleep}, {realnode.NotSleep, &p.notsleep}} {
		nsPath, err := realnode.PodNetns(ctx, c, podOf(t, ctx, tg, ns, x.app))
		if err != nil {
			t.Fatal(err)
		}
		*x.c = realnode.PodClient(nsPath, 10*time.Second, false)
	}
	return p
}

func (p *pageClients) do(c *http.Client, method string) (realnode.Response, error) {
	return realnode.Get(p.ctx, c, method, p.url, p.host)
}

// page GETs the page from sleep: nil for a whole page.
func (p *pageClients) page(ctx context.Context) error {
	r, err := realnode.Get(ctx, p.sleep, http.MethodGet, p.url, p.host)
	return realnode.PageError(r, err)
}

// status checks that method from c is answered with status.
func (p *pageClients) status(c *http.Client, method string, status int) error {
	r, err := p.do(c, method)
	if err != nil {
		return err
	}
	if r.Status != status {
		return fmt.Errorf("%s: %d, want %d", method, r.Status, status)
	}
	return nil
}

// denied checks that method from c is refused by the waypoint's RBAC.
func (p *pageClients) denied(c *http.Client, method string) error {
	r, err := p.do(c, method)
	if err != nil {
		return err
	}
	if r.Status != http.StatusForbidden || r.Body != "RBAC: access denied" {
		return fmt.Errorf("%s: %d %q, want 403 RBAC: access denied", method, r.Status, r.Body)
	}
	return nil
}

// enforced checks the walkthrough's GET-only policy: sleep GET → a whole
// page, sleep DELETE → 403, notsleep GET → 403.
func (p *pageClients) enforced() error {
	return errors.Join(
		p.page(p.ctx),
		p.denied(p.sleep, http.MethodDelete),
		p.denied(p.notsleep, http.MethodGet),
	)
}

// directToProductpage counts the connections productpage's ztunnel
// accepted from sleep or notsleep themselves: with the waypoint in the
// path it sees the waypoint's identity instead, so any is a bypass.
func directToProductpage(t *testing.T, ctx context.Context, ns string) float64 {
	t.Helper()
	ms, err := realnode.Metrics(ctx, "istio_tcp_connections_opened_total")
	if err != nil {
		t.Fatal(err)
	}
	var n float64
	for _, src := range []string{realnode.Sleep, realnode.NotSleep} {
		n += realnode.Sum(ms, map[string]string{"reporter": "destination",
			"source_principal":      "spiffe://cluster.local/ns/" + ns + "/sa/" + src,
			"destination_principal": "spiffe://cluster.local/ns/" + ns + "/sa/bookinfo-productpage"})
	}
	return n
}

// applyPolicy server-side-applies the AuthorizationPolicy in manifest
// with one request to the API server, as `kubectl apply --server-side`
// does once kubectl has started and read the API's discovery: what is
// timed is the mesh's reaction, not kubectl's start on a busy machine
// (which took 11 s there once).
func applyPolicy(ctx context.Context, c *cluster.Cluster, manifest string) error {
	var obj unstructured.Unstructured
	if err := yaml.Unmarshal([]byte(manifest), &obj.Object); err != nil {
		return err
	}
	body, err := obj.MarshalJSON()
	if err != nil {
		return err
	}
	dc, err := dynamic.NewForConfig(c.Config)
	if err != nil {
		return err
	}
	gvr := schema.GroupVersionResource{Group: "security.istio.io", Version: "v1", Resource: "authorizationpolicies"}
	force := true
	_, err = dc.Resource(gvr).Namespace(obj.GetNamespace()).Patch(ctx, obj.GetName(), types.ApplyPatchType, body,
		metav1.PatchOptions{FieldManager: "amber-test", Force: &force})
	return err
}

// xdsConnects checks that the namespace's waypoint has connected to
// istiod at least n times (amber_xds_events_total{event="connects"}).
func xdsConnects(ctx context.Context, tg *realnode.Target, ns string, n float64) error {
	pod, err := tg.RunningPodOf(ctx, ns, "gateway.networking.k8s.io/gateway-name="+realnode.Waypoint)
	if err != nil {
		return err
	}
	out, err := tg.Kubectl(ctx, "get", "--raw", "/api/v1/namespaces/"+ns+"/pods/"+pod.Name+realnode.WaypointStatsPath)
	if err != nil {
		return err
	}
	for _, line := range strings.Split(string(out), "\n") {
		if v, ok := strings.CutPrefix(line, `amber_xds_events_total{event="connects"} `); ok {
			got, _ := strconv.ParseFloat(v, 64)
			if got >= n {
				return nil
			}
			return fmt.Errorf("%v connects, want %v", got, n)
		}
	}
	return errors.New("no amber_xds_events_total{event=\"connects\"}")
}
