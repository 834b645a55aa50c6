package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/amber-mesh/amber/test/meshbed"
)

// cpuTime is the user and system CPU time processes pids have used, all
// threads included. It is what perf stat's task-clock would count for
// them, at 10 ms resolution: enough over a measurement of seconds.
func cpuTime(pids []int) (time.Duration, error) {
	var sum time.Duration
	for _, pid := range pids {
		t, err := meshbed.CPUTime(pid)
		if err != nil {
			return 0, err
		}
		sum += t
	}
	return sum, nil
}

// cpuMeter measures the CPU time of processes across one measurement.
type cpuMeter struct {
	pids  []int
	start time.Duration
}

func startCPU(pids []int) (*cpuMeter, error) {
	t, err := cpuTime(pids)
	return &cpuMeter{pids: pids, start: t}, err
}

// used returns the CPU time since start; zero without processes.
func (m *cpuMeter) used() (time.Duration, error) {
	t, err := cpuTime(m.pids)
	return t - m.start, err
}

// profiler records CPU profiles of a mode's proxy processes during one
// measurement, into files named after the mode and the measurement:
// Go's pprof profile from each ztunnel's admin port (amber), and `perf
// record -g` of every proxy process when perf is installed, so amber and
// HAProxy are seen with the same tool, kernel included.
type profiler struct {
	errs chan error
	n    int
	perf *perfRecord
	stat *perfRecord // perf stat of the syscalls, when asked for
}

// startProfile starts profiling for about d. name is the files' prefix.
// With syscalls, `perf stat` also counts the processes' system calls
// and context switches into NAME.perf-stat.csv (see syscallsPerConn).
func startProfile(dir, name string, d time.Duration, pids []int, ztunnels []*meshbed.Ztunnel, syscalls bool) (*profiler, error) {
	pr := &profiler{errs: make(chan error, len(ztunnels))}
	if perf, err := exec.LookPath("perf"); err == nil && len(pids) > 0 {
		prefix := filepath.Join(dir, name)
		if pr.perf, err = startPerf(perf, prefix, pids, "record", "-q", "-g", "-o", prefix+".perf.data"); err != nil {
			return nil, err
		}
		if syscalls {
			if pr.stat, err = startPerf(perf, prefix+"-stat", pids, "stat", "-x", ",", "-e", perfStatEvents, "-o", prefix+".perf-stat.csv"); err != nil {
				return nil, errors.Join(err, pr.perf.stop())
			}
		}
	}
	secs := max(1, int((d+time.Second-1)/time.Second))
	for _, z := range ztunnels {
		pr.n++
		go func() {
			pr.errs <- pprofCPU(z, filepath.Join(dir, fmt.Sprintf("%s-ztunnel-%s.pprof", name, z.Node.Name)), secs)
		}()
	}
	return pr, nil
}

// wait stops perf and waits for the pprof profiles.
func (pr *profiler) wait() error {
	var errs []error
	for _, r := range []*perfRecord{pr.stat, pr.perf} {
		if r != nil {
			errs = append(errs, r.stop())
		}
	}
	for ; pr.n > 0; pr.n-- {
		errs = append(errs, <-pr.errs)
	}
	return errors.Join(errs...)
}

// perfStatEvents are what `perf stat` counts in a connection-rate
// or latency profile: every system call entered, context switches, CPU time, then
// the system calls of the Go runtime's scheduler (sysmon's sleeps, thread
// parking and wake-ups, the poller's waits), whose number follows the
// machine's load rather than the connection's work.
const perfStatEvents = "raw_syscalls:sys_enter,context-switches,task-clock," +
	"syscalls:sys_enter_nanosleep,syscalls:sys_enter_futex,syscalls:sys_enter_epoll_pwait,syscalls:sys_enter_sched_yield"

// perfRecord is a `perf record -g` (or `perf stat`) of some processes.
// It starts with its events disabled and is enabled through its control
// FIFO, whose acknowledgement says sampling has begun: perf takes a while
// to attach to every thread, longer than a short measurement may last.
type perfRecord struct {
	cmd      *exec.Cmd
	ctl, ack *os.File
}

