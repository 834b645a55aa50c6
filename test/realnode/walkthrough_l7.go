package realnode

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"math"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/amber-mesh/amber/test/images"
	"github.com/amber-mesh/amber/test/istiod"
)

// The walkthrough's L7 half (RunL7), in the form a current istiod
// accepts; README "The L7 half" lists where it differs from the 2022
// walkthrough and why.
const (
	// Waypoint is the namespace's waypoint, as `istioctl waypoint apply`
	// names it.
	Waypoint = "waypoint"
	// ReviewsWaypoint is the waypoint of the reviews Service alone (the
	// walkthrough's per-service waypoint).
	ReviewsWaypoint = "reviews-waypoint"
	// WaypointStatsPath is where a waypoint serves Istio's metrics, on
	// its port 15020.
	WaypointStatsPath = ":15020/proxy/stats/prometheus"
	// SplitRequests is how many pages the traffic split is counted over,
	// and SplitV1 the share of reviews-v1 in it.
	SplitRequests = 100
	SplitV1       = 0.9
	// SplitAlpha is the chance that a correct 90/10 split fails the
	// count: reviews-v1 in [77, 99] of 100. 100 of 100 (probability
	// 2.7·10⁻⁵) fails it, so that a split that never picks v2 cannot pass.
	SplitAlpha = 1e-4
)

// WaypointCommand is the command amber's chart gives istiod's waypoint
// container.
var WaypointCommand = []string{"/usr/local/bin/amber-waypoint"}

