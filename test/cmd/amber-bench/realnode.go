package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/amber-mesh/amber/test/cluster"
	"github.com/amber-mesh/amber/test/images"
	"github.com/amber-mesh/amber/test/istiod"
	"github.com/amber-mesh/amber/test/meshbed"
	"github.com/amber-mesh/amber/test/realnode"
)

// nodeStage is one measurement on the real node. Stages run in the
// order of nodeStages, each on the state the ones before left (the node
// with amber installed, Bookinfo meshed in the default namespace); a
// stage that needs more sets it up itself and says so in what.
type nodeStage struct {
	name, what string
	run        func(*nodeBench) error
}

// nodeStages are amber-bench realnode's measurements after the node and
// amber's install (which are always measured). Add a stage here to
// measure something new on the same node; measureRate drives a fixed
// rate of GETs from sleep and meters processes.
var nodeStages = []nodeStage{
	{"churn", "pods created in batches of 20: create → captured p50/p99; amber-agent and amber-ztunnel RSS and CPU while creating", churnStage},
	{"rollout", "kubectl rollout restart of amber's DaemonSet → rolled out", rolloutStage},
	{"waypoint", "sleep → productpage GET /health, without and with the namespace's waypoint (GET-only policy); the waypoint pod's RSS and CPU at each rate", waypointStage},
	{"ingress", "sleep → istio-ingressgateway (Istio's chart, amber-waypoint) → productpage GET /api/v1/products, and sleep → productpage directly; the gateway pod's RSS and CPU at each rate", ingressStage},
}

// nodeBench is the state the stages share.
type nodeBench struct {
	ctx context.Context
	c   *cluster.Cluster
	a   *realnode.Amber
	tg  *realnode.Target
	log *slog.Logger

	// Flags.
	pods     int
	duration time.Duration
	rates    []int
	latRate  int

	// sleep is a keep-alive client in sleep's network namespace.
	sleep *http.Client

	mu      sync.Mutex // guards results
	results []nodeResult
}

// nodeResult is one line of the report.
type nodeResult struct{ stage, metric, value string }

func (b *nodeBench) record(stage, metric, format string, args ...any) {
	v := fmt.Sprintf(format, args...)
	b.mu.Lock()
	b.results = append(b.results, nodeResult{stage, metric, v})
	b.mu.Unlock()
	fmt.Printf("  %-9s %-52s %s\n", stage, metric, v)
}

// realnodeBench measures amber on a real node (test/cluster: kubelet,
// containerd, istiod, amber's Helm chart): the node's and amber's
// start, pod capture under churn, a DaemonSet restart, and L7 through
// amber-waypoint. Unlike the testbed benchmarks there is no same-run
// baseline for most of these: they are absolute timings and footprints
// of one run, as comparable as the machine is quiet.
func realnodeBench(args []string) error {
	fs := flag.NewFlagSet("realnode", flag.ContinueOnError)
	pods := fs.Int("pods", 100, "pods the churn stage creates")
	dur := fs.Duration("duration", 10*time.Second, "length of each fixed-rate measurement")
	ratesFlag := fs.String("rates", "100,1000", "request rates (GET/s) at which the waypoint's footprint is measured")
	latRate := fs.Int("latency-rate", 100, "request rate of the with/without-waypoint latency comparison")
	only := fs.String("stages", "", "comma-separated stages to run after the node and install (default: all): "+stageNames())
	if err := fs.Parse(args); err != nil {
		return err
	}
	if os.Geteuid() != 0 {
		return errors.New("realnode: runs a Kubernetes node and loads BPF programs: run as root")
	}
	var rates []int
	for _, f := range strings.Split(*ratesFlag, ",") {
		r, err := strconv.Atoi(strings.TrimSpace(f))
		if err != nil || r <= 0 {
			return fmt.Errorf("realnode: -rates %q: %q is not a positive rate", *ratesFlag, f)
		}
		rates = append(rates, r)
	}
	stages := nodeStages
	if *only != "" {
		stages = nil
		for _, n := range strings.Split(*only, ",") {
			i := slices.IndexFunc(nodeStages, func(s nodeStage) bool { return s.name == n })
			if i < 0 {
				return fmt.Errorf("realnode: no stage %q (%s)", n, stageNames())
			}
			stages = append(stages, nodeStages[i])
		}
	}
	ctx, dir, done, err := scratch()
	if err != nil {
		return err
	}
	defer done()
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
	b := &nodeBench{ctx: ctx, log: log, pods: *pods, duration: *dur, rates: rates, latRate: *latRate}

	unlock, err := cluster.LockHost(func() { fmt.Println("another node runs on this machine; waiting for it") })
	if err != nil {
		return err
	}
	defer unlock()
	defer func() {
		// The teardown runs after an interrupt too.
		tctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
		defer cancel()
		if b.a != nil {
			err = errors.Join(err, b.a.Uninstall(tctx))
		}
		err = errors.Join(err, cluster.Stop(tctx, dir))
	}()

	fmt.Printf("amber-bench realnode: one node in %s; stages node, install, %s\n", dir, strings.Join(stageList(stages), ", "))
	t0 := time.Now()
	if b.c, err = cluster.Start(ctx, cluster.Options{Dir: dir, Istiod: true, Logger: log}); err != nil {
		return err
	}
	b.record("node", "nothing → node Ready with istiod (cached builds)", "%v", since(t0))
	b.tg = realnode.HostTarget(b.c)
	t0 = time.Now()
	if b.a, err = realnode.Install(ctx, b.c, realnode.Options{Logger: log}); err != nil {
		return err
	}
	b.record("install", "helm install → amber Ready", "%v", since(t0))
	if err := b.bookinfo(); err != nil {
		return err
	}
	for _, s := range stages {
		fmt.Printf("── %s: %s\n", s.name, s.what)
		if err := s.run(b); err != nil {
			return fmt.Errorf("stage %s: %w", s.name, err)
		}
	}
	b.report()
	return nil
}