// startPerf runs perf's subcommand args on pids, its control FIFOs
// named after prefix.
func startPerf(perf, prefix string, pids []int, args ...string) (*perfRecord, error) {
	ctlPath, ackPath := prefix+".perf-ctl", prefix+".perf-ack"
	for _, f := range []string{ctlPath, ackPath} {
		os.Remove(f)
		if err := syscall.Mkfifo(f, 0o600); err != nil {
			return nil, fmt.Errorf("perf control fifo: %w", err)
		}
	}
	p := make([]string, len(pids))
	for i, pid := range pids {
		p[i] = strconv.Itoa(pid)
	}
	r := &perfRecord{}
	var err error
	// Opened read-write, neither end blocks until perf opens its own.
	if r.ctl, err = os.OpenFile(ctlPath, os.O_RDWR, 0); err == nil {
		r.ack, err = os.OpenFile(ackPath, os.O_RDWR, 0)
	}
	if err != nil {
		r.close()
		return nil, err
	}
	args = append(args, "-D", "-1", "--control", "fifo:"+ctlPath+","+ackPath, "-p", strings.Join(p, ","))
	r.cmd = exec.Command(perf, args...)
	r.cmd.Stderr = os.Stderr
	if err := r.cmd.Start(); err != nil {
		r.close()
		return nil, fmt.Errorf("perf record: %w", err)
	}
	if err := r.control("enable"); err != nil {
		return nil, errors.Join(err, r.stop())
	}
	return r, nil
}

// control sends perf a command and waits for its acknowledgement.
func (r *perfRecord) control(cmd string) error {
	if _, err := r.ctl.WriteString(cmd + "\n"); err != nil {
		return fmt.Errorf("perf %s: %w", cmd, err)
	}
	r.ack.SetReadDeadline(time.Now().Add(10 * time.Second))
	b := make([]byte, 16)
	for got := ""; !strings.Contains(got, "ack"); {
		n, err := r.ack.Read(b)
		if err != nil {
			return fmt.Errorf("perf %s: no acknowledgement: %w", cmd, err)
		}
		got += string(b[:n])
	}
	return nil
}

// syscallsPer reads a profile phase's perf-stat file and returns each
// event's count per unit of work (connection, request), in
// perfStatEvents' order.
func syscallsPer(file string, units float64) ([]float64, error) {
	b, err := os.ReadFile(file)
	if err != nil {
		return nil, err
	}
	want := strings.Split(perfStatEvents, ",")
	out := make([]float64, len(want))
	for _, line := range strings.Split(string(b), "\n") {
		// CSV: value, unit, event, ...
		f := strings.Split(line, ",")
		if len(f) < 3 {
			continue
		}
		for i, ev := range want {
			if f[2] == ev || strings.HasPrefix(f[2], ev+":") {
				v, err := strconv.ParseFloat(f[0], 64)
				if err != nil {
					return nil, fmt.Errorf("%s: %s: %w", file, ev, err)
				}
				out[i] = v / units
			}
		}
	}
	return out, nil
}

// stop disables sampling, then interrupts perf, which writes its file.
func (r *perfRecord) stop() error {
	err := r.control("disable")
	r.cmd.Process.Signal(syscall.SIGINT)
	werr := r.cmd.Wait()
	// perf record dies of the SIGINT once its file is written.
	var exit *exec.ExitError
	if errors.As(werr, &exit) {
		if ws, ok := exit.Sys().(syscall.WaitStatus); ok && ws.Signaled() && ws.Signal() == syscall.SIGINT {
			werr = nil
		}
	}
	if werr != nil {
		werr = fmt.Errorf("perf record: %w", werr)
	}
	r.close()
	return errors.Join(err, werr)
}

func (r *perfRecord) close() {
	for _, f := range []*os.File{r.ctl, r.ack} {
		if f != nil {
			os.Remove(f.Name())
			f.Close()
		}
	}
}

// pprofCPU saves a CPU profile of secs seconds from the ztunnel's
// loopback admin port (/debug/pprof/profile).
func pprofCPU(z *meshbed.Ztunnel, file string, secs int) error {
	return pprofGet(z, file, fmt.Sprintf("profile?seconds=%d", secs), time.Duration(secs+10)*time.Second)
}

