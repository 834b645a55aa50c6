package realnode_test

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/amber-mesh/amber/test/cluster"
	"github.com/amber-mesh/amber/test/images"
	"github.com/amber-mesh/amber/test/istiod"
	"github.com/amber-mesh/amber/test/privileged"
	"github.com/amber-mesh/amber/test/realnode"
)

// TestPrivilegedRealNodeL7 lays the ground of the walkthrough's L7 half
// on the real node, as a user gets there: Bookinfo in the default
// namespace, meshed by amber (every hop mTLS, the page naming the reviews
// pod, versions changing between requests); `istioctl waypoint apply
// --enroll-namespace` from istiod's own module; and the waypoint istiod
// deploys for it, rendered from its chart's template with amber's
// GatewayClass defaults applied — amber's image and amber-waypoint, as
// UID 1337 on a read-only root — which the chart's waypoint.enabled value
// turns off and on again.
func TestPrivilegedRealNodeL7(t *testing.T) {
	privileged.Require(t)
	log := slog.New(slog.NewTextHandler(tlog{t}, nil))
	c := cluster.Up(t, cluster.Options{Istiod: true, Logger: log})
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Minute)
	defer cancel()
	a, _ := mustInstall(t, ctx, c, log)

	const ns = "default"
	deployBookinfo(t, ctx, c, ns)

	t.Run("Bookinfo through the mesh: productpage names the reviews pod, and it changes", func(t *testing.T) {
		bookinfoMeshed(t, ctx, c, ns)
	})

	var d *appsv1.Deployment
	t.Run("istioctl waypoint apply: istiod renders the waypoint from its chart, with amber's image", func(t *testing.T) {
		t0 := time.Now()
		out, err := c.Istioctl(ctx, "waypoint", "apply", "-n", ns, "--enroll-namespace")
		t.Logf("$ istioctl waypoint apply -n %s --enroll-namespace (%v)\n%s", ns, time.Since(t0).Round(time.Millisecond), out)
		if err != nil {
			t.Fatal(err)
		}
		for _, want := range []string{"waypoint " + ns + "/waypoint applied", `labeled with "istio.io/use-waypoint: waypoint"`} {
			if !strings.Contains(string(out), want) {
				t.Errorf("istioctl said nothing like %q", want)
			}
		}
		n, err := c.Client.CoreV1().Namespaces().Get(ctx, ns, metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		if n.Labels["istio.io/use-waypoint"] != "waypoint" {
			t.Errorf("namespace labels %v, want istio.io/use-waypoint=waypoint", n.Labels)
		}
		out, err = c.Istioctl(ctx, "waypoint", "list", "-n", ns)
		if err != nil || !strings.Contains(string(out), "PROGRAMMED") || !strings.Contains(string(out), "\nwaypoint ") {
			t.Errorf("istioctl waypoint list -n %s: %v\n%s", ns, err, out)
		}
		t0 = time.Now()
		d = waitDeployment(t, ctx, c, ns, "waypoint", amberWaypoint)
		t.Logf("istiod rendered the Deployment within %v", time.Since(t0).Round(time.Millisecond))
		out, _ = c.Kubectl(ctx, "-n", ns, "get", "deployment", "waypoint", "-o", "yaml", "--show-managed-fields=false")
		t.Logf("the Deployment istiod rendered:\n%s", out)
		if err := istiod.CheckWaypointDeployment(d); err != nil {
			t.Error(err)
		}
		if p := d.Spec.Template.Spec.Containers[0].ImagePullPolicy; p != corev1.PullNever {
			t.Errorf("imagePullPolicy %s, want the chart's Never", p)
		}
	})
	if d == nil {
		t.FailNow()
	}

	t.Run("the waypoint pod runs amber-waypoint as UID 1337 on a read-only root", func(t *testing.T) {
		waypointPod(t, ctx, c, ns)
	})

	t.Run("waypoint.enabled=false gives istiod's Envoy waypoint back; true amber's again", func(t *testing.T) {
		if err := a.Upgrade(ctx, "waypoint.enabled=false"); err != nil {
			t.Fatal(err)
		}
		d := waitDeployment(t, ctx, c, ns, "waypoint", func(d *appsv1.Deployment) error {
			ctr := d.Spec.Template.Spec.Containers[0]
			if !strings.Contains(ctr.Image, "/proxyv2:") || len(ctr.Command) != 0 {
				return fmt.Errorf("image %s, command %q: still amber's", ctr.Image, ctr.Command)
			}
			return nil
		})
		if err := istiod.CheckWaypointDeployment(d); err != nil {
			t.Error(err)
		}
		if err := a.Upgrade(ctx, "waypoint.enabled=true"); err != nil {
			t.Fatal(err)
		}
		waitDeployment(t, ctx, c, ns, "waypoint", amberWaypoint)
	})
}