func stageNames() string { return strings.Join(stageList(nodeStages), ", ") }

func stageList(ss []nodeStage) []string {
	var names []string
	for _, s := range ss {
		names = append(names, s.name)
	}
	return names
}

func since(t time.Time) time.Duration { return time.Since(t).Round(time.Millisecond) }

// bookinfo deploys Bookinfo, sleep and notsleep in the default
// namespace, meshed, and opens the sleep client.
func (b *nodeBench) bookinfo() error {
	const ns = "default"
	if err := b.tg.DeployBookinfo(b.ctx, ns); err != nil {
		return err
	}
	pods, err := b.c.Client.CoreV1().Pods(ns).List(b.ctx, metav1.ListOptions{})
	if err != nil {
		return err
	}
	for _, p := range pods.Items {
		if _, _, err := realnode.WaitCaptured(b.ctx, b.c.Client, ns, p.Name, time.Now()); err != nil {
			return fmt.Errorf("%s: %w", p.Name, err)
		}
	}
	sleep, err := b.tg.RunningPod(b.ctx, ns, realnode.Sleep)
	if err != nil {
		return err
	}
	nsPath, err := realnode.PodNetns(b.ctx, b.c, sleep)
	if err != nil {
		return err
	}
	b.sleep = realnode.PodClient(nsPath, 10*time.Second, true)
	return nil
}

// churnStage creates b.pods pods, 20 at a time, and times each from
// create to its address in the membership map, metering amber's two
// processes meanwhile; then deletes them.
func churnStage(b *nodeBench) error {
	const ns, batch = "default", 20
	var pids []int
	for _, bin := range []string{"/usr/local/bin/amber-agent", "/usr/local/bin/amber-ztunnel"} {
		pid, err := b.podProcess(realnode.Namespace, "app="+realnode.DaemonSet, bin)
		if err != nil {
			return err
		}
		pids = append(pids, pid)
	}
	cpu0, err := cpuTimes(pids)
	if err != nil {
		return err
	}
	t0 := time.Now()
	var mu sync.Mutex
	var lat []time.Duration
	var errs []error
	for i := 0; i < b.pods; i += batch {
		var wg sync.WaitGroup
		for j := i; j < min(i+batch, b.pods); j++ {
			wg.Go(func() {
				name := fmt.Sprintf("churn-%03d", j)
				created := time.Now()
				_, err := b.c.Client.CoreV1().Pods(ns).Create(b.ctx, realnode.SleeperPod(ns, name, realnode.Sleep), metav1.CreateOptions{})
				var d time.Duration
				if err == nil {
					_, d, err = realnode.WaitCaptured(b.ctx, b.c.Client, ns, name, created)
				}
				mu.Lock()
				defer mu.Unlock()
				if err != nil {
					errs = append(errs, fmt.Errorf("%s: %w", name, err))
					return
				}
				lat = append(lat, d)
			})
		}
		wg.Wait()
	}
	elapsed := time.Since(t0)
	if err := errors.Join(errs...); err != nil {
		return err
	}
	cpu1, err := cpuTimes(pids)
	if err != nil {
		return err
	}
	slices.Sort(lat)
	q := func(f float64) time.Duration {
		return lat[min(len(lat)-1, int(f*float64(len(lat))))].Round(time.Millisecond)
	}
	b.record("churn", fmt.Sprintf("pod create → captured over %d pods", len(lat)), "p50 %v, p99 %v, max %v", q(0.5), q(0.99), lat[len(lat)-1].Round(time.Millisecond))
	for i, name := range []string{"amber-agent", "amber-ztunnel"} {
		rss, err := meshbed.RSS(pids[i])
		if err != nil {
			return err
		}
		b.record("churn", name+fmt.Sprintf(" at %d pods (CPU averaged over %v)", b.pods+len(realnode.BookinfoDeployments)+2, elapsed.Round(time.Second)),
			"RSS %.1f MiB, CPU %.1f%% of a core", mib(rss), 100*(cpu1[i]-cpu0[i]).Seconds()/elapsed.Seconds())
	}
	if _, err := b.c.Kubectl(b.ctx, "-n", ns, "delete", "pods", "-l", "churn=true", "--wait=false"); err != nil {
		return err
	}
	return realnode.Retry(b.ctx, 5*time.Minute, func() error {
		left, err := b.c.Client.CoreV1().Pods(ns).List(b.ctx, metav1.ListOptions{LabelSelector: "churn=true"})
		if err != nil {
			return err
		}
		if n := len(left.Items); n > 0 {
			return fmt.Errorf("%d churn pods left", n)
		}
		return nil
	})
}

