package agent_test

import (
	"context"
	"fmt"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/amber-mesh/amber/internal/testutil"
	"github.com/amber-mesh/amber/test/agentbed"
	"github.com/amber-mesh/amber/test/testbed"
)

// watchdog checks every 10 ms that every pod it guards has a program on
// its veth and its membership entries, and records each lapse.
type watchdog struct {
	e       *env
	mu      sync.Mutex
	pods    []*testbed.Pod
	lapses  []string
	checks  atomic.Int64
	stop    chan struct{}
	stopped chan struct{}
}

func (e *env) watchdog(pods []*pod) *watchdog {
	w := &watchdog{e: e, stop: make(chan struct{}), stopped: make(chan struct{})}
	for _, p := range pods {
		w.pods = append(w.pods, p.TB)
	}
	pm, im := e.PinnedMap("amber_pods"), e.PinnedMap("amber_ifaces")
	go func() {
		defer close(w.stopped)
		defer pm.Close()
		defer im.Close()
		t := time.NewTicker(10 * time.Millisecond)
		defer t.Stop()
		for {
			select {
			case <-w.stop:
				return
			case <-t.C:
			}
			progs := e.Programs(w.pods)
			for i, p := range w.pods {
				if !agentbed.Membership(pm, im, p) {
					w.lapse(fmt.Sprintf("%s: membership missing", p.Name))
				}
				if !progs[i] {
					w.lapse(fmt.Sprintf("%s: no program on %s", p.Name, p.HostVeth))
				}
			}
			w.checks.Add(1)
		}
	}()
	return w
}

func (w *watchdog) lapse(s string) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.lapses = append(w.lapses, time.Now().Format("15:04:05.000 ")+s)
}

func (w *watchdog) finish(tb testing.TB) {
	tb.Helper()
	close(w.stop)
	<-w.stopped
	if len(w.lapses) > 0 {
		tb.Errorf("%d lapses in %d checks, first: %v", len(w.lapses), w.checks.Load(), w.lapses[:min(5, len(w.lapses))])
	}
	if w.checks.Load() < 50 {
		tb.Errorf("watchdog ran only %d checks", w.checks.Load())
	}
}

// traffic keeps long-lived connections busy and opens new ones from every
// pod; each new connection must go through the proxy.
type traffic struct {
	stop   chan struct{}
	wg     sync.WaitGroup
	mu     sync.Mutex
	errs   []string
	rounds atomic.Int64
}

func (e *env) traffic(pods []*pod, perPod int) *traffic {
	tr := &traffic{stop: make(chan struct{})}
	fail := func(s string) {
		tr.mu.Lock()
		tr.errs = append(tr.errs, time.Now().Format("15:04:05.000 ")+s)
		tr.mu.Unlock()
	}
	for _, p := range pods {
		var conns []net.Conn
		for i := 0; i < perPod; i++ {
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
			c, err := p.TB.Dial(ctx, "tcp", e.Echo.String())
			cancel()
			if err != nil {
				e.t.Fatalf("%s: dial: %v", p.Key(), err)
			}
			e.t.Cleanup(func() { c.Close() })
			conns = append(conns, c)
		}
		tr.wg.Add(2)
		go func() {
			defer tr.wg.Done()
			for n := 0; ; n++ {
				select {
				case <-tr.stop:
					return
				default:
				}
				for i, c := range conns {
					if err := echoOnce(c, fmt.Sprintf("%s %d %d", p.Name, i, n)); err != nil {
						fail(fmt.Sprintf("%s: long-lived connection %d: %v", p.Key(), i, err))
						return
					}
				}
				time.Sleep(5 * time.Millisecond)
			}
		}()
		go func() {
			defer tr.wg.Done()
			for {
				select {
				case <-tr.stop:
					return
				default:
				}
				ok, err := e.connect(p)
				if err != nil || !ok {
					fail(fmt.Sprintf("%s: new connection proxied=%v err=%v", p.Key(), ok, err))
					return
				}
				tr.rounds.Add(1)
				time.Sleep(10 * time.Millisecond)
			}
		}()
	}
	return tr
}

