package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/amber-mesh/amber/bpf"
	"github.com/amber-mesh/amber/bpf/hostnet"
	"github.com/amber-mesh/amber/test/testbed"
	"github.com/amber-mesh/amber/test/tproxy"
)

// datapath compares, on a two-node testbed, pod→pod traffic across the
// uplink (a) direct, (b) captured by amber into a splice proxy and (c)
// steered by nftables TPROXY into the same proxy.
func datapath(args []string) error {
	fs := flag.NewFlagSet("datapath", flag.ContinueOnError)
	dur := fs.Duration("duration", 3*time.Second, "length of each measurement")
	rounds := fs.Int("rounds", 3, "measurement rounds (modes interleaved; the median is reported)")
	workers := fs.Int("conn-workers", 4, "parallel clients in the connection-rate test")
	if err := fs.Parse(args); err != nil {
		return err
	}

	bed, n1, n2, err := twoNodes("bench")
	if err != nil {
		return err
	}
	defer bed.Close()
	server, err := n2.AddPod("server")
	if err != nil {
		return err
	}
	clients := map[string]*testbed.Pod{}
	for _, m := range []string{"direct", "amber", "tproxy"} {
		if clients[m], err = n1.AddPod(m); err != nil {
			return err
		}
	}
	stopSrv, err := sinkServer(server)
	if err != nil {
		return err
	}
	defer stopSrv()
	dst := netip.AddrPortFrom(server.IPv4, 5001)

	modes := []struct {
		name  string
		setup func() (func() error, error)
	}{
		{"direct", func() (func() error, error) { return func() error { return nil }, nil }},
		{"amber", func() (func() error, error) { return setupAmber(n1, clients["amber"]) }},
		{"tproxy", func() (func() error, error) { return setupNFT(n1, clients["tproxy"]) }},
	}
	tput := map[string][]float64{}
	rate := map[string][]float64{}
	for r := 0; r < *rounds; r++ {
		for _, m := range modes {
			teardown, err := m.setup()
			if err != nil {
				return fmt.Errorf("%s: %w", m.name, err)
			}
			gbps, _, err := throughput(clients[m.name], dst, *dur)
			if err == nil {
				tput[m.name] = append(tput[m.name], gbps)
				var cps float64
				cps, err = connRate(clients[m.name], dst, *dur, *workers)
				rate[m.name] = append(rate[m.name], cps)
			}
			if terr := teardown(); err == nil {
				err = terr
			}
			if err != nil {
				return fmt.Errorf("%s: %w", m.name, err)
			}
			fmt.Fprintf(os.Stderr, "round %d %-7s %6.2f Gbit/s %8.0f conn/s\n", r+1, m.name, last(tput[m.name]), last(rate[m.name]))
		}
	}

	d, a, t := median(tput["direct"]), median(tput["amber"]), median(tput["tproxy"])
	dc, ac, tc := median(rate["direct"]), median(rate["amber"]), median(rate["tproxy"])
	fmt.Printf("\namber datapath benchmark: pod→pod across two testbed nodes, median (min–max) of %d interleaved rounds of %s\n\n", *rounds, *dur)
	fmt.Printf("| path | throughput Gbit/s | × direct | new conn/s | × direct |\n|---|---|---|---|---|\n")
	row := func(name, mode string, base, baseC float64) {
		fmt.Printf("| %s | %.2f (%.2f–%.2f) | %.2f | %.0f (%.0f–%.0f) | %.2f |\n", name,
			median(tput[mode]), minOf(tput[mode]), maxOf(tput[mode]), median(tput[mode])/base,
			median(rate[mode]), minOf(rate[mode]), maxOf(rate[mode]), median(rate[mode])/baseC)
	}
	row("(a) direct pod→pod", "direct", d, dc)
	row("(b) amber capture (TCX + sk_assign) → splice proxy", "amber", d, dc)
	row("(c) nftables TPROXY → same splice proxy", "tproxy", d, dc)
	fmt.Printf("\n(b)/(c): throughput %.3f, connection rate %.3f (goal: ≥ 0.95 and ≥ 1.00)\n", a/t, ac/tc)
	return nil
}

// twoNodes is the benchmarks' testbed: two nodes joined by their uplinks.
func twoNodes(name string) (*testbed.Testbed, *testbed.Node, *testbed.Node, error) {
	bed, err := testbed.NewBed(name)
	if err != nil {
		return nil, nil, nil, err
	}
	n1, err := bed.AddNode("n1")
	if err != nil {
		return nil, nil, nil, errors.Join(err, bed.Close())
	}
	n2, err := bed.AddNode("n2")
	if err != nil {
		return nil, nil, nil, errors.Join(err, bed.Close())
	}
	return bed, n1, n2, nil
}

func last(v []float64) float64 {
	if len(v) == 0 {
		return 0
	}
	return v[len(v)-1]
}

func minOf(v []float64) float64 {
	s := append([]float64(nil), v...)
	sort.Float64s(s)
	return s[0]
}

func maxOf(v []float64) float64 {
	s := append([]float64(nil), v...)
	sort.Float64s(s)
	return s[len(s)-1]
}

func median(v []float64) float64 {
	if len(v) == 0 {
		return 0
	}
	s := append([]float64(nil), v...)
	sort.Float64s(s)
	return s[len(s)/2]
}

// sinkServer discards what it reads and answers one byte per "r" request:
// throughput and connection-rate clients share it.
func sinkServer(p *testbed.Pod) (func(), error) {
	ln, err := p.Listen("tcp", "[::]:5001")
	if err != nil {
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
				buf := make([]byte, 256<<10)
				for {
					n, err := c.Read(buf)
					if n == 1 && buf[0] == 'r' {
						c.Write([]byte{'k'})
					}
					if err != nil {
						return
					}
				}
			}()
		}
	}()
	return func() { ln.Close() }, nil
}

