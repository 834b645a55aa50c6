package main

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"runtime"
	"slices"
	"sort"
	"strings"
	"syscall"
	"time"

	"github.com/amber-mesh/amber/test/meshbed"
	"github.com/amber-mesh/amber/test/testbed"
	"github.com/amber-mesh/amber/test/tproxy"
)

// tunnel compares pod→pod traffic across two nodes: (a) direct, (b) a
// plain splice TCP proxy on each node (captured by amber's datapath), and
// (c) amber: capture + HBONE + mTLS between two amber-ztunnel processes.
// Two reference pairs between (b) and (c) measure throughput only: the
// same proxies copying through user space, and sealing/opening every
// byte with AES-GCM (relays.go). Two real peers, HAProxy's mutual-TLS
// pair and Istio's Go HBONE pair (peers.go), are measured like (b) and
// (c).
// allModes in the order each round runs them; reference modes measure
// throughput only; peers and amber also report idle memory.
var (
	allModes  = []string{"direct", "tcp-pair", "copy-pair", "aes-pair", "haproxy-pair", "istio-hbone-pair", "amber"}
	reference = map[string]bool{"copy-pair": true, "aes-pair": true}
	idleModes = map[string]bool{"haproxy-pair": true, "istio-hbone-pair": true, "amber": true}
)

// deployment is one mode set up: its proxy processes (none for direct)
// and its teardown.
type deployment struct {
	pids []int
	stop func() error
}

