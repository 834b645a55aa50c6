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
// byte with AES-GCM (relays.go).
// allModes in the order each round runs them; reference modes measure
// throughput only.
var (
	allModes  = []string{"direct", "tcp-pair", "copy-pair", "aes-pair", "amber"}
	reference = map[string]bool{"copy-pair": true, "aes-pair": true}
)

func tunnel(args []string) error {
	fs := flag.NewFlagSet("tunnel", flag.ContinueOnError)
	dur := fs.Duration("duration", 3*time.Second, "length of each throughput and connection-rate measurement")
	rounds := fs.Int("rounds", 3, "measurement rounds (modes interleaved; medians reported)")
	rate := fs.Int("rate", 1000, "requests per second in the latency test")
	latDur := fs.Duration("latency-duration", 5*time.Second, "length of the latency test")
	idle := fs.Int("idle-conns", 1000, "idle tunnelled connections for the memory test")
	workers := fs.Int("conn-workers", 4, "parallel clients in the connection-rate test")
	only := fs.String("modes", strings.Join(allModes, ","), "modes to run, comma-separated (a subset is for profiling: the summary needs them all)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	tmp, err := os.MkdirTemp("", "amber-bench-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(tmp)
	bin, err := meshbed.BuildZtunnel(tmp)
	if err != nil {
		return err
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
	caDir := filepath.Join(tmp, "ca")

	// Each mode's setup returns its teardown; the amber mode also hands
	// back the ztunnels for the memory measurement.
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
	proxyPair := func(mode, relay string) func() (func() error, error) {
		return func() (func() error, error) {
			p := pairs[mode]
			nodes, err := load(p.client, p.server)
			var proxies []*exec.Cmd
			teardown := func() error {
				for _, c := range proxies {
					c.Process.Signal(syscall.SIGTERM)
					c.Wait()
				}
				return unload(nodes)
			}
			for _, nd := range nodes {
				if err != nil {
					break
				}
				var c *exec.Cmd
				if c, err = startProxyProcess(nd, relay); err == nil {
					proxies = append(proxies, c)
				}
			}
			if err != nil {
				return nil, errors.Join(err, teardown())
			}
			return teardown, nil
		}
	}
	setups := map[string]func() (func() error, error){
		"direct":    func() (func() error, error) { return func() error { return nil }, nil },
		"tcp-pair":  proxyPair("tcp-pair", "splice"),
		"copy-pair": proxyPair("copy-pair", "copy"),
		"aes-pair":  proxyPair("aes-pair", "aes-gcm"),
		"amber": func() (func() error, error) {
			p := pairs["amber"]
			nodes, err := load(p.client, p.server)
			ztunnels = nil
			teardown := func() error {
				var errs []error
				for _, z := range ztunnels {
					errs = append(errs, z.Stop())
				}
				return errors.Join(append(errs, unload(nodes))...)
			}
			for _, nd := range nodes {
				if err != nil {
					break
				}
				var z *meshbed.Ztunnel
				if z, err = meshbed.StartZtunnel(nd, bin, meshFile, caDir, io.Discard); err == nil {
					ztunnels = append(ztunnels, z)
				}
			}
			if err != nil {
				return nil, errors.Join(err, teardown())
			}
			return teardown, nil
		},
	}
	modes := strings.Split(*only, ",")
	for _, m := range modes {
		if setups[m] == nil {
			return fmt.Errorf("-modes: unknown mode %q (%s)", m, strings.Join(allModes, ", "))
		}
	}

	type result struct{ gbps, cps, p50, p99 []float64 }
	res := map[string]*result{}
	var idleRSS, perConn float64
	for r := 0; r < *rounds; r++ {
		for _, m := range modes {
			teardown, err := setups[m]()
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
			var gbps, cps, p50, p99 float64
			gbps, err = throughput(p.client, sink, *dur)
			if err == nil && !reference[m] {
				cps, err = connRate(p.client, sink, *dur, *workers)
			}
			if err == nil && !reference[m] {
				p50, p99, err = latency(p.client, echo, *rate, *latDur)
			}
			if err == nil && m == "amber" && r == 0 {
				idleRSS, perConn, err = idleMemory(p.client, echo, ztunnels, *idle)
			}
			if terr := teardown(); err == nil {
				err = terr
			}
			if err != nil {
				return fmt.Errorf("%s: %w", m, err)
			}
			rr.gbps, rr.cps, rr.p50, rr.p99 = append(rr.gbps, gbps), append(rr.cps, cps), append(rr.p50, p50), append(rr.p99, p99)
			if reference[m] {
				fmt.Fprintf(os.Stderr, "round %d %-9s %6.2f Gbit/s\n", r+1, m, gbps)
			} else {
				fmt.Fprintf(os.Stderr, "round %d %-9s %6.2f Gbit/s %7.0f conn/s  p50 %6.0f µs  p99 %6.0f µs\n", r+1, m, gbps, cps, p50, p99)
			}
		}
	}

	for _, m := range allModes {
		if res[m] == nil {
			return nil // a profiling run: the rounds above are the result
		}
	}
	d, t, c, g, a := res["direct"], res["tcp-pair"], res["copy-pair"], res["aes-pair"], res["amber"]
	fmt.Printf("\namber tunnel benchmark: pod→pod across two testbed nodes, medians of %d interleaved rounds\n\n", *rounds)
	fmt.Printf("| path | throughput Gbit/s | × direct | new conn/s | × tcp-pair | p50 µs | p99 µs | added p99 µs |\n|---|---|---|---|---|---|---|---|\n")
	row := func(name string, x *result) {
		fmt.Printf("| %s | %.2f | %.2f | %.0f | %.2f | %.0f | %.0f | %.0f |\n", name,
			median(x.gbps), median(x.gbps)/median(d.gbps), median(x.cps), median(x.cps)/median(t.cps),
			median(x.p50), median(x.p99), median(x.p99)-median(d.p99))
	}
	ref := func(name string, x *result) {
		fmt.Printf("| %s | %.2f | %.2f | – | – | – | – | – |\n", name, median(x.gbps), median(x.gbps)/median(d.gbps))
	}
	row("(a) direct pod→pod", d)
	row("(b) capture + plain splice TCP proxy on each node", t)
	ref("(b′) the same pair copying through user space (read + write per hop)", c)
	ref("(b″) the copying pair sealing/opening every byte with AES-128-GCM in 16 KiB records", g)
	row("(c) amber: capture + HBONE/mTLS between two ztunnels", a)
	addT, addA := median(t.p99)-median(d.p99), median(a.p99)-median(d.p99)
	fmt.Printf("\nthroughput (c)/(a) %.2f (goal ≥ 0.40) · added p99 (c)/(b) %.2f (goal ≤ 1.2) · conn/s (c)/(b) %.2f (goal ≥ 0.8)\n",
		median(a.gbps)/median(d.gbps), addA/addT, median(a.cps)/median(t.cps))
	fmt.Printf("throughput (c)/(b″) %.2f: amber against the bound for any proxy that encrypts in user space on this machine\n",
		median(a.gbps)/median(g.gbps))
	fmt.Printf("ztunnel idle RSS %.1f MiB per node · %.2f KiB per idle tunnelled connection (both ztunnels, %d connections; goal ≤ 8 KiB)\n",
		idleRSS/(1<<20), perConn/1024, *idle)
	return nil
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

// idleMemory opens n idle connections through the mesh and returns the
// ztunnels' RSS before (average per node) and the growth per connection
// (summed over both nodes, since each connection lives in both).
func idleMemory(p *testbed.Pod, dst netip.AddrPort, zs []*meshbed.Ztunnel, n int) (float64, float64, error) {
	rss := func() (int64, error) {
		var sum int64
		for _, z := range zs {
			r, err := z.RSS()
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
	time.Sleep(2 * time.Second) // let both ztunnels settle
	after, err := rss()
	if err != nil {
		return 0, 0, err
	}
	return float64(before) / float64(len(zs)), float64(after-before) / float64(n), nil
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