// RunL7 plays the walkthrough's L7 half after Run, in the same namespace:
// a waypoint for the namespace (`istioctl waypoint apply
// --enroll-namespace --wait`, istiod's deployment controller running
// amber-waypoint), the L7 policy replacing the L4 one (sleep GET 200,
// sleep DELETE and notsleep 403 `RBAC: access denied`),
// istio_requests_total from the waypoint's 15020, a waypoint for reviews
// alone with the 2022 form of the 90/10 split (VirtualService +
// DestinationRule), then the current form (HTTPRoute) at the namespace's
// waypoint, each counted over SplitRequests pages (from sleep, and
// through the ingress gateway too when IstioFiles is set), and the
// walkthrough's clean-up. The first expectation that fails is returned;
// the clean-up runs either way and its error is joined.
func (w *Walkthrough) RunL7(ctx context.Context) (err error) {
	t := w.Target
	if t.Istioctl == nil {
		return errors.New("the L7 walkthrough needs istioctl (Target.Istioctl)")
	}
	ns := w.Namespace
	if ns == "" {
		ns = "default"
	}
	defer func() { err = errors.Join(err, w.cleanupL7(ctx, ns)) }()

	w.step("Deploy a waypoint for the namespace: istiod runs amber-waypoint in it")
	if _, err := w.istioctl(ctx, "waypoint", "apply", "-n", ns, "--enroll-namespace", "--wait"); err != nil {
		return err
	}
	if _, err := w.kubectl(ctx, "-n", ns, "get", "gateway", Waypoint); err != nil {
		return err
	}
	if st, err := t.Kubectl(ctx, "-n", ns, "get", "gateway", Waypoint, "-o", `jsonpath={.status.conditions[?(@.type=="Programmed")].status}`); err != nil || string(st) != "True" {
		return fmt.Errorf("gateway %s/%s is not Programmed: %q %v", ns, Waypoint, st, err)
	}
	if err := w.amberWaypoint(ctx, ns, Waypoint); err != nil {
		return err
	}

	w.step("Enforce L7 authorization: sleep may GET productpage, nothing else")
	// The L4 policy's name, so that this replaces it: the destination's
	// ztunnel would otherwise see the waypoint's identity and deny.
	policy := "productpage-viewer-l7-" + ns + ".yaml"
	viewer := istiod.ViewerPolicy(ns, BookinfoProductpage, "GET")
	w.shell("kubectl apply -f " + filepath.Join(t.Manifests, policy))
	w.output(viewer)
	if err := t.Apply(ctx, policy, viewer); err != nil {
		return err
	}
	url := fmt.Sprintf("http://%s:%d/productpage", BookinfoProductpage, images.BookinfoPort)
	if ns != "default" {
		url = fmt.Sprintf("http://%s.%s:%d/productpage", BookinfoProductpage, ns, images.BookinfoPort)
	}
	curl := func(app string, args ...string) []string {
		return append([]string{"-n", ns, "exec", "deploy/" + app, "--", "curl", "-timeout=10s"}, append(args, url)...)
	}
	// istiod pushes the policy to the waypoint, and the L4 policy it
	// replaces away from productpage's ztunnel, a moment after the apply.
	if err := Retry(ctx, 60*time.Second, func() error {
		if out, err := t.Kubectl(ctx, curl(Sleep)...); err != nil {
			return fmt.Errorf("sleep GET: %w\n%s", err, out)
		}
		out, err := t.Kubectl(ctx, curl(NotSleep)...)
		return deniedByWaypoint("notsleep GET", string(out), err)
	}); err != nil {
		return fmt.Errorf("L7 policy not enforced: %w", err)
	}
	if out, err := w.kubectlHead(ctx, 1, curl(Sleep)...); err != nil {
		return fmt.Errorf("sleep GET refused: %w\n%s", err, out)
	}
	out, err := w.kubectl(ctx, curl(Sleep, "-X", "DELETE")...)
	if err := deniedByWaypoint("sleep DELETE", out, err); err != nil {
		return err
	}
	out, err = w.kubectl(ctx, curl(NotSleep)...)
	if err := deniedByWaypoint("notsleep GET", out, err); err != nil {
		return err
	}

	w.step("Read the waypoint's L7 metrics (istio_requests_total on its 15020)")
	pod, err := t.RunningPodOf(ctx, ns, "gateway.networking.k8s.io/gateway-name="+Waypoint)
	if err != nil {
		return err
	}
	raw := "/api/v1/namespaces/" + ns + "/pods/" + pod.Name + WaypointStatsPath
	out, err = w.kubectlGrep(ctx, "istio_requests_total", "get", "--raw", raw)
	if err != nil {
		return err
	}
	ms, err := parseMetrics(strings.NewReader(out), []string{"istio_requests_total"})
	if err != nil {
		return err
	}
	sleepID := fmt.Sprintf("spiffe://cluster.local/ns/%s/sa/%s", ns, Sleep)
	notID := fmt.Sprintf("spiffe://cluster.local/ns/%s/sa/%s", ns, NotSleep)
	for _, want := range []map[string]string{
		{"reporter": "waypoint", "response_code": "200", "source_principal": sleepID},
		{"reporter": "waypoint", "response_code": "403", "source_principal": sleepID},
		{"reporter": "waypoint", "response_code": "403", "source_principal": notID},
	} {
		if Sum(ms, want) == 0 {
			return fmt.Errorf("no istio_requests_total with %v", want)
		}
	}

	w.step("Deploy a waypoint for reviews alone")
	if _, err := w.istioctl(ctx, "waypoint", "apply", "-n", ns, "--name", ReviewsWaypoint, "--wait"); err != nil {
		return err
	}
	if _, err := w.kubectl(ctx, "-n", ns, "label", "service", BookinfoReviews, "istio.io/use-waypoint="+ReviewsWaypoint); err != nil {
		return err
	}
	if err := w.amberWaypoint(ctx, ns, ReviewsWaypoint); err != nil {
		return err
	}

	pages := func() ([]string, error) {
		args := []string{"-n", ns, "exec", "deploy/" + Sleep, "--", "curl", "-timeout=10s"}
		for range 20 {
			args = append(args, url)
		}
		out, err := t.Kubectl(ctx, args...)
		_, versions := ReviewsPods(string(out))
		return versions, err
	}
	split := func(form string, objects ...string) error {
		for i := 0; i < len(objects); i += 2 {
			w.shell("kubectl apply -f " + filepath.Join(t.Manifests, objects[i]))
			w.output(objects[i+1])
			if err := t.Apply(ctx, objects[i], objects[i+1]); err != nil {
				return err
			}
		}
		// Until the waypoint has the route, reviews-v3 answers a third
		// of the pages: 20 pages in a row without it.
		if err := Retry(ctx, 60*time.Second, func() error {
			vs, err := pages()
			if err != nil {
				return err
			}
			for _, v := range vs {
				if v != "v1" && v != "v2" {
					return fmt.Errorf("a page from reviews %q", v)
				}
			}
			return nil
		}); err != nil {
			return fmt.Errorf("%s not in effect: %w", form, err)
		}
		if err := w.countSplit(ctx, ns, url); err != nil {
			return err
		}
		if w.IstioFiles == "" {
			return nil
		}
		// The 2022 walkthrough counts through the ingress gateway.
		return w.countSplit(ctx, ns, IngressURL)
	}
	unsplit := func(names ...string) error {
		for _, n := range names {
			if _, err := w.kubectl(ctx, "-n", ns, "delete", n); err != nil {
				return err
			}
		}
		// reviews-v3 answers again once the waypoint lost the route.
		return Retry(ctx, 60*time.Second, func() error {
			vs, err := pages()
			if err != nil {
				return err
			}
			for _, v := range vs {
				if v == "v3" {
					return nil
				}
			}
			return fmt.Errorf("no page from reviews-v3 in %v", vs)
		})
	}

	w.step("Split reviews 90/10 between v1 and v2: VirtualService + DestinationRule (the 2022 form)")
	if err := split("the VirtualService", "reviews-90-10-vs-"+ns+".yaml", istiod.ReviewsVirtualService9010(ns)); err != nil {
		return err
	}
	if err := unsplit("virtualservice/"+BookinfoReviews, "destinationrule/"+BookinfoReviews); err != nil {
		return err
	}

	// The current walkthrough splits at the namespace's waypoint, which
	// also serves the backends reviews-v1 and reviews-v2: reviews goes
	// back to it. (A split at reviews-waypoint, whose backends' Services
	// are bound to the namespace's waypoint, goes through istiod's
	// outbound clusters: TestPrivilegedRealNodeWaypointOps.)
	w.step("Split reviews 90/10 between v1 and v2: Gateway API HTTPRoute at the namespace's waypoint (the current form)")
	if _, err := w.kubectl(ctx, "-n", ns, "label", "service", BookinfoReviews, "istio.io/use-waypoint-"); err != nil {
		return err
	}
	if err := split("the HTTPRoute", "bookinfo-versions-"+ns+".yaml", BookinfoVersionsYAML(ns),
		"reviews-90-10-httproute-"+ns+".yaml", istiod.ReviewsRoute9010(ns)); err != nil {
		return err
	}
	return unsplit("httproute/" + BookinfoReviews)
}