// progress waits until traffic has opened 20 more connections and the
// watchdog has made 10 more checks: each phase of a test is then covered
// by both, however slowly the machine runs.
func progress(tb testing.TB, what string, tr *traffic, wd *watchdog) {
	tb.Helper()
	r, c := tr.rounds.Load(), wd.checks.Load()
	testutil.Eventually(tb, "traffic and checks "+what, func() bool {
		return tr.rounds.Load() >= r+20 && wd.checks.Load() >= c+10
	})
}

func (tr *traffic) finish(tb testing.TB) {
	tb.Helper()
	close(tr.stop)
	tr.wg.Wait()
	if len(tr.errs) > 0 {
		tb.Errorf("traffic failures: %v", tr.errs)
	}
}

// TestPrivilegedAgentKill kills the agent with SIGKILL while pods talk,
// twice (the second time while the new agent is still starting up): no
// connection is dropped, every new connection is captured, and no
// enrolled pod is without its program or membership at any 10 ms check.
func TestPrivilegedAgentKill(t *testing.T) {
	e := newEnv(t, agentbed.Options{})
	e.Namespace("mesh", ambient)
	var pods []*pod
	for i := 0; i < 6; i++ {
		pods = append(pods, e.StartPod("mesh", fmt.Sprintf("p%d", i), nil))
	}
	for _, p := range pods {
		e.mustCaptured(p)
	}
	wd := e.watchdog(pods)
	tr := e.traffic(pods, 3)
	progress(t, "before the kill", tr, wd)

	e.Agent.Stop(syscall.SIGKILL)
	progress(t, "without an agent", tr, wd)
	e.Agent = e.StartAgent()
	progress(t, "with the new agent", tr, wd)

	// Kill the next one mid-start, beside the running one: its pins
	// adopted and its programs attached, its first reconciliation not done
	// (with the metrics port taken it would not get that far anyway).
	a := e.StartAgentNoWait()
	a.WaitLog(t, "uplink attached")
	a.Stop(syscall.SIGKILL)
	e.Agent.Stop(syscall.SIGKILL)
	progress(t, "after the second kill", tr, wd)
	e.Agent = e.StartAgent()
	progress(t, "with the third agent", tr, wd)

	rounds := tr.rounds.Load()
	tr.finish(t)
	wd.finish(t)
	if rounds < 50 {
		t.Errorf("only %d new connections during the test", rounds)
	}
	for _, p := range pods {
		if !e.annotated(p) {
			t.Errorf("%s lost its annotation", p.Key())
		}
	}
	t.Logf("%d new connections, %d watchdog checks", rounds, wd.checks.Load())
}

