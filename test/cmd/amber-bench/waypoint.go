package main

import (
	"bytes"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/amber-mesh/amber/test/istiod"
	"github.com/amber-mesh/amber/test/istiodbed"
	"github.com/amber-mesh/amber/test/meshbed"
	"github.com/amber-mesh/amber/test/promtext"
	"github.com/amber-mesh/amber/test/testbed"
)

// waypointModes in the order each round runs them.
var waypointModes = []string{"direct", "ztunnel", "waypoint", "rproxy"}

// benchPolicy admits the client to the bench Service's waypoint, so that
// amber-waypoint's RBAC runs on every request as it would in a mesh.
const benchPolicy = `apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: bench
  namespace: default
spec:
  targetRefs:
  - kind: Service
    group: ""
    name: bench
  action: ALLOW
  rules:
  - from:
    - source:
        principals: ["cluster.local/ns/default/sa/client"]
    to:
    - operation:
        methods: ["POST"]
`

// waypointBench measures HTTP/1.1 keep-alive requests of 1 KiB (1 KiB
// answers) from a client pod on one testbed node with a real istiod:
// (a) direct to an uncaptured server, (b) through amber-ztunnel to the
// server pod's address, (c) through amber-ztunnel and amber-waypoint to a
// Service bound to it, and (d) the same with a plain
// httputil.ReverseProxy over the same HBONE in the waypoint's place
// (rproxy.go): the floor for a Go L7 hop. Each round runs every mode at
// its maximum rate over several connections and at a fixed rate over one;
// medians over the rounds are printed with ratios against (a), and the
// added p99 of (c) against (d)'s.
func waypointBench(args []string) error {
	fs := flag.NewFlagSet("waypoint", flag.ContinueOnError)
	rounds := fs.Int("rounds", 3, "measurement rounds (modes interleaved; medians reported)")
	dur := fs.Duration("duration", 3*time.Second, "length of each maximum-rate measurement")
	conns := fs.Int("conns", 8, "keep-alive connections in the maximum-rate measurement")
	rate := fs.Int("rate", 500, "requests per second in the fixed-rate measurement, over one connection")
	latDur := fs.Duration("latency-duration", 5*time.Second, "length of the fixed-rate measurement")
	if err := fs.Parse(args); err != nil {
		return err
	}
	ctx, tmp, done, err := scratch()
	if err != nil {
		return err
	}
	defer done()
	zbin, err := meshbed.BuildZtunnel(tmp)
	if err != nil {
		return err
	}
	wbin, err := meshbed.BuildWaypoint(tmp)
	if err != nil {
		return err
	}
	return withTB("waypoint", func(tb testing.TB) error {
		b := setupWaypointBench(tb, zbin, wbin, tmp)
		type result struct{ rps, p50, p99, cpu, rss []float64 }
		res := map[string]*result{}
		for r := range *rounds {
			for _, m := range waypointModes {
				if err := ctx.Err(); err != nil {
					return fmt.Errorf("interrupted: %w", err)
				}
				p := b.paths[m]
				rps, err := maxRate(p.client, p.url, *conns, *dur)
				if err != nil {
					return fmt.Errorf("%s: %w", m, err)
				}
				var cpu0 time.Duration
				if p.proxy != nil {
					if cpu0, err = p.proxy.CPU(); err != nil {
						return err
					}
				}
				start := time.Now()
				p50, p99, n, err := fixedRate(p.client, p.url, *rate, *latDur)
				if err != nil {
					return fmt.Errorf("%s: %w", m, err)
				}
				elapsed := time.Since(start)
				var cpu, rss float64
				if p.proxy != nil {
					cpu1, err := p.proxy.CPU()
					if err != nil {
						return err
					}
					// vCPU per 1000 requests per second.
					cpu = (cpu1 - cpu0).Seconds() / elapsed.Seconds() / (float64(n) / elapsed.Seconds()) * 1000
					r, err := p.proxy.RSS()
					if err != nil {
						return err
					}
					rss = float64(r) / (1 << 20)
				}
				if res[m] == nil {
					res[m] = &result{}
				}
				x := res[m]
				x.rps, x.p50, x.p99, x.cpu, x.rss = append(x.rps, rps), append(x.p50, p50), append(x.p99, p99), append(x.cpu, cpu), append(x.rss, rss)
				fmt.Fprintf(os.Stderr, "round %d %-8s %7.0f req/s  p50 %5.0f µs  p99 %5.0f µs", r+1, m, rps, p50, p99)
				if p.proxy != nil {
					fmt.Fprintf(os.Stderr, "  %.3f vCPU per 1000 req/s  RSS %.1f MiB", cpu, rss)
				}
				fmt.Fprintln(os.Stderr)
			}
		}

		d, z, w, rp := res["direct"], res["ztunnel"], res["waypoint"], res["rproxy"]
		fmt.Printf("\namber waypoint benchmark: HTTP/1.1 keep-alive, 1 KiB requests and answers, client → server on one testbed node with istiod; medians of %d interleaved rounds\n\n", *rounds)
		fmt.Printf("| path | max req/s (%d conns) | × direct | p50 µs at %d req/s | p99 µs | added p99 µs over (b) |\n|---|---|---|---|---|---|\n", *conns, *rate)
		row := func(name string, x *result, added bool) {
			fmt.Printf("| %s | %.0f | %.2f | %.0f | %.0f |", name, median(x.rps), median(x.rps)/median(d.rps), median(x.p50), median(x.p99))
			if added {
				fmt.Printf(" %.0f |\n", median(x.p99)-median(z.p99))
			} else {
				fmt.Printf(" – |\n")
			}
		}
		row("(a) direct pod→pod", d, false)
		row("(b) amber-ztunnel (pod address, no waypoint)", z, false)
		row("(c) amber-ztunnel + amber-waypoint (Service, L7 policy)", w, true)
		row("(d) amber-ztunnel + httputil.ReverseProxy over the same HBONE", rp, true)
		addW, addRP := median(w.p99)-median(z.p99), median(rp.p99)-median(z.p99)
		fmt.Printf("\nadded p99 (c)/(d) %.2f (goal ≤ 1.3) · max req/s (c)/(d) %.2f\n", addW/addRP, median(w.rps)/median(rp.rps))
		fmt.Printf("amber-waypoint %.3f vCPU per 1000 req/s (goal ≤ 0.25), RSS %.1f MiB (goal ≤ 60 MB per 1000 req/s) · ReverseProxy %.3f vCPU, RSS %.1f MiB\n",
			median(w.cpu), median(w.rss), median(rp.cpu), median(rp.rss))
		return nil
	})
}