func tunnel(args []string) error {
	fs := flag.NewFlagSet("tunnel", flag.ContinueOnError)
	dur := fs.Duration("duration", 3*time.Second, "length of each throughput and connection-rate measurement")
	rounds := fs.Int("rounds", 3, "measurement rounds (modes interleaved; medians reported)")
	rate := fs.Int("rate", 1000, "requests per second in the latency test")
	latDur := fs.Duration("latency-duration", 5*time.Second, "length of the latency test")
	idle := fs.Int("idle-conns", 1000, "idle tunnelled connections for the memory test")
	workers := fs.Int("conn-workers", 4, "parallel clients in the connection-rate test")
	only := fs.String("modes", strings.Join(allModes, ","), "modes to run, comma-separated (a subset is for profiling: the summary needs them all)")
	profDir := fs.String("profile", "", "after the rounds, profile amber and the peers in one extra throughput and one connection-rate run each, outside the medians, into this directory: the ztunnels' Go CPU profiles (pprof) and `perf record -g` of each mode's proxy processes when perf is installed")
	if err := fs.Parse(args); err != nil {
		return err
	}
	modes := strings.Split(*only, ",")
	selected := map[string]bool{}
	for _, m := range modes {
		if !slices.Contains(allModes, m) {
			return fmt.Errorf("-modes: unknown mode %q (%s)", m, strings.Join(allModes, ", "))
		}
		selected[m] = true
	}
	if *profDir != "" {
		if err := os.MkdirAll(*profDir, 0o755); err != nil {
			return err
		}
	}
	ctx, tmp, done, err := scratch()
	if err != nil {
		return err
	}
	defer done()
	bin, err := meshbed.BuildZtunnel(tmp)
	if err != nil {
		return err
	}
	caDir := filepath.Join(tmp, "ca")
	clientFiles, serverFiles, err := peerCreds(caDir, filepath.Join(tmp, "peers"))
	if err != nil {
		return err
	}
	peerFiles := map[string]peerFiles{"client": clientFiles, "server": serverFiles}
	var haproxyVer, hboneBin string
	if selected["haproxy-pair"] {
		if haproxyVer, err = haproxyVersion(); err != nil {
			return err
		}
	}
	if selected["istio-hbone-pair"] {
		if hboneBin, err = hboneInteropBin(); err != nil {
			return err
		}
	}

	bed, n1, n2, err := twoNodes("tbench")
	if err != nil {
		return err
	}
	defer bed.Close()
	type pair struct{ client, server *testbed.Pod }
	pairs := map[string]pair{}
	for _, m := range allModes {
		c, err := n1.AddPod("c-" + m)
		if err != nil {
			return err
		}
		s, err := n2.AddPod("s-" + m)
		if err != nil {
			return err
		}
		pairs[m] = pair{c, s}
		stop, err := benchServer(s)
		if err != nil {
			return err
		}
		defer stop()
	}
	meshFile := filepath.Join(tmp, "mesh.yaml")
	mesh := meshbed.MeshYAML([]meshbed.Workload{
		{Name: "client", ServiceAccount: "client", Pod: pairs["amber"].client, HBONE: true},
		{Name: "server", ServiceAccount: "server", Pod: pairs["amber"].server, HBONE: true},
	}, "")
	if err := os.WriteFile(meshFile, []byte(mesh), 0o644); err != nil {
		return err
	}

	// Each mode's setup returns its deployment; the amber mode also hands
	// back the ztunnels for the profiles.
	var ztunnels []*meshbed.Ztunnel
	load := func(capture ...*testbed.Pod) ([]*meshbed.Node, error) {
		var nodes []*meshbed.Node
		for _, n := range []*testbed.Node{n1, n2} {
			nd, err := meshbed.LoadDatapath(n, "amber-bench")
			if err != nil {
				return nodes, err
			}
			nodes = append(nodes, nd)
			for _, p := range capture {
				if p.Node == n {
					if err := nd.Capture(p); err != nil {
						return nodes, err
					}
				}
			}
		}
		return nodes, nil
	}
	unload := func(nodes []*meshbed.Node) error {
		var errs []error
		for _, nd := range nodes {
			errs = append(errs, nd.Close())
		}
		return errors.Join(errs...)
	}
	// A proxy pair: each node's proxy is a process of its own, like a
	// ztunnel: a proxy inside this (busy) benchmark process would never pay
	// the wake-up of an idle process that each ztunnel hop does.
	proxyPair := func(mode, relay string) func() (*deployment, error) {
		return func() (*deployment, error) {
			p := pairs[mode]
			nodes, err := load(p.client, p.server)
			var proxies []*exec.Cmd
			d := &deployment{stop: func() error {
				for _, c := range proxies {
					c.Process.Signal(syscall.SIGTERM)
					c.Wait()
				}
				return unload(nodes)
			}}
			for _, nd := range nodes {
				if err != nil {
					break
				}
				var c *exec.Cmd
				if c, err = startProxyProcess(nd, relay); err == nil {
					proxies = append(proxies, c)
					d.pids = append(d.pids, c.Process.Pid)
				}
			}
			if err != nil {
				return nil, errors.Join(err, d.stop())
			}
			return d, nil
		}
	}
	// A peer pair: the processes peers.go starts, on a loaded datapath
	// with both pods captured.
	peerMode := func(mode string, start func(nodes []*meshbed.Node, client, server *testbed.Pod) ([]*peerProc, error)) func() (*deployment, error) {
		return func() (*deployment, error) {
			p := pairs[mode]
			nodes, err := load(p.client, p.server)
			var procs []*peerProc
			d := &deployment{stop: func() error { return errors.Join(stopPeers(procs), unload(nodes)) }}
			if err == nil {
				procs, err = start(nodes, p.client, p.server)
			}
			if err != nil {
				return nil, errors.Join(err, d.stop())
			}
			for _, pr := range procs {
				d.pids = append(d.pids, pr.cmd.Process.Pid)
			}
			return d, nil
		}
	}
	setups := map[string]func() (*deployment, error){
		"direct":    func() (*deployment, error) { return &deployment{stop: func() error { return nil }}, nil },
		"tcp-pair":  proxyPair("tcp-pair", "splice"),
		"copy-pair": proxyPair("copy-pair", "copy"),
		"aes-pair":  proxyPair("aes-pair", "aes-gcm"),
		"haproxy-pair": peerMode("haproxy-pair", func(nodes []*meshbed.Node, c, s *testbed.Pod) ([]*peerProc, error) {
			return startHAProxyPair(nodes, c, s, tmp, peerFiles)
		}),
		"istio-hbone-pair": peerMode("istio-hbone-pair", func(nodes []*meshbed.Node, c, s *testbed.Pod) ([]*peerProc, error) {
			return startHBONEPair(nodes, c, s, hboneBin, peerFiles)
		}),
		"amber": func() (*deployment, error) {
			p := pairs["amber"]
			nodes, err := load(p.client, p.server)
			ztunnels = nil
			d := &deployment{stop: func() error {
				var errs []error
				for _, z := range ztunnels {
					errs = append(errs, z.Stop())
				}
				return errors.Join(append(errs, unload(nodes))...)
			}}
			for _, nd := range nodes {
				if err != nil {
					break
				}
				var z *meshbed.Ztunnel
				if z, err = meshbed.StartZtunnel(nd, bin, meshFile, caDir, io.Discard); err == nil {
					ztunnels = append(ztunnels, z)
					d.pids = append(d.pids, z.Cmd.Process.Pid)
				}
			}
			if err != nil {
				return nil, errors.Join(err, d.stop())
			}
			return d, nil
		},
	}

	res := map[string]*result{}
	idleRSS, perConn := map[string]float64{}, map[string]float64{}
	for r := 0; r < *rounds; r++ {
		for _, m := range modes {
			if err := ctx.Err(); err != nil {
				return fmt.Errorf("interrupted: %w", context.Cause(ctx))
			}
			d, err := setups[m]()
			if err != nil {
				return fmt.Errorf("%s: %w", m, err)
			}
			p := pairs[m]
			sink := netip.AddrPortFrom(p.server.IPv4, 5001)
			echo := netip.AddrPortFrom(p.server.IPv4, 5002)
			if res[m] == nil {
				res[m] = &result{}
			}
			rr := res[m]
			var x sample
			x, err = measure(p.client, sink, echo, d.pids, !reference[m], *dur, *workers, *rate, *latDur)
			if err == nil && idleModes[m] && r == 0 {
				idleRSS[m], perConn[m], err = idleMemory(p.client, echo, d.pids, *idle, nil)
			}
			if terr := d.stop(); err == nil {
				err = terr
			}
			if err != nil {
				return fmt.Errorf("%s: %w", m, err)
			}
			rr.add(x)
			if reference[m] {
				fmt.Fprintf(os.Stderr, "round %d %-16s %6.2f Gbit/s\n", r+1, m, x.gbps)
			} else {
				fmt.Fprintf(os.Stderr, "round %d %-16s %6.2f Gbit/s %7.0f conn/s  p50 %6.0f µs  p99 %6.0f µs  CPU %4.2f s/GB %5.0f µs/conn\n", r+1, m, x.gbps, x.cps, x.p50, x.p99, x.cpuPerGB, x.cpuPerConn)
				if idleModes[m] && r == 0 {
					fmt.Fprintf(os.Stderr, "round %d %-16s idle RSS %.1f MiB per node · %.2f KiB per idle connection (both nodes)\n", r+1, m, idleRSS[m]/(1<<20), perConn[m]/1024)
				}
			}
		}
	}
	if *profDir != "" {
		for _, m := range []string{"tcp-pair", "amber", "haproxy-pair", "istio-hbone-pair"} {
			if !selected[m] {
				continue
			}
			if err := ctx.Err(); err != nil {
				return fmt.Errorf("interrupted: %w", context.Cause(ctx))
			}
			if err := profileMode(*profDir, m, setups[m], func() []*meshbed.Ztunnel { return ztunnels }, pairs[m].client, pairs[m].server, *dur, *workers, *rate, *latDur); err != nil {
				return fmt.Errorf("profile %s: %w", m, err)
			}
		}
		fmt.Fprintf(os.Stderr, "profiles in %s (go tool pprof FILE.pprof; perf report -i FILE.perf.data)\n", *profDir)
	}

	for _, m := range allModes {
		if res[m] == nil {
			return nil // a profiling run: the rounds above are the result
		}
	}
	printTunnelSummary(res, idleRSS, perConn, *rounds, *idle, haproxyVer)
	return nil
}