// countSplit reads SplitRequests pages from sleep, counts them by the
// reviews version that answered (the walkthrough's `grep reviews-v.-`)
// and checks the count of v1 against a binomial(SplitRequests, SplitV1)
// bound.
func (w *Walkthrough) countSplit(ctx context.Context, ns, url string) error {
	args := []string{"-n", ns, "exec", "deploy/" + Sleep, "--", "curl", "-timeout=10s"}
	for range SplitRequests {
		args = append(args, url)
	}
	w.shell(fmt.Sprintf("kubectl -n %s exec deploy/%s -- curl %s ×%d | grep reviews-v.- | count by version", ns, Sleep, url, SplitRequests))
	out, err := w.Target.Kubectl(ctx, args...)
	if err != nil {
		return fmt.Errorf("%d pages: %w", SplitRequests, err)
	}
	_, versions := ReviewsPods(string(out))
	count := map[string]int{}
	for _, v := range versions {
		count[v]++
	}
	w.output(fmt.Sprintf("reviews-v1: %d  reviews-v2: %d  reviews-v3: %d  no reviews: %d  (of %d pages)",
		count["v1"], count["v2"], count["v3"], count[""], len(versions)))
	lo, hi := BinomialBounds(SplitRequests, SplitV1, SplitAlpha)
	w.say("binomial(%d, %.2f): reviews-v1 in [%d, %d] but with probability < %g", SplitRequests, SplitV1, lo, hi, SplitAlpha)
	switch {
	case len(versions) != SplitRequests:
		return fmt.Errorf("%d pages, want %d", len(versions), SplitRequests)
	case count["v1"]+count["v2"] != SplitRequests:
		return fmt.Errorf("pages not from reviews v1 or v2: %v", count)
	case count["v1"] < lo || count["v1"] > hi:
		return fmt.Errorf("reviews-v1 answered %d of %d, outside [%d, %d]", count["v1"], SplitRequests, lo, hi)
	}
	return nil
}