// benchPath is one mode: where its client sends, and the L7 proxy on the
// way whose processor time and memory are measured (nil for none).
type benchPath struct {
	client *testbed.Pod
	url    string
	proxy  *meshbed.Process
}

type waypointBed struct {
	paths map[string]benchPath
}

// setupWaypointBench builds the mesh: istiod and amber-ztunnel on one
// node, the client and server pods (captured), an uncaptured pair for
// (a), the Service bench bound to amber-waypoint (the namespace's
// waypoint) and bench-rp bound to the ReverseProxy's waypoint; it returns
// once every path answers and its server sees the peer the path implies
// (the client, or the proxy's pod address behind a waypoint).
func setupWaypointBench(tb testing.TB, zbin, wbin, tmp string) *waypointBed {
	logs := func(name string) io.Writer {
		f, err := os.Create(filepath.Join(tmp, name+".log"))
		if err != nil {
			tb.Fatal(err)
		}
		tb.Cleanup(func() { f.Close() })
		return f
	}
	m := istiodbed.Start(tb, istiodbed.Options{ZtunnelBin: zbin, WaypointBin: wbin, Log: logs})
	nd := m.Nodes[0]
	m.LabelNamespace(tb, map[string]string{"istio.io/use-waypoint": "waypoint"})
	client := m.AddPod(tb, nd, istiodbed.Pod{Name: "client", Enrolled: true})
	server := m.AddPod(tb, nd, istiodbed.Pod{Name: "server", Enrolled: true})
	dclient := m.AddPod(tb, nd, istiodbed.Pod{Name: "direct-client"})
	dserver := m.AddPod(tb, nd, istiodbed.Pod{Name: "direct-server"})
	peers := map[*testbed.Pod]*atomic.Pointer[netip.Addr]{}
	for _, p := range []*testbed.Pod{server, dserver} {
		peers[p] = startBenchServer(tb, p)
	}
	port := []corev1.ServicePort{{Name: "http", Port: 8080, TargetPort: intstr.FromInt32(8080), Protocol: corev1.ProtocolTCP}}
	svc := m.AddService(tb, &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: "bench"},
		Spec:       corev1.ServiceSpec{Selector: map[string]string{"app": "server"}, Ports: port},
	})
	rpSvc := m.AddService(tb, &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: "bench-rp", Labels: map[string]string{"istio.io/use-waypoint": "rp"}},
		Spec:       corev1.ServiceSpec{Selector: map[string]string{"app": "server"}, Ports: port},
	})
	m.Apply(tb, benchPolicy)
	wp := m.AddWaypoint(tb, nd, "waypoint")
	rpPod := m.CreateWaypoint(tb, nd, "rp")
	rp := startRProxy(tb, m, rpPod, server, logs("rproxy"))

	at := func(ip string) string { return "http://" + net.JoinHostPort(ip, "8080") + "/" }
	b := &waypointBed{paths: map[string]benchPath{
		"direct":   {client: dclient, url: at(dserver.IPv4.String())},
		"ztunnel":  {client: client, url: at(server.IPv4.String())},
		"waypoint": {client: client, url: at(svc.Spec.ClusterIP), proxy: wp.Process},
		"rproxy":   {client: client, url: at(rpSvc.Spec.ClusterIP), proxy: rp},
	}}
	want := map[string]struct {
		server *testbed.Pod
		peer   netip.Addr
	}{
		"direct":   {dserver, dclient.IPv4},
		"ztunnel":  {server, client.IPv4},
		"waypoint": {server, wp.Pod.IPv4},
		"rproxy":   {server, rpPod.Pod.IPv4},
	}
	for _, mode := range waypointModes {
		p, w := b.paths[mode], want[mode]
		h := podClient(p.client)
		deadline := time.Now().Add(time.Minute)
		for {
			err := post(h, p.url)
			if err == nil {
				if got := peers[w.server].Load(); got == nil || *got != w.peer {
					err = fmt.Errorf("the server saw %v, want %s", got, w.peer)
				}
			}
			if err == nil {
				break
			}
			if time.Now().After(deadline) {
				tb.Fatalf("%s path %s: %v", mode, p.url, err)
			}
			time.Sleep(100 * time.Millisecond)
		}
		h.CloseIdleConnections()
	}
	// The peer address cannot tell (b) from a path around the ztunnel:
	// its metrics can.
	_, body, err := nd.Ztunnel.Get(15020, "/stats/prometheus")
	if err != nil {
		tb.Fatal(err)
	}
	opened, err := promtext.Parse(strings.NewReader(body), "istio_tcp_connections_opened_total")
	if err != nil {
		tb.Fatal(err)
	}
	if n := promtext.Sum(opened, map[string]string{"reporter": "destination", "source_workload": "client", "destination_workload": "server", "connection_security_policy": "mutual_tls"}); n < 1 {
		tb.Fatalf("the ztunnel counted no mutual-TLS connection from client to server")
	}
	if n := promtext.Sum(opened, map[string]string{"source_workload": "direct-client"}); n != 0 {
		tb.Fatalf("the ztunnel counted %v connections of the direct path", n)
	}
	return b
}