// sample is one round's measurements of one mode; zero where the mode
// does not measure it. CPU is the mode's proxy processes' (both nodes).
type sample struct {
	gbps, cps, p50, p99 float64
	cpuPerGB            float64 // CPU seconds per GB carried in the throughput test
	cpuPerConn          float64 // CPU µs per connection in the connection-rate test
}

// result holds a mode's samples over the rounds.
type result struct{ gbps, cps, p50, p99, cpuPerGB, cpuPerConn []float64 }

func (r *result) add(x sample) {
	r.gbps, r.cps, r.p50, r.p99 = append(r.gbps, x.gbps), append(r.cps, x.cps), append(r.p50, x.p50), append(r.p99, x.p99)
	r.cpuPerGB, r.cpuPerConn = append(r.cpuPerGB, x.cpuPerGB), append(r.cpuPerConn, x.cpuPerConn)
}

// measure runs the throughput test and, when full, the connection-rate
// and latency tests, metering the CPU of pids across the first two.
func measure(client *testbed.Pod, sink, echo netip.AddrPort, pids []int, full bool, dur time.Duration, workers, rate int, latDur time.Duration) (sample, error) {
	var x sample
	cpu, err := startCPU(pids)
	if err != nil {
		return x, err
	}
	var bytes int64
	if x.gbps, bytes, err = throughput(client, sink, dur); err != nil {
		return x, err
	}
	used, err := cpu.used()
	if err != nil {
		return x, err
	}
	if bytes > 0 {
		x.cpuPerGB = used.Seconds() / (float64(bytes) / 1e9)
	}
	if !full {
		return x, nil
	}
	if cpu, err = startCPU(pids); err != nil {
		return x, err
	}
	if x.cps, err = connRate(client, sink, dur, workers); err != nil {
		return x, err
	}
	if used, err = cpu.used(); err != nil {
		return x, err
	}
	if n := x.cps * dur.Seconds(); n > 0 {
		x.cpuPerConn = float64(used.Microseconds()) / n
	}
	x.p50, x.p99, err = latency(client, echo, rate, latDur)
	return x, err
}