// throughput streams for d over one connection and returns Gbit/s as the
// client wrote it (the receiver drains everything before close returns)
// and the bytes written.
func throughput(p *testbed.Pod, dst netip.AddrPort, d time.Duration) (float64, int64, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, err := p.Dial(ctx, "tcp", dst.String())
	if err != nil {
		return 0, 0, err
	}
	defer c.Close()
	buf := make([]byte, 256<<10)
	var n int64
	start := time.Now()
	c.SetWriteDeadline(start.Add(d))
	for {
		w, err := c.Write(buf)
		n += int64(w)
		if err != nil {
			break
		}
	}
	return float64(n*8) / time.Since(start).Seconds() / 1e9, n, nil
}

// connRate opens connections with one request/response each, from several
// workers, for d; returns completed connections per second.
func connRate(p *testbed.Pod, dst netip.AddrPort, d time.Duration, workers int) (float64, error) {
	var done atomic.Int64
	var firstErr atomic.Value
	deadline := time.Now().Add(d)
	var wg sync.WaitGroup
	start := time.Now()
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			b := make([]byte, 1)
			for time.Now().Before(deadline) {
				ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
				c, err := p.Dial(ctx, "tcp", dst.String())
				cancel()
				if err != nil {
					firstErr.CompareAndSwap(nil, err)
					return
				}
				c.SetDeadline(time.Now().Add(2 * time.Second))
				if _, err := c.Write([]byte{'r'}); err == nil {
					_, err = io.ReadFull(c, b)
				}
				// RST instead of FIN: the client pod would otherwise run out
				// of ports to TIME_WAIT long before the datapath is the limit.
				c.(*net.TCPConn).SetLinger(0)
				c.Close()
				if err != nil {
					firstErr.CompareAndSwap(nil, err)
					return
				}
				done.Add(1)
			}
		}()
	}
	wg.Wait()
	if err, ok := firstErr.Load().(error); ok {
		return 0, fmt.Errorf("connection rate: %w", err)
	}
	return float64(done.Load()) / time.Since(start).Seconds(), nil
}

// setupAmber loads the datapath on node n, attaches it to the node's
// namespace, the uplink and the client's veth, captures the client and
// starts the proxy.
func setupAmber(n *testbed.Node, client *testbed.Pod) (func() error, error) {
	root := filepath.Join("/sys/fs/bpf", fmt.Sprintf("amber-bench-%d", os.Getpid()))
	var dp *bpf.Datapath
	err := n.Do(func() (err error) {
		if err := hostnet.Ensure(hostnet.Config{}); err != nil {
			return err
		}
		if dp, err = bpf.Load(bpf.Config{PinRoot: root}); err != nil {
			return err
		}
		if err := dp.Attach(0, bpf.RoleNode); err != nil {
			return err
		}
		if err := dp.Attach(n.UplinkIndex, bpf.RoleUplink); err != nil {
			return err
		}
		return dp.Attach(client.HostIndex, bpf.RolePod)
	})
	uninstall := func() error {
		if dp != nil {
			dp.Close()
		}
		return n.Do(func() error {
			return errors.Join(bpf.Uninstall(bpf.Config{PinRoot: root}), hostnet.Remove(hostnet.Config{}))
		})
	}
	if err == nil {
		err = dp.Capture(client.HostIndex, []netip.Addr{client.IPv4, client.IPv6})
	}
	var px *tproxy.Proxy
	if err == nil {
		px, err = tproxy.Start(tproxy.Options{Do: n.Do, PreserveSource: true})
	}
	if err == nil {
		err = px.Register(root)
	}
	if err != nil {
		if px != nil {
			px.Close()
		}
		uninstall()
		return nil, err
	}
	return func() error {
		px.Close()
		return uninstall()
	}, nil
}

// setupNFT steers the client's new connections into the same proxy with
// the classic TPROXY recipe: a transparent-socket match for packets of
// existing proxy connections, tproxy for new ones, and the same fwmark
// routing amber uses.
func setupNFT(n *testbed.Node, client *testbed.Pod) (func() error, error) {
	mark := fmt.Sprintf("%#x", hostnet.DefaultMark)
	rules := strings.Join([]string{
		"table inet amberbench {",
		" chain prerouting {",
		"  type filter hook prerouting priority mangle; policy accept;",
		"  meta l4proto tcp socket transparent 1 meta mark set " + mark + " accept",
		"  iifname \"" + client.HostVeth + "\" meta l4proto tcp tproxy to :15001 meta mark set " + mark + " accept",
		" }",
		"}",
	}, "\n")
	if err := n.Do(func() error { return hostnet.Ensure(hostnet.Config{}) }); err != nil {
		return nil, err
	}
	if out, err := nft(n, rules); err != nil {
		return nil, fmt.Errorf("nft: %v: %s", err, out)
	}
	px, err := tproxy.Start(tproxy.Options{Do: n.Do, PreserveSource: true})
	teardown := func() error {
		if px != nil {
			px.Close()
		}
		if out, err := nft(n, "delete table inet amberbench"); err != nil {
			return fmt.Errorf("nft: %v: %s", err, out)
		}
		return n.Do(func() error { return hostnet.Remove(hostnet.Config{}) })
	}
	if err != nil {
		teardown()
		return nil, err
	}
	return teardown, nil
}

func nft(n *testbed.Node, script string) ([]byte, error) {
	cmd := n.Command(context.Background(), "nft", "-f", "-")
	cmd.Stdin = strings.NewReader(script)
	return cmd.CombinedOutput()
}