// bookinfoMeshed reads productpage's page from sleep until every hop of
// it (sleep → productpage → details, reviews → ratings) is mTLS, then 20
// pages in one go: each names a running reviews pod, and not all the same
// version (the ztunnel picks an endpoint per connection, and productpage
// opens one per request).
func bookinfoMeshed(t *testing.T, ctx context.Context, c *cluster.Cluster, ns string) {
	url := fmt.Sprintf("http://%s:%d/productpage", realnode.BookinfoProductpage, images.BookinfoPort)
	id := func(sa string) string { return "spiffe://cluster.local/ns/" + ns + "/sa/" + sa }
	hops := [][2]string{
		{id(realnode.Sleep), id("bookinfo-productpage")},
		{id("bookinfo-productpage"), id("bookinfo-details")},
		{id("bookinfo-productpage"), id("bookinfo-reviews")},
		{id("bookinfo-reviews"), id("bookinfo-ratings")},
	}
	// istiod learns of the annotations and pushes the workloads as HBONE;
	// until then the ztunnel passes connections through.
	waitFor(t, ctx, "mTLS on every hop of a page", func() error {
		out, err := c.Kubectl(ctx, "-n", ns, "exec", "deploy/"+realnode.Sleep, "--", "curl", "-timeout=10s", url)
		if err != nil {
			return err
		}
		if pods, _ := realnode.ReviewsPods(string(out)); len(pods) != 1 || pods[0] == "" {
			return fmt.Errorf("page without a reviews pod:\n%s", out)
		}
		ms, err := realnode.Metrics(ctx, "istio_tcp_connections_opened_total")
		if err != nil {
			return err
		}
		for _, h := range hops {
			if realnode.Sum(ms, map[string]string{"reporter": "destination", "connection_security_policy": "mutual_tls",
				"source_principal": h[0], "destination_principal": h[1]}) == 0 {
				return fmt.Errorf("no mutual_tls connection %s → %s yet", h[0], h[1])
			}
		}
		return nil
	})

	const n = 20
	args := []string{"-n", ns, "exec", "deploy/" + realnode.Sleep, "--", "curl", "-timeout=10s"}
	for range n {
		args = append(args, url)
	}
	out, err := c.Kubectl(ctx, args...)
	if err != nil {
		t.Fatal(err)
	}
	if got := strings.Count(string(out), " 200 OK\n"); got != n {
		t.Errorf("%d of %d pages answered 200", got, n)
	}
	pods, versions := realnode.ReviewsPods(string(out))
	if len(pods) != n {
		t.Fatalf("%d pages in the output, want %d:\n%s", len(pods), n, out)
	}
	running, err := c.Client.CoreV1().Pods(ns).List(ctx, metav1.ListOptions{LabelSelector: "app=" + realnode.BookinfoReviews})
	if err != nil {
		t.Fatal(err)
	}
	names := map[string]bool{}
	for _, p := range running.Items {
		names[p.Name] = true
	}
	count := map[string]int{}
	for i, p := range pods {
		if !names[p] {
			t.Errorf("page %d names %q, not a reviews pod (%v)", i, p, names)
		}
		count[versions[i]]++
	}
	t.Logf("reviews versions over %d pages: %v", n, count)
	if len(count) < 2 {
		// Three versions picked at random: all 20 alike has
		// probability 3 × 3⁻²⁰ ≈ 10⁻⁹.
		t.Errorf("every page from one reviews version: %v", count)
	}
}

// amberWaypoint accepts a waypoint Deployment whose istio-proxy container
// runs amber's image and amber-waypoint.
func amberWaypoint(d *appsv1.Deployment) error {
	cs := d.Spec.Template.Spec.Containers
	if len(cs) == 0 {
		return errors.New("no containers")
	}
	if cs[0].Image != images.Amber.Ref || !slices.Equal(cs[0].Command, realnode.WaypointCommand) {
		return fmt.Errorf("image %s, command %q, want %s and %q (amber's GatewayClass defaults)", cs[0].Image, cs[0].Command, images.Amber.Ref, realnode.WaypointCommand)
	}
	return nil
}

// waitDeployment waits until istiod's Deployment name in ns exists,
// passes ok and is rolled out to its latest generation's spec, and
// returns it.
func waitDeployment(t *testing.T, ctx context.Context, c *cluster.Cluster, ns, name string, ok func(*appsv1.Deployment) error) *appsv1.Deployment {
	t.Helper()
	var d *appsv1.Deployment
	waitFor(t, ctx, "Deployment "+name+" from istiod", func() error {
		var err error
		if d, err = c.Client.AppsV1().Deployments(ns).Get(ctx, name, metav1.GetOptions{}); err != nil {
			return err
		}
		return ok(d)
	})
	return d
}

// waypointPod checks the pod of the waypoint Deployment: it becomes
// Ready (amber-waypoint has its configuration from istiod and its
// certificate) and its process runs as 1337 on a read-only root, writing
// only into the template's emptyDirs.
func waypointPod(t *testing.T, ctx context.Context, c *cluster.Cluster, ns string) {
	pod := readyPod(t, ctx, c, ns, "gateway.networking.k8s.io/gateway-name=waypoint", "waypoint")
	pid, err := realnode.ProcessOf(realnode.WaypointCommand[0], string(pod.UID))
	if err != nil {
		t.Fatal(err)
	}
	checkConfined(t, pid, istiod.WaypointUID)
}

// checkConfined checks that process pid runs as uid (user and group, all
// four ids) on a read-only root file system.
func checkConfined(t *testing.T, pid, uid int) {
	t.Helper()
	status, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(status), "\n") {
		if f := strings.Fields(line); len(f) == 5 && (f[0] == "Uid:" || f[0] == "Gid:") {
			for _, id := range f[1:] {
				if id != strconv.Itoa(uid) {
					t.Errorf("pid %d: %s, want %d", pid, line, uid)
				}
			}
		}
	}
	mi, err := os.ReadFile(fmt.Sprintf("/proc/%d/mountinfo", pid))
	if err != nil {
		t.Fatal(err)
	}
	rootRO := false
	for _, line := range strings.Split(string(mi), "\n") {
		if f := strings.Fields(line); len(f) > 5 && f[4] == "/" {
			rootRO = slices.Contains(strings.Split(f[5], ","), "ro")
		}
	}
	if !rootRO {
		t.Errorf("pid %d has a writable root:\n%s", pid, mi)
	}
}