// profileMode sets mode up once more and profiles its proxy processes
// through one throughput and one connection-rate run.
func profileMode(dir, mode string, setup func() (*deployment, error), ztunnels func() []*meshbed.Ztunnel, client, server *testbed.Pod, dur time.Duration, workers, rate int, latDur time.Duration) error {
	d, err := setup()
	if err != nil {
		return err
	}
	var zs []*meshbed.Ztunnel
	if mode == "amber" {
		zs = ztunnels()
	}
	if len(zs) > 0 {
		// First, while the processes are fresh (their RSS as in the
		// rounds): the ztunnels' live heap while idle connections are held,
		// where an idle connection's bytes are (go tool pprof
		// -sample_index inuse_space), beside its RSS.
		// The live heap and stacks, after a collection, before and while
		// they are held: exact, where RSS also counts the collector's
		// headroom and what it has not returned yet.
		before, err := ztunnelMemStats(zs, true)
		if err != nil {
			return errors.Join(err, d.stop())
		}
		var held memStats
		heap := func() error {
			var err error
			if held, err = ztunnelMemStats(zs, true); err != nil {
				return err
			}
			return saveHeaps(dir, mode+"-idle-heap", zs)
		}
		const n = 1000
		_, per, err := idleMemory(client, netip.AddrPortFrom(server.IPv4, 5002), d.pids, n, heap)
		if err != nil {
			return errors.Join(err, d.stop())
		}
		fmt.Fprintf(os.Stderr, "profile %-16s per idle connection, both ztunnels: %.0f B live heap · %.0f B goroutine stacks (Go runtime, after GC) · %.2f KiB RSS (%d connections)\n", mode,
			(float64(held.heap)-float64(before.heap))/n, (float64(held.stack)-float64(before.stack))/n, per/1024, n)
	}
	sink := netip.AddrPortFrom(server.IPv4, 5001)
	for _, phase := range []string{"throughput", "connrate", "latency"} {
		name := mode + "-" + phase
		var before memStats
		var dials uint64
		if phase == "connrate" && len(zs) > 0 {
			if before, err = ztunnelMemStats(zs, false); err == nil {
				err = saveHeaps(dir, name+"-heap-before", zs)
			}
			if err == nil {
				dials, err = hboneEvents(zs, "dials")
			}
			if err != nil {
				break
			}
		}
		pdur := dur
		if phase == "latency" {
			pdur = latDur
		}
		pr, perr := startProfile(dir, name, pdur, d.pids, zs, phase != "throughput")
		if perr == nil {
			var cps, p50, p99 float64
			switch phase {
			case "throughput":
				_, _, perr = throughput(client, sink, dur)
			case "connrate":
				cps, perr = connRate(client, sink, dur, workers)
			default:
				p50, p99, perr = latency(client, netip.AddrPortFrom(server.IPv4, 5002), rate, latDur)
			}
			perr = errors.Join(perr, pr.wait())
			// Counted over the measurement (perf is enabled before and
			// disabled after it): per connection or per request (a 1 KiB
			// message echoed), both nodes.
			unit, units := "connection", cps*dur.Seconds()
			if phase == "latency" {
				unit, units = "request", float64(rate)*latDur.Seconds()
			}
			if perr == nil && pr.stat != nil {
				var per []float64
				if per, perr = syscallsPer(filepath.Join(dir, name+".perf-stat.csv"), units); perr == nil {
					sched := per[3] + per[4] + per[5] + per[6]
					fmt.Fprintf(os.Stderr, "profile %-16s per %s, both nodes: %.1f syscalls (%.1f beside the Go scheduler's nanosleep, futex, epoll_pwait, sched_yield: %.1f · %.1f · %.1f · %.1f) · %.1f context switches · %.0f µs CPU (perf stat)\n",
						mode, unit, per[0], per[0]-sched, per[3], per[4], per[5], per[6], per[1], per[2]*1e3)
				}
			}
			if perr == nil && phase == "latency" {
				fmt.Fprintf(os.Stderr, "profile %-16s latency under the profilers: p50 %.0f µs, p99 %.0f µs\n", mode, p50, p99)
			}
			conns := units
			if perr == nil && phase == "connrate" && len(zs) > 0 {
				// Exact counts from the Go runtime, so load-insensitive;
				// a few admin-port requests of their own are included.
				var after memStats
				if after, perr = ztunnelMemStats(zs, false); perr == nil {
					perr = saveHeaps(dir, name+"-heap-after", zs)
				}
				if perr == nil {
					fmt.Fprintf(os.Stderr, "profile %-16s per connection, both ztunnels: %.0f allocations · %.1f KiB allocated (Go runtime)\n", mode,
						float64(after.mallocs-before.mallocs)/conns, float64(after.bytes-before.bytes)/conns/1024)
				}
				// Pooling: a new application connection should cost an
				// HTTP/2 stream, not a TLS handshake.
				var dialsAfter uint64
				if perr == nil {
					dialsAfter, perr = hboneEvents(zs, "dials")
				}
				if perr == nil {
					fmt.Fprintf(os.Stderr, "profile %-16s %.0f connections over %d new HBONE (TLS) connections\n", mode, conns, dialsAfter-dials)
				}
			}
		}
		if perr != nil {
			err = perr
			break
		}
	}
	return errors.Join(err, d.stop())
}

