package main

import (
	"context"
	"flag"
	"fmt"
	"slices"
	"testing"
	"time"

	"github.com/amber-mesh/amber/internal/testutil"
	"github.com/amber-mesh/amber/test/agentbed"
	"github.com/amber-mesh/amber/test/meshbed"
)

// agentBench measures the node agent on one testbed node with a real API
// server and etcd (test/agentbed), the real datapath and -pods pods:
//
//   - label → capture: the namespace label is written and every pod's
//     membership is polled in the pinned maps (about every millisecond);
//     a pod's latency is first-seen minus the write. Each of -cycles
//     cycles labels and unlabels all pods.
//   - churn: -churn-rate pods replaced per second (CNI DEL + delete,
//     create + CNI ADD) for -churn-window in the enrolled namespace; the
//     agent's CPU and RSS, and CNI ADD as the runtime sees it.
//
// The API server and etcd share the machine's cores with the agent, as
// on a small control-plane node.
func agentBench(args []string) error {
	fs := flag.NewFlagSet("agent", flag.ContinueOnError)
	pods := fs.Int("pods", 250, "pods on the node")
	cycles := fs.Int("cycles", 5, "label → capture cycles")
	rate := fs.Int("churn-rate", 5, "pods replaced per second during churn")
	window := fs.Duration("churn-window", 20*time.Second, "length of the churn measurement")
	if err := fs.Parse(args); err != nil {
		return err
	}
	ctx, tmp, done, err := scratch()
	if err != nil {
		return err
	}
	defer done()
	agentBin, cniBin, err := agentbed.Build(tmp)
	if err != nil {
		return err
	}
	return withTB("agent", func(tb testing.TB) error {
		e := agentbed.New(tb, agentbed.Options{AgentBin: agentBin, CNIBin: cniBin})
		e.Namespace("bench", nil)
		all := make([]*agentbed.Pod, 0, *pods)
		start := time.Now()
		for i := range *pods {
			all = append(all, e.StartPod("bench", fmt.Sprintf("p%03d", i), nil))
		}
		fmt.Printf("%d pods started in %v\n", *pods, time.Since(start).Round(time.Millisecond))

		lat, err := labelToCapture(ctx, tb, e, all, *cycles)
		if err != nil {
			return err
		}
		q := quantiles(lat)
		fmt.Printf("label → capture over %d pods × %d cycles: p50 %.1f ms, p99 %.1f ms, max %.1f ms (goal p99 ≤ 100 ms)\n",
			*pods, *cycles, q(0.5), q(0.99), q(1))

		e.Namespace("bench", agentbed.Ambient)
		testutil.Eventually(tb, "all captured", func() bool {
			for _, p := range all {
				if !e.Captured(p) {
					return false
				}
			}
			return true
		})
		pid := e.Agent.Cmd.Process.Pid
		cpu0, err := meshbed.CPUTime(pid)
		if err != nil {
			return err
		}
		wall0 := time.Now()
		tick := time.NewTicker(time.Second / time.Duration(*rate))
		defer tick.Stop()
		var add []time.Duration
		next := *pods
		for time.Since(wall0) < *window {
			select {
			case <-ctx.Done():
				return fmt.Errorf("interrupted: %w", ctx.Err())
			case <-tick.C:
			}
			e.DeletePod(all[0])
			all = all[1:]
			p := e.CreatePod("bench", fmt.Sprintf("p%03d", next), nil)
			next++
			t0 := time.Now()
			if out, err := e.CNI("ADD", p); err != nil {
				return fmt.Errorf("CNI ADD %s: %v\n%s", p.Key(), err, out)
			}
			add = append(add, time.Since(t0))
			e.Running(p)
			all = append(all, p)
		}
		wall := time.Since(wall0)
		cpu1, err := meshbed.CPUTime(pid)
		if err != nil {
			return err
		}
		rss, err := meshbed.RSS(pid)
		if err != nil {
			return err
		}
		peak, err := meshbed.PeakRSS(pid)
		if err != nil {
			return err
		}
		for _, p := range all {
			if !e.Captured(p) {
				return fmt.Errorf("%s not captured after churn", p.Key())
			}
		}
		qa := quantiles(add)
		fmt.Printf("churn, %d pods/s for %v: agent %.1f %% of a core, RSS %.1f MiB, peak %.1f MiB (goal ≤ 40 MiB); CNI ADD p50 %.0f ms, p99 %.0f ms\n",
			*rate, window.Round(time.Second), 100*(cpu1-cpu0).Seconds()/wall.Seconds(), float64(rss)/(1<<20), float64(peak)/(1<<20), qa(0.5), qa(0.99))
		return nil
	})
}

// labelToCapture labels the namespace of pods cycles times and returns
// each pod's time from the label write to its membership in the pinned
// maps; between cycles the label is removed and the pods released.
func labelToCapture(ctx context.Context, tb testing.TB, e *agentbed.Env, pods []*agentbed.Pod, cycles int) ([]time.Duration, error) {
	pm, im := e.PinnedMap("amber_pods"), e.PinnedMap("amber_ifaces")
	defer pm.Close()
	defer im.Close()
	var lat []time.Duration
	for range cycles {
		seen := make([]time.Duration, len(pods))
		t0 := time.Now()
		e.Namespace("bench", agentbed.Ambient)
		for left := len(pods); left > 0; {
			if err := ctx.Err(); err != nil {
				return nil, fmt.Errorf("interrupted: %w", err)
			}
			if time.Since(t0) > 30*time.Second {
				return nil, fmt.Errorf("%d pods not captured 30 s after the label", left)
			}
			for i, p := range pods {
				if seen[i] == 0 && agentbed.Membership(pm, im, p.TB) {
					seen[i] = time.Since(t0)
					left--
				}
			}
			time.Sleep(time.Millisecond) // the polling period: the latencies' resolution
		}
		lat = append(lat, seen...)
		e.Namespace("bench", nil)
		testutil.Eventually(tb, "release", func() bool {
			for _, p := range pods {
				if agentbed.AnyMembership(pm, im, p.TB) {
					return false
				}
			}
			return true
		})
	}
	return lat, nil
}

// quantiles sorts d and returns its quantile function, in milliseconds.
func quantiles(d []time.Duration) func(q float64) float64 {
	slices.Sort(d)
	return func(q float64) float64 { return float64(d[int(q*float64(len(d)-1))]) / 1e6 }
}