// pprofHeap saves the ztunnel's heap profile after a GC
// (/debug/pprof/heap?gc=1): what its live objects hold, by allocation site.
func pprofHeap(z *meshbed.Ztunnel, file string) error {
	return pprofGet(z, file, "heap?gc=1", 30*time.Second)
}

// memStats are a Go process's allocation counters since it started, and
// its live heap and goroutine stacks.
type memStats struct{ mallocs, bytes, heap, stack uint64 }

// ztunnelMemStats sums the ztunnels' runtime.MemStats, read from the end
// of /debug/pprof/heap?debug=1; with gc, after a collection, so that heap
// is what is live.
func ztunnelMemStats(zs []*meshbed.Ztunnel, gc bool) (memStats, error) {
	var sum memStats
	what := "heap?debug=1"
	if gc {
		what += "&gc=1"
	}
	url := "http://127.0.0.1:15000/debug/pprof/" + what
	for _, z := range zs {
		var b strings.Builder
		err := ztunnelGet(z, url, &b, 30*time.Second)
		if gc && err == nil {
			// A second collection: the first only moves sync.Pools'
			// contents (batch buffers of 324 KiB) to their victim cache.
			b.Reset()
			err = ztunnelGet(z, url, &b, 30*time.Second)
		}
		if err != nil {
			return sum, err
		}
		fields := []struct {
			format string
			v      *uint64
		}{{"# Mallocs = %d", &sum.mallocs}, {"# TotalAlloc = %d", &sum.bytes}, {"# HeapAlloc = %d", &sum.heap}, {"# Stack = %d", &sum.stack}}
		got := 0
		for _, line := range strings.Split(b.String(), "\n") {
			for _, f := range fields {
				var v uint64
				if _, err := fmt.Sscanf(line, f.format, &v); err == nil {
					*f.v += v
					got++
				}
			}
		}
		if got != len(fields) {
			return sum, fmt.Errorf("memstats from %s: /debug/pprof/heap?debug=1 lacks Mallocs, TotalAlloc, HeapAlloc or Stack", z.Node.Name)
		}
	}
	return sum, nil
}

// pprofGet saves /debug/pprof/WHAT from the ztunnel's admin port.
func pprofGet(z *meshbed.Ztunnel, file, what string, timeout time.Duration) error {
	f, err := os.Create(file)
	if err != nil {
		return err
	}
	if err := ztunnelGet(z, "http://127.0.0.1:15000/debug/pprof/"+what, f, timeout); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

// ztunnelGet copies what url (on the ztunnel's node) answers to w.
func ztunnelGet(z *meshbed.Ztunnel, url string, w io.Writer, timeout time.Duration) error {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return err
	}
	// z.HTTP dials inside the node; its own timeout is for short requests.
	resp, err := (&http.Client{Transport: z.HTTP.Transport}).Do(req)
	if err != nil {
		return fmt.Errorf("%s from %s: %w", url, z.Node.Name, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		b, _ := io.ReadAll(resp.Body)
		return fmt.Errorf("%s from %s: %s: %s", url, z.Node.Name, resp.Status, b)
	}
	if _, err := io.Copy(w, resp.Body); err != nil {
		return fmt.Errorf("%s from %s: %w", url, z.Node.Name, err)
	}
	return nil
}

// hboneEvents sums one amber_hbone_events_total counter over the
// ztunnels' /metrics.
func hboneEvents(zs []*meshbed.Ztunnel, event string) (uint64, error) {
	var sum uint64
	prefix := `amber_hbone_events_total{event="` + event + `"} `
	for _, z := range zs {
		var b strings.Builder
		if err := ztunnelGet(z, "http://127.0.0.1:15020/metrics", &b, 30*time.Second); err != nil {
			return 0, err
		}
		found := false
		for _, line := range strings.Split(b.String(), "\n") {
			if v, ok := strings.CutPrefix(line, prefix); ok {
				n, err := strconv.ParseUint(strings.TrimSpace(v), 10, 64)
				if err != nil {
					return 0, fmt.Errorf("%s from %s: %w", prefix, z.Node.Name, err)
				}
				sum += n
				found = true
			}
		}
		if !found {
			return 0, fmt.Errorf("no %s in %s's /metrics", strings.TrimSpace(prefix), z.Node.Name)
		}
	}
	return sum, nil
}