// saveHeaps saves each ztunnel's heap profile as PREFIX-NODE.pprof. The
// allocations between two of them (go tool pprof -sample_index
// alloc_objects -base BEFORE AFTER) are exact when the ztunnels run with
// GODEBUG=memprofilerate=1, which they inherit from this command.
func saveHeaps(dir, prefix string, zs []*meshbed.Ztunnel) error {
	var errs []error
	for _, z := range zs {
		errs = append(errs, pprofHeap(z, filepath.Join(dir, fmt.Sprintf("%s-%s.pprof", prefix, z.Node.Name))))
	}
	return errors.Join(errs...)
}

// printTunnelSummary prints the table and the ratios against the
// baselines and the peers.
func printTunnelSummary(res map[string]*result, idleRSS, perConn map[string]float64, rounds, idle int, haproxyVer string) {
	d, t, c, g, h, i, a := res["direct"], res["tcp-pair"], res["copy-pair"], res["aes-pair"], res["haproxy-pair"], res["istio-hbone-pair"], res["amber"]
	fmt.Printf("\namber tunnel benchmark: pod→pod across two testbed nodes, medians of %d interleaved rounds\n\n", rounds)
	fmt.Printf("| path | throughput Gbit/s | × direct | new conn/s | × tcp-pair | p50 µs | p99 µs | added p99 µs | proxy CPU s/GB | proxy CPU µs/conn |\n|---|---|---|---|---|---|---|---|---|---|\n")
	cpu := func(x *result) string {
		if x == d {
			return "– | –"
		}
		if x == c || x == g {
			return fmt.Sprintf("%.2f | –", median(x.cpuPerGB))
		}
		return fmt.Sprintf("%.2f | %.0f", median(x.cpuPerGB), median(x.cpuPerConn))
	}
	row := func(name string, x *result) {
		fmt.Printf("| %s | %.2f | %.2f | %.0f | %.2f | %.0f | %.0f | %.0f | %s |\n", name,
			median(x.gbps), median(x.gbps)/median(d.gbps), median(x.cps), median(x.cps)/median(t.cps),
			median(x.p50), median(x.p99), median(x.p99)-median(d.p99), cpu(x))
	}
	ref := func(name string, x *result) {
		fmt.Printf("| %s | %.2f | %.2f | – | – | – | – | – | %s |\n", name, median(x.gbps), median(x.gbps)/median(d.gbps), cpu(x))
	}
	row("(a) direct pod→pod", d)
	row("(b) capture + plain splice TCP proxy on each node", t)
	ref("(b′) the same pair copying through user space (read + write per hop)", c)
	ref("(b″) the copying pair sealing/opening every byte with AES-128-GCM in 16 KiB records", g)
	row(fmt.Sprintf("(h) capture + HAProxy %s mutual-TLS 1.3 pair (OpenSSL): one TLS connection per client connection, destination in a PROXY v2 header before TLS, server side dials from the node's address", haproxyVer), h)
	row("(i) capture + Istio's Go pkg/hbone pair: HTTP/2 CONNECT over mTLS, all streams on one connection, server side dials from the node's address", i)
	row("(c) amber: capture + HBONE/mTLS between two ztunnels", a)
	addT, addA := median(t.p99)-median(d.p99), median(a.p99)-median(d.p99)
	addH, addI := median(h.p99)-median(d.p99), median(i.p99)-median(d.p99)
	fmt.Printf("\nthroughput (c)/(a) %.2f (goal ≥ 0.40) · added p99 (c)/(b) %.2f (goal ≤ 1.2) · conn/s (c)/(b) %.2f (goal ≥ 0.8)\n",
		median(a.gbps)/median(d.gbps), addA/addT, median(a.cps)/median(t.cps))
	fmt.Printf("throughput (c)/(b″) %.2f: amber against the bound for any proxy that encrypts in user space on this machine\n",
		median(a.gbps)/median(g.gbps))
	for _, peer := range []struct {
		name string
		x    *result
		add  float64
	}{{"(h) HAProxy", h, addH}, {"(i) Istio pkg/hbone", i, addI}} {
		fmt.Printf("amber against %s: throughput (c)/(%s) %.2f (goal ≥ 1) · added p99 %.0f vs %.0f µs (%.2f×) · conn/s (c)/(%s) %.2f · CPU per GB %.2f× · CPU per connection %.2f×\n",
			peer.name, peer.name[1:2], median(a.gbps)/median(peer.x.gbps), addA, peer.add, addA/peer.add,
			peer.name[1:2], median(a.cps)/median(peer.x.cps),
			median(a.cpuPerGB)/median(peer.x.cpuPerGB), median(a.cpuPerConn)/median(peer.x.cpuPerConn))
	}
	fmt.Printf("ztunnel idle RSS %.1f MiB per node · %.2f KiB per idle tunnelled connection (both ztunnels, %d connections; goal ≤ 4 KiB)\n",
		idleRSS["amber"]/(1<<20), perConn["amber"]/1024, idle)
	fmt.Printf("per idle connection, both nodes: amber %.2f KiB · HAProxy %.2f KiB · Istio pkg/hbone %.2f KiB (idle RSS per node %.1f · %.1f · %.1f MiB)\n",
		perConn["amber"]/1024, perConn["haproxy-pair"]/1024, perConn["istio-hbone-pair"]/1024,
		idleRSS["amber"]/(1<<20), idleRSS["haproxy-pair"]/(1<<20), idleRSS["istio-hbone-pair"]/(1<<20))
}

