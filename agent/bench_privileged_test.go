package agent_test

import (
	"fmt"
	"os"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/amber-mesh/amber/internal/testutil"
)

// BenchmarkPrivilegedAgent measures the agent on one node with 250 pods
// (a real API server, testbed pods, the real datapath):
//
//   - label-to-capture: the namespace label is written and every pod's
//     membership is polled in the pinned maps (about every 2 ms); the
//     latency of each pod is first-seen minus the write. One op is one
//     label/unlabel cycle of all 250 pods.
//   - churn: 5 pods replaced per second (CNI DEL + delete, create + CNI
//     ADD) for 20 s in an enrolled namespace; the agent's CPU (from
//     /proc/PID/stat) and RSS are reported.
//
// Run with: go test -run '^$' -bench BenchmarkPrivilegedAgent -benchtime 5x ./agent/
func BenchmarkPrivilegedAgent(b *testing.B) {
	e := newBenchEnv(b)
	const pods = 250
	e.namespace("bench", nil)
	var all []*pod
	start := time.Now()
	for i := 0; i < pods; i++ {
		all = append(all, e.startPod("bench", fmt.Sprintf("p%03d", i), nil))
	}
	b.Logf("%d pods started in %v", pods, time.Since(start).Round(time.Millisecond))

	b.Run("label-to-capture", func(b *testing.B) {
		var lat []time.Duration
		pm, im := e.pinnedMap("amber_pods"), e.pinnedMap("amber_ifaces")
		defer pm.Close()
		defer im.Close()
		for n := 0; n < b.N; n++ {
			seen := make([]time.Duration, len(all))
			t0 := time.Now()
			e.namespace("bench", ambient)
			left := len(all)
			for left > 0 {
				if time.Since(t0) > 30*time.Second {
					b.Fatalf("%d pods not captured after 30 s", left)
				}
				for i, p := range all {
					if seen[i] == 0 && membership(pm, im, p.tb) {
						seen[i] = time.Since(t0)
						left--
					}
				}
				time.Sleep(time.Millisecond)
			}
			lat = append(lat, seen...)
			b.StopTimer()
			e.namespace("bench", nil)
			testutil.Eventually(b, "release", func() bool {
				for _, p := range all {
					if anyMembership(pm, im, p.tb) {
						return false
					}
				}
				return true
			})
			b.StartTimer()
		}
		slices.Sort(lat)
		q := func(f float64) float64 { return float64(lat[int(f*float64(len(lat)-1))]) / 1e6 }
		b.ReportMetric(q(0.5), "p50-ms")
		b.ReportMetric(q(0.99), "p99-ms")
		b.ReportMetric(q(1), "max-ms")
		b.ReportMetric(0, "ns/op")
	})

	// The churn window is measured once; the benchmark framework calls a
	// sub-benchmark more than once (N=1 first), and later calls report
	// the same numbers.
	var churn map[string]float64
	b.Run("churn", func(b *testing.B) {
		if churn != nil {
			for unit, v := range churn {
				b.ReportMetric(v, unit)
			}
			return
		}
		e.namespace("bench", ambient)
		testutil.Eventually(b, "all captured", func() bool {
			for _, p := range all {
				if !e.captured(p) {
					return false
				}
			}
			return true
		})
		pid := e.agent.cmd.Process.Pid
		cpu0, wall0 := cpuTime(b, pid), time.Now()
		const rate, window = 5, 20 * time.Second
		tick := time.NewTicker(time.Second / rate)
		defer tick.Stop()
		var addLat []time.Duration
		next := pods
		for time.Since(wall0) < window {
			<-tick.C
			victim := all[0]
			all = all[1:]
			e.deletePod(victim)
			p := e.createPod("bench", fmt.Sprintf("p%03d", next), nil)
			next++
			t0 := time.Now()
			if out, err := e.cni("ADD", p); err != nil {
				b.Fatalf("ADD: %v\n%s", err, out)
			}
			addLat = append(addLat, time.Since(t0))
			e.running(p)
			all = append(all, p)
		}
		wall := time.Since(wall0)
		cpu := cpuTime(b, pid) - cpu0
		rss, hwm := memory(b, pid)
		slices.Sort(addLat)
		churn = map[string]float64{
			"agent-cpu-%":        100 * cpu.Seconds() / wall.Seconds(),
			"agent-rss-MiB":      rss,
			"agent-peak-rss-MiB": hwm,
			"cni-add-p50-ms":     float64(addLat[len(addLat)/2]) / 1e6,
			"cni-add-p99-ms":     float64(addLat[len(addLat)*99/100]) / 1e6,
			"ns/op":              0,
		}
		for unit, v := range churn {
			b.ReportMetric(v, unit)
		}
		for _, p := range all {
			if !e.captured(p) {
				b.Errorf("%s not captured after churn", p.key())
			}
		}
	})
}

// newBenchEnv adapts newEnv to a benchmark.
func newBenchEnv(b *testing.B) *env {
	return newEnvTB(b, envOptions{})
}

func cpuTime(tb testing.TB, pid int) time.Duration {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		tb.Fatal(err)
	}
	// Fields after the command name: utime and stime are 14th and 15th.
	f := strings.Fields(string(data[strings.LastIndexByte(string(data), ')')+2:]))
	ut, _ := strconv.ParseInt(f[11], 10, 64)
	st, _ := strconv.ParseInt(f[12], 10, 64)
	return time.Duration(ut+st) * time.Second / 100 // USER_HZ
}

func memory(tb testing.TB, pid int) (rss, hwm float64) {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		tb.Fatal(err)
	}
	for _, line := range strings.Split(string(data), "\n") {
		f := strings.Fields(line)
		if len(f) < 2 {
			continue
		}
		kb, _ := strconv.ParseFloat(f[1], 64)
		switch f[0] {
		case "VmRSS:":
			rss = kb / 1024
		case "VmHWM:":
			hwm = kb / 1024
		}
	}
	return rss, hwm
}