// TestPrivilegedAPIServerDown: with the API server stopped for a while,
// capture stays exactly as it was, a pod whose object is already known
// still gets its sandbox captured (from the cache), and the agent picks up
// changes once the API server is back.
func TestPrivilegedAPIServerDown(t *testing.T) {
	e := newEnv(t, agentbed.Options{})
	e.Namespace("mesh", ambient)
	e.Namespace("plain", nil)
	var pods []*pod
	for i := 0; i < 3; i++ {
		pods = append(pods, e.StartPod("mesh", fmt.Sprintf("p%d", i), nil))
	}
	outside := e.StartPod("plain", "outside", nil)
	marker := e.StartPod("plain", "marker", nil)
	late := e.CreatePod("mesh", "late", nil)
	// The informer sees "late": the agent's one pod watch delivers events
	// in order, so once it acts on a later change, it has seen "late".
	e.LabelPod(marker, ambient)
	testutil.Eventually(t, "the agent acting on a change after creating late", func() bool { return e.Captured(marker) })
	wd := e.watchdog(pods)
	tr := e.traffic(pods, 2)

	if err := e.CP.StopAPIServer(); err != nil {
		t.Fatal(err)
	}
	// client-go retries a refused watch without a word, so there is no
	// event for "the agent noticed": traffic and checks go on instead.
	progress(t, "with the API server down", tr, wd)
	if out, err := e.CNI("ADD", late); err != nil {
		t.Fatalf("ADD of a known pod with the API server down: %v\n%s", err, out)
	}
	if ok, err := e.connect(late); err != nil || !ok {
		t.Fatalf("pod added while the API server was down not captured: %v %v", ok, err)
	}
	if ok, err := e.connect(outside); err != nil || ok {
		t.Fatalf("pod outside the mesh changed: %v %v", ok, err)
	}
	// A full reconciliation (every -resync) runs without the API server.
	const full = "amber_agent_full_reconcile_duration_seconds_count"
	n := e.Agent.Metric(t, full)
	testutil.Eventually(t, "a full reconciliation without the API server", func() bool { return e.Agent.Metric(t, full) != n })
	e.CP.StartAPIServer(t)

	// Changes flow again.
	e.Namespace("plain", ambient)
	// client-go's reflectors back off up to 30 s between relists.
	testutil.Eventually(t, "label after API server restart", func() bool { return e.Captured(outside) })
	tr.finish(t)
	wd.finish(t)
	e.Running(late)
	testutil.Eventually(t, "annotation after API server restart", func() bool { return e.annotated(late) })
}

// TestPrivilegedMapFull: beyond its capacity the agent refuses the new
// pod's ADD and quarantines a running pod it cannot capture, with a
// warning event; neither sends a packet in plaintext. When room frees up
// the running pod is captured.
func TestPrivilegedMapFull(t *testing.T) {
	e := newEnv(t, agentbed.Options{MaxPods: 2})
	e.Namespace("mesh", ambient)
	e.Namespace("late", nil)
	a := e.StartPod("mesh", "a", nil)
	e.StartPod("mesh", "b", nil)
	d := e.StartPod("late", "d", nil)
	e.mustDirect(d)

	c := e.CreatePod("mesh", "c", nil)
	out, err := e.CNI("ADD", c)
	if err == nil || !strings.Contains(out, "map full") {
		t.Fatalf("ADD beyond capacity: err=%v\n%s", err, out)
	}
	// Whatever runs in the sandbox anyway gets nothing out.
	if ok, err := e.connect(c); err == nil {
		t.Fatalf("pod over capacity connected (proxied=%v)", ok)
	}
	testutil.Eventually(t, "MapFull event on the refused pod", func() bool { return len(e.events(c, "MapFull")) > 0 })

	if !e.quarantined(c.TB.IPv4) {
		t.Fatal("refused pod's address not quarantined")
	}
	// The runtime cleans up the failed sandbox: its addresses go back to
	// IPAM, free of any quarantine.
	if out, err := e.CNI("DEL", c); err != nil {
		t.Fatalf("DEL: %v\n%s", err, out)
	}
	testutil.Eventually(t, "quarantine lifted after DEL", func() bool { return !e.quarantined(c.TB.IPv4) && !e.quarantined(c.TB.IPv6) })

	// A running pod enrolled by a label change, over capacity.
	e.Namespace("late", ambient)
	testutil.Eventually(t, "MapFull event on the running pod", func() bool { return len(e.events(d, "MapFull")) > 0 })
	before := e.proxied(d)
	if err := roundTrip(context.Background(), d.TB.Dial, e.Echo); err == nil {
		t.Fatal("running pod over capacity still connects")
	}
	if e.proxied(d) != before || e.annotated(d) {
		t.Fatal("running pod over capacity proxied or annotated")
	}
	if v := e.Agent.Metric(t, `amber_agent_errors_total{reason="MapFull"}`); v == "" || v == "0" {
		t.Errorf("errors metric for MapFull = %q", v)
	}

	// Room frees up.
	e.DeletePod(a)
	testutil.Eventually(t, "running pod captured once room frees", func() bool { return e.Captured(d) })
	e.mustCaptured(d)
	testutil.Eventually(t, "annotated", func() bool { return e.annotated(d) })
}