// rolloutStage restarts amber's DaemonSet and times it to rolled out
// and ready.
func rolloutStage(b *nodeBench) error {
	t0 := time.Now()
	if out, err := b.c.Kubectl(b.ctx, "-n", realnode.Namespace, "rollout", "restart", "daemonset/"+realnode.DaemonSet); err != nil {
		return fmt.Errorf("%w\n%s", err, out)
	}
	if out, err := b.c.Kubectl(b.ctx, "-n", realnode.Namespace, "rollout", "status", "daemonset/"+realnode.DaemonSet, "--timeout=180s"); err != nil {
		return fmt.Errorf("%w\n%s", err, out)
	}
	if err := b.a.WaitReady(b.ctx); err != nil {
		return err
	}
	b.record("rollout", "kubectl rollout restart daemonset/"+realnode.DaemonSet+" → Ready", "%v", since(t0))
	return nil
}

// waypointStage measures sleep → productpage GET /health (productpage
// answers it without calling a backend: the waypoint's hop alone) at
// b.latRate without a waypoint, then deploys the namespace's waypoint
// and the walkthrough's GET-only policy and measures the same, and the
// waypoint pod's footprint at each of b.rates.
func waypointStage(b *nodeBench) error {
	const ns = "default"
	svc, err := b.c.Client.CoreV1().Services(ns).Get(b.ctx, realnode.BookinfoProductpage, metav1.GetOptions{})
	if err != nil {
		return err
	}
	port := strconv.Itoa(images.BookinfoPort)
	url := "http://" + net.JoinHostPort(svc.Spec.ClusterIP, port) + "/health"
	host := realnode.BookinfoProductpage + ":" + port

	without, err := b.measureRate(b.sleep, url, host, b.latRate, nil)
	if err != nil {
		return err
	}
	b.record("waypoint", fmt.Sprintf("without waypoint, %d GET/s", b.latRate), "%s", without)

	if out, err := b.c.Istioctl(b.ctx, "waypoint", "apply", "-n", ns, "--enroll-namespace", "--wait"); err != nil {
		return fmt.Errorf("istioctl waypoint apply: %w\n%s", err, out)
	}
	if err := b.tg.Apply(b.ctx, "productpage-viewer.yaml", istiod.ViewerPolicy(ns, realnode.BookinfoProductpage, "GET")); err != nil {
		return err
	}
	// The policy answers a DELETE with 403 once the waypoint is in the
	// path with it: on new connections only, a connection the ztunnel
	// already proxies straight to productpage stays so (as Istio's).
	if err := realnode.Retry(b.ctx, 2*time.Minute, func() error {
		b.sleep.CloseIdleConnections()
		r, err := realnode.Get(b.ctx, b.sleep, http.MethodDelete, url, host)
		if err != nil {
			return err
		}
		if r.Status != http.StatusForbidden {
			return fmt.Errorf("DELETE: %d, not the waypoint's 403 yet", r.Status)
		}
		return nil
	}); err != nil {
		return err
	}
	pid, err := b.podProcess(ns, "gateway.networking.k8s.io/gateway-name="+realnode.Waypoint, realnode.WaypointCommand[0])
	if err != nil {
		return err
	}
	return b.meterProxy("waypoint", "waypoint", "through the waypoint", pid, url, host, without)
}