// benchServer runs, in pod p, a sink on :5001 (throughput and the
// connection-rate request) and an echo of 1 KiB messages on :5002.
func benchServer(p *testbed.Pod) (func(), error) {
	stopSink, err := sinkServer(p)
	if err != nil {
		return nil, err
	}
	ln, err := p.Listen("tcp", "[::]:5002")
	if err != nil {
		stopSink()
		return nil, err
	}
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				io.Copy(c, c)
			}()
		}
	}()
	return func() { stopSink(); ln.Close() }, nil
}

// latency sends 1 KiB requests at a fixed rate over one connection and
// returns the p50 and p99 round trip in µs.
func latency(p *testbed.Pod, dst netip.AddrPort, rate int, d time.Duration) (float64, float64, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	c, err := p.Dial(ctx, "tcp", dst.String())
	cancel()
	if err != nil {
		return 0, 0, err
	}
	defer c.Close()
	req := bytes.Repeat([]byte{'x'}, 1024)
	resp := make([]byte, len(req))
	interval := time.Second / time.Duration(rate)
	var rtts []float64
	next := time.Now()
	end := next.Add(d)
	for next.Before(end) {
		time.Sleep(time.Until(next))
		start := time.Now()
		c.SetDeadline(start.Add(2 * time.Second))
		if _, err := c.Write(req); err != nil {
			return 0, 0, err
		}
		if _, err := io.ReadFull(c, resp); err != nil {
			return 0, 0, err
		}
		rtts = append(rtts, float64(time.Since(start).Microseconds()))
		next = next.Add(interval)
	}
	sort.Float64s(rtts)
	return rtts[len(rtts)/2], rtts[len(rtts)*99/100], nil
}