// BinomialBounds returns the smallest interval [lo, hi] such that a
// binomial(n, p) count falls below lo, or above hi, each with
// probability at most alpha/2.
func BinomialBounds(n int, p, alpha float64) (lo, hi int) {
	pmf := func(k int) float64 {
		lg := func(x int) float64 { v, _ := math.Lgamma(float64(x) + 1); return v }
		return math.Exp(lg(n) - lg(k) - lg(n-k) + float64(k)*math.Log(p) + float64(n-k)*math.Log1p(-p))
	}
	tail := 0.0
	for lo = 0; lo < n && tail+pmf(lo) <= alpha/2; lo++ {
		tail += pmf(lo)
	}
	tail = 0
	for hi = n; hi > 0 && tail+pmf(hi) <= alpha/2; hi-- {
		tail += pmf(hi)
	}
	return lo, hi
}

// amberWaypoint prints the Deployment istiod rendered for the waypoint
// name and checks that it runs amber-waypoint from amber's image, then
// waits for it to be rolled out.
func (w *Walkthrough) amberWaypoint(ctx context.Context, ns, name string) error {
	out, err := w.kubectl(ctx, "-n", ns, "get", "deployment", name, "-o",
		`jsonpath={.spec.template.spec.containers[0].image} {.spec.template.spec.containers[0].command}{"\n"}`)
	if err != nil {
		return err
	}
	want := fmt.Sprintf(`%s ["%s"]`, images.Amber.Ref, strings.Join(WaypointCommand, `","`))
	if strings.TrimSpace(out) != want {
		return fmt.Errorf("waypoint %s runs %q, want %q (amber's GatewayClass defaults)", name, strings.TrimSpace(out), want)
	}
	if err := w.Target.WaitRollout(ctx, ns, name); err != nil {
		return err
	}
	_, err = w.kubectl(ctx, "-n", ns, "get", "pods", "-l", "gateway.networking.k8s.io/gateway-name="+name, "-o", "wide")
	return err
}

// cleanupL7 removes what RunL7 and Run created, as the walkthrough's
// clean-up does: the routes, the policy, the waypoints, Bookinfo, sleep
// and notsleep, and the namespace's labels.
func (w *Walkthrough) cleanupL7(ctx context.Context, ns string) error {
	// The walkthrough may have failed for ctx itself.
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 3*time.Minute)
	defer cancel()
	w.step("Clean up")
	var errs []error
	for _, args := range [][]string{
		{"-n", ns, "delete", "--ignore-not-found", "virtualservice/" + BookinfoReviews, "destinationrule/" + BookinfoReviews, "httproute/" + BookinfoReviews},
		{"-n", ns, "delete", "--ignore-not-found", "authorizationpolicy/productpage-viewer"},
	} {
		if _, err := w.kubectl(ctx, args...); err != nil {
			errs = append(errs, err)
		}
	}
	if w.IstioFiles != "" {
		if _, err := w.kubectl(ctx, "-n", ns, "delete", "--ignore-not-found", "-f", filepath.Join(w.IstioFiles, BookinfoGatewaySample)); err != nil {
			errs = append(errs, err)
		}
	}
	if _, err := w.istioctl(ctx, "waypoint", "delete", "-n", ns, "--all"); err != nil {
		errs = append(errs, err)
	}
	for _, f := range []string{"bookinfo-versions-" + ns + ".yaml", "bookinfo-" + ns + ".yaml", "sleep-" + ns + ".yaml"} {
		f = filepath.Join(w.Target.Manifests, f)
		if _, err := os.Stat(f); errors.Is(err, fs.ErrNotExist) {
			continue // the walkthrough ended before it applied f
		}
		if _, err := w.kubectl(ctx, "delete", "--ignore-not-found", "-f", f); err != nil {
			errs = append(errs, err)
		}
	}
	if _, err := w.kubectl(ctx, "label", "namespace", ns, "istio.io/use-waypoint-", "istio.io/dataplane-mode-"); err != nil {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

// istioctl runs and prints an istioctl command the user would type.
func (w *Walkthrough) istioctl(ctx context.Context, args ...string) (string, error) {
	w.shell("istioctl " + strings.Join(args, " "))
	out, err := w.Target.Istioctl(ctx, args...)
	w.output(string(out))
	if err != nil {
		w.output(err.Error())
	}
	return string(out), err
}

// deniedByWaypoint checks the output of `kubectl exec … -- curl` for the
// waypoint's RBAC denial: 403 and Envoy's body.
func deniedByWaypoint(what, out string, err error) error {
	if !ClientFailed(err) || !strings.Contains(out, " 403 Forbidden\n") || !strings.Contains(out, "RBAC: access denied") {
		return fmt.Errorf("%s: want 403 RBAC: access denied, got %v\n%s", what, err, out)
	}
	return nil
}