// meterProxy records the idle RSS of the proxy process pid, then GETs url
// (Host host), which goes through it, at b.latRate and each of b.rates,
// metering it, and what it adds to baseline (the same GETs without it at
// b.latRate).
func (b *nodeBench) meterProxy(stage, proxy, path string, pid int, url, host string, baseline rateResult) error {
	rss, err := meshbed.RSS(pid)
	if err != nil {
		return err
	}
	b.record(stage, proxy+" pod idle", "RSS %.1f MiB", mib(rss))
	var with rateResult
	for _, rate := range uniq(append([]int{b.latRate}, b.rates...)) {
		r, err := b.measureRate(b.sleep, url, host, rate, []int{pid})
		if err != nil {
			return err
		}
		b.record(stage, fmt.Sprintf("%s, %d GET/s", path, rate), "%s", r)
		if rate == b.latRate {
			with = r
		}
	}
	b.record(stage, fmt.Sprintf("added by the %s at %d GET/s", proxy, b.latRate), "p50 +%v, p99 +%v",
		(with.p50 - baseline.p50).Round(10*time.Microsecond), (with.p99 - baseline.p99).Round(10*time.Microsecond))
	return nil
}

func uniq(xs []int) []int {
	var out []int
	for _, x := range xs {
		if !slices.Contains(out, x) {
			out = append(out, x)
		}
	}
	return out
}

// rateResult is a fixed-rate measurement: what the client saw and what
// the metered processes used.
type rateResult struct {
	rate         int
	achieved     float64 // answered requests per second
	failed, late int
	p50, p99     time.Duration
	metered      bool
	cpu          float64 // cores
	rssMiB       float64 // at the end, summed
}

func (r rateResult) String() string {
	s := fmt.Sprintf("%.0f/s answered, p50 %v, p99 %v", r.achieved, r.p50.Round(10*time.Microsecond), r.p99.Round(10*time.Microsecond))
	if r.failed > 0 || r.late > 0 {
		s += fmt.Sprintf(" (%d failed, %d sent late)", r.failed, r.late)
	}
	if r.metered {
		s += fmt.Sprintf("; RSS %.1f MiB, CPU %.0f%% of a core", r.rssMiB, 100*r.cpu)
	}
	return s
}

// measureRate sends GETs of url (Host host) from c at rate per second
// for b.duration, open loop, and meters the processes pids over it.
func (b *nodeBench) measureRate(c *http.Client, url, host string, rate int, pids []int) (rateResult, error) {
	// A second at the rate first: connections opened, the heap grown.
	warm, cancel := context.WithTimeout(b.ctx, time.Second)
	realnode.StartLoad(warm, rate, func(ctx context.Context) error { return getOK(ctx, c, url, host) }).Wait()
	cancel()
	cpu0, err := cpuTimes(pids)
	if err != nil {
		return rateResult{}, err
	}
	ctx, cancel := context.WithTimeout(b.ctx, b.duration)
	defer cancel()
	t0 := time.Now()
	l := realnode.StartLoad(ctx, rate, func(ctx context.Context) error { return getOK(ctx, c, url, host) }).Wait()
	elapsed := time.Since(t0)
	if err := b.ctx.Err(); err != nil {
		return rateResult{}, err
	}
	r := rateResult{rate: rate, achieved: float64(l.OK) / elapsed.Seconds(), failed: l.Failed, late: l.Late,
		p50: l.Quantile(0.5), p99: l.Quantile(0.99)}
	if l.OK == 0 {
		return r, fmt.Errorf("no request answered at %d/s: %q", rate, l.Errors)
	}
	if len(pids) > 0 {
		cpu1, err := cpuTimes(pids)
		if err != nil {
			return r, err
		}
		r.metered = true
		for i, pid := range pids {
			r.cpu += (cpu1[i] - cpu0[i]).Seconds() / elapsed.Seconds()
			rss, err := meshbed.RSS(pid)
			if err != nil {
				return r, err
			}
			r.rssMiB += mib(rss)
		}
	}
	return r, nil
}

func getOK(ctx context.Context, c *http.Client, url, host string) error {
	r, err := realnode.Get(ctx, c, http.MethodGet, url, host)
	if err == nil && r.Status != http.StatusOK {
		err = fmt.Errorf("status %d", r.Status)
	}
	return err
}

// podProcess returns the pid of bin in the running pod of ns that
// selector picks: by its pod's cgroup, never by name alone (other
// engineers' benchmarks run amber's binaries on the same machine).
func (b *nodeBench) podProcess(ns, selector, bin string) (int, error) {
	pod, err := b.tg.RunningPodOf(b.ctx, ns, selector)
	if err != nil {
		return 0, err
	}
	return realnode.ProcessOf(bin, string(pod.UID))
}

func cpuTimes(pids []int) ([]time.Duration, error) {
	out := make([]time.Duration, len(pids))
	for i, pid := range pids {
		t, err := meshbed.CPUTime(pid)
		if err != nil {
			return nil, err
		}
		out[i] = t
	}
	return out, nil
}

func mib(bytes int64) float64 { return float64(bytes) / (1 << 20) }

// report prints the results again as one table, for the README.
func (b *nodeBench) report() {
	fmt.Println("\n| stage | measurement | result |\n|---|---|---|")
	for _, r := range b.results {
		fmt.Printf("| %s | %s | %s |\n", r.stage, r.metric, r.value)
	}
}