// startRProxy runs this command's rproxy mode in the waypoint pod wp, in
// amber-waypoint's place, with the pod's token and istiod reached through
// a forwarder on its loopback; backend is the server pod.
func startRProxy(tb testing.TB, m *istiodbed.Mesh, wp meshbed.WaypointPod, backend *testbed.Pod, log io.Writer) *meshbed.Process {
	tb.Helper()
	exe, err := os.Executable()
	if err != nil {
		tb.Fatal(err)
	}
	dir := tb.TempDir()
	token, root := filepath.Join(dir, "istio-token"), filepath.Join(dir, "root-cert.pem")
	if err := errors.Join(os.WriteFile(token, wp.Token, 0o600), os.WriteFile(root, wp.RootPEM, 0o644)); err != nil {
		tb.Fatal(err)
	}
	fwd := meshbed.MustForward(tb, wp.Pod, "127.0.0.1:15012", wp.Istiod)
	cmd := wp.Pod.Command(context.Background(), exe, "rproxy",
		"-istiod", fwd.Addr.String(), "-istiod-server-name", istiod.ServerName,
		"-root-cert", root, "-token-file", token,
		"-id", "spiffe://cluster.local/ns/"+wp.Namespace+"/sa/"+wp.ServiceAccount,
		"-backend", netip.AddrPortFrom(backend.IPv4, 8080).String(),
		"-backend-id", "spiffe://cluster.local/ns/"+istiodbed.Namespace+"/sa/"+backend.Name)
	p, err := meshbed.StartProcess("rproxy", cmd, log, wp.Pod.IPv4, wp.Pod.Dial, time.Minute)
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() {
		if err := p.Stop(); err != nil {
			tb.Errorf("rproxy: %v", err)
		}
	})
	return p
}