// idleMemory opens n idle connections through the pair and returns its
// proxy processes' RSS before (average per node) and the growth per
// connection (summed over both nodes, since each connection lives in
// both).
//
// held, when set, runs while the connections are open and idle.
func idleMemory(p *testbed.Pod, dst netip.AddrPort, pids []int, n int, held func() error) (float64, float64, error) {
	rss := func() (int64, error) {
		var sum int64
		for _, pid := range pids {
			r, err := meshbed.RSS(pid)
			if err != nil {
				return 0, err
			}
			sum += r
		}
		return sum, nil
	}
	runtime.GC()
	before, err := rss()
	if err != nil {
		return 0, 0, err
	}
	var conns []net.Conn
	defer func() {
		for _, c := range conns {
			c.Close()
		}
	}()
	one := []byte{'x'}
	for i := 0; i < n; i++ {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		c, err := p.Dial(ctx, "tcp", dst.String())
		cancel()
		if err != nil {
			return 0, 0, fmt.Errorf("idle conn %d: %w", i, err)
		}
		conns = append(conns, c)
		// One byte each way: the tunnel is established end to end, then idle.
		c.SetDeadline(time.Now().Add(5 * time.Second))
		if _, err := c.Write(one); err == nil {
			_, err = io.ReadFull(c, one)
		}
		if err != nil {
			return 0, 0, fmt.Errorf("idle conn %d: %w", i, err)
		}
	}
	time.Sleep(2 * time.Second) // let the proxies settle
	after, err := rss()
	if err != nil {
		return 0, 0, err
	}
	if held != nil {
		if err := held(); err != nil {
			return 0, 0, err
		}
	}
	return float64(before) / float64(len(pids)), float64(after-before) / float64(n), nil
}

// startProxyProcess runs this command's tproxy mode inside nd's namespace,
// registered in nd's listener map, and waits until it is ready.
func startProxyProcess(nd *meshbed.Node, relay string) (*exec.Cmd, error) {
	exe, err := os.Executable()
	if err != nil {
		return nil, err
	}
	c := nd.Command(context.Background(), exe, "tproxy", nd.Root, relay)
	c.Stderr = os.Stderr
	out, err := c.StdoutPipe()
	if err != nil {
		return nil, err
	}
	if err := c.Start(); err != nil {
		return nil, err
	}
	line, err := bufio.NewReader(out).ReadString('\n')
	if err != nil || line != "ready\n" {
		c.Process.Kill()
		c.Wait()
		return nil, fmt.Errorf("tproxy process on %s: %q %v", nd.Name, line, err)
	}
	return c, nil
}

// proxyMain is the tproxy mode: a transparent splice proxy in the current
// network namespace, registered in the listener map pinned at root,
// preserving sources, until SIGTERM.
func proxyMain(root, relay string) error {
	opts := tproxy.Options{PreserveSource: true}
	switch relay {
	case "splice":
	case "aes-gcm":
		opts.Relay = aeadRelay
	case "copy":
		opts.Relay = copyRelay
	default:
		return fmt.Errorf("unknown relay %q", relay)
	}
	px, err := tproxy.Start(opts)
	if err != nil {
		return err
	}
	defer px.Close()
	if err := px.Register(root); err != nil {
		return err
	}
	fmt.Println("ready")
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
	<-sig
	return nil
}