// startBenchServer serves HTTP/1.1 on :8080 in p: it reads the request
// body and answers 1 KiB. It reports the last peer address it served.
func startBenchServer(tb testing.TB, p *testbed.Pod) *atomic.Pointer[netip.Addr] {
	ln, err := p.Listen("tcp", "[::]:8080")
	if err != nil {
		tb.Fatal(err)
	}
	var peer atomic.Pointer[netip.Addr]
	answer := bytes.Repeat([]byte{'x'}, 1024)
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.Copy(io.Discard, r.Body)
		if ap, err := netip.ParseAddrPort(r.RemoteAddr); err == nil {
			a := ap.Addr().Unmap()
			peer.Store(&a)
		}
		w.Write(answer)
	})}
	go srv.Serve(ln)
	tb.Cleanup(func() { srv.Close() })
	return &peer
}

// podClient is an HTTP/1.1 client in pod p over one keep-alive
// connection.
func podClient(p *testbed.Pod) *http.Client {
	return &http.Client{
		Timeout: 5 * time.Second,
		Transport: &http.Transport{
			DialContext:         func(ctx context.Context, network, addr string) (net.Conn, error) { return p.Dial(ctx, network, addr) },
			MaxConnsPerHost:     1,
			MaxIdleConnsPerHost: 1,
			DisableCompression:  true,
		},
	}
}

var requestBody = bytes.Repeat([]byte{'y'}, 1024)

// post sends one 1 KiB POST and reads the 1 KiB answer.
func post(c *http.Client, url string) error {
	resp, err := c.Post(url, "application/octet-stream", bytes.NewReader(requestBody))
	if err != nil {
		return err
	}
	n, err := io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	switch {
	case err != nil:
		return err
	case resp.StatusCode != http.StatusOK || n != 1024:
		return fmt.Errorf("status %d, %d bytes", resp.StatusCode, n)
	}
	return nil
}

// maxRate sends requests back to back over conns connections for d and
// returns the completed requests per second.
func maxRate(p *testbed.Pod, url string, conns int, d time.Duration) (float64, error) {
	var done atomic.Int64
	var wg sync.WaitGroup
	errs := make([]error, conns)
	start := time.Now()
	end := start.Add(d)
	for i := range conns {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c := podClient(p)
			defer c.CloseIdleConnections()
			for time.Now().Before(end) {
				if errs[i] = post(c, url); errs[i] != nil {
					return
				}
				done.Add(1)
			}
		}()
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		return 0, err
	}
	return float64(done.Load()) / time.Since(start).Seconds(), nil
}

// fixedRate sends requests at rate over one connection for d, each after
// the previous answer (a late one delays the next), and returns the p50
// and p99 round trip in µs and the number of requests.
func fixedRate(p *testbed.Pod, url string, rate int, d time.Duration) (float64, float64, int, error) {
	c := podClient(p)
	defer c.CloseIdleConnections()
	if err := post(c, url); err != nil { // the connection, outside the measurement
		return 0, 0, 0, err
	}
	interval := time.Second / time.Duration(rate)
	var rtts []float64
	next := time.Now()
	end := next.Add(d)
	for next.Before(end) {
		time.Sleep(time.Until(next))
		start := time.Now()
		if err := post(c, url); err != nil {
			return 0, 0, 0, err
		}
		rtts = append(rtts, float64(time.Since(start).Microseconds()))
		next = next.Add(interval)
	}
	sort.Float64s(rtts)
	return rtts[len(rtts)/2], rtts[len(rtts)*99/100], len(rtts), nil
}
