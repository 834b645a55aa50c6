package hbone_test

import (
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"net"
	"net/http"
	"runtime"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/amber-mesh/amber/internal/tcptest"
	"github.com/amber-mesh/amber/internal/testutil"
	"github.com/amber-mesh/amber/tunnel/hbone"
)

// sink reads a stream to its end, then ends its own side.
var sink = hbone.HandlerFunc(func(ctx context.Context, req *hbone.Request, rw hbone.Responder) {
	s, err := rw.Accept()
	if err != nil {
		return
	}
	io.Copy(io.Discard, s)
	s.CloseWrite()
})

// BenchmarkStreamThroughput sends b.N × 256 KiB through one stream over
// loopback TLS, then the same bytes over a plain TLS connection, and
// reports both rates and their ratio: what HTTP/2 framing, flow control
// and our buffering cost on top of TLS.
func BenchmarkStreamThroughput(b *testing.B) {
	const chunk = 256 << 10
	buf := make([]byte, chunk)
	ts := startServer(b, sink)
	tp := newPool(b, ts)
	s := tp.connect(b)

	// Baseline: a TLS connection to a server that discards.
	stls, ctls := mustTLS(b)
	ln, err := tls.Listen("tcp", "127.0.0.1:0", stls)
	if err != nil {
		b.Fatal(err)
	}
	defer ln.Close()
	tlsDone := make(chan struct{})
	go func() {
		defer close(tlsDone)
		c, err := ln.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		io.Copy(io.Discard, c)
		c.Write([]byte{1})
	}()
	tc, err := tls.Dial("tcp", ln.Addr().String(), ctls)
	if err != nil {
		b.Fatal(err)
	}
	defer tc.Close()
	tc.Handshake()

	b.SetBytes(chunk)
	b.ResetTimer()
	start := time.Now()
	for range b.N {
		if _, err := s.Write(buf); err != nil {
			b.Fatal(err)
		}
	}
	s.CloseWrite()
	if _, err := io.Copy(io.Discard, s); err != nil { // the server's END_STREAM: all bytes arrived
		b.Fatal(err)
	}
	hbone := time.Since(start)
	b.StopTimer()

	start = time.Now()
	for range b.N {
		if _, err := tc.Write(buf); err != nil {
			b.Fatal(err)
		}
	}
	tc.CloseWrite()
	tc.Read(make([]byte, 1))
	base := time.Since(start)
	<-tlsDone

	total := float64(b.N) * chunk
	b.ReportMetric(total/base.Seconds()/1e6, "tls-MB/s")
	b.ReportMetric(base.Seconds()/hbone.Seconds(), "ratio-vs-tls")
}

// BenchmarkProxyThroughput is the tunnel end to end on loopback: an
// application writes to a local TCP proxy that tunnels over HBONE to a
// server that proxies to the destination, as two ztunnels do. The
// baseline is the same bytes over a direct TCP connection; ratio-vs-tcp
// is the number to compare with ztunnel's 0.42× cross-node figure (though
// here both tunnels and both ends share the same two cores).
func BenchmarkProxyThroughput(b *testing.B) {
	const chunk = 256 << 10
	buf := make([]byte, chunk)

	// Destination: discards, then closes.
	dst, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	tcptest.Serve(b, dst, func(c net.Conn) { io.Copy(io.Discard, c) })
	// Both halves of the tunnel, in front of the destination.
	out := startTunnel(b, dst.Addr().String())

	send := func(addr string) time.Duration {
		start := time.Now()
		c, err := net.Dial("tcp", addr)
		if err != nil {
			b.Fatal(err)
		}
		defer c.Close()
		for range b.N {
			if _, err := c.Write(buf); err != nil {
				b.Fatal(err)
			}
		}
		c.(*net.TCPConn).CloseWrite()
		io.Copy(io.Discard, c) // EOF once the destination has read everything
		return time.Since(start)
	}
	b.SetBytes(chunk)
	b.ResetTimer()
	tunnelled := send(out)
	b.StopTimer()
	direct := send(dst.Addr().String())
	total := float64(b.N) * chunk
	b.ReportMetric(total/direct.Seconds()/1e6, "tcp-MB/s")
	b.ReportMetric(direct.Seconds()/tunnelled.Seconds(), "ratio-vs-tcp")
}

// proxy copies both ways between a stream and a TCP connection, passing
// half-closes along, as the tunnel does.
func proxy(s *hbone.Stream, c *net.TCPConn) {
	done := make(chan struct{})
	go func() {
		defer close(done)
		io.Copy(c, s)
		c.CloseWrite()
	}()
	s.ReadFrom(c)
	s.CloseWrite()
	<-done
}

// BenchmarkConnectRate opens, uses and closes streams on a warm pool.
func BenchmarkConnectRate(b *testing.B) {
	ts := startServer(b, echo)
	tp := newPool(b, ts)
	tp.connect(b).Close() // dial outside the measurement
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		one := make([]byte, 1)
		for pb.Next() {
			s, err := tp.Connect(context.Background(), tp.Key, "10.0.0.1:8080", nil)
			if err != nil {
				b.Error(err)
				return
			}
			s.Write(one)
			s.CloseWrite()
			io.ReadFull(s, one)
			io.Copy(io.Discard, s)
			s.Close()
		}
	})
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "streams/s")
}

// idleStreamCost opens n idle streams (server handlers blocked reading)
// and returns the heap and goroutine stack bytes they hold, per stream,
// both sides together.
func idleStreamCost(tb testing.TB, n int) (heap, stack float64) {
	// ready: a handler accepted its stream; got: it read the stream's
	// first byte, so that byte's buffers on both sides had their chance
	// to be released.
	ready, got := make(chan struct{}, n+2), make(chan struct{}, n+2)
	ended := make(chan struct{}, n+2) // a handler returned
	ts := startServer(tb, hbone.HandlerFunc(func(ctx context.Context, req *hbone.Request, rw hbone.Responder) {
		defer func() { ended <- struct{}{} }()
		s, err := rw.Accept()
		if err != nil {
			return
		}
		ready <- struct{}{}
		if _, err := io.ReadFull(s, make([]byte, 1)); err != nil {
			return
		}
		got <- struct{}{}
		io.Copy(io.Discard, s)
	}))
	tp := newPool(tb, ts)
	// Warm up with n streams, opened and closed: one connection's fixed
	// costs, the buffer pools and the tables sized for n streams (Go's
	// maps keep their size) are not per stream. Measured from a cold
	// start they add ≈ 0.5 KiB to the figure; measured from the state a
	// warm-up of two streams left, the figure moved by as much from run
	// to run, as that state went away or not.
	warm := make([]*hbone.Stream, n)
	for i := range warm {
		warm[i] = tp.connect(tb)
		<-ready
		warm[i].Write([]byte("warm"))
		<-got
	}
	for _, s := range warm {
		s.Close()
		<-ended // its state on the server side is gone too
	}
	warm = nil
	measure := func() (uint64, uint64) {
		var ms runtime.MemStats
		runtime.GC()
		runtime.GC()
		runtime.ReadMemStats(&ms)
		return ms.HeapAlloc, ms.StackInuse
	}
	// Measured in steps of n/steps streams, the figure being the median
	// step: a connection's buffers are released once it has been idle
	// (the writer's batch, the read-ahead chunk: up to ≈ 1 MiB), which
	// may happen before one measurement and after the next, and would move
	// a single step's figure by as much as the streams themselves.
	const steps = 5
	streams := make([]*hbone.Stream, 0, n)
	defer func() {
		for _, s := range streams {
			s.Close()
		}
	}()
	var heaps, stacks []float64
	h0, s0 := measure()
	for range steps {
		k := n / steps
		for range k {
			s, err := tp.Connect(context.Background(), tp.Key, "10.0.0.1:8080", nil)
			if err != nil {
				tb.Fatal(err)
			}
			// One exchange each, so buffers that traffic allocates had
			// their chance to be released.
			s.Write([]byte("x"))
			streams = append(streams, s)
			<-ready
		}
		for range k {
			<-got
		}
		h1, s1 := measure()
		heaps = append(heaps, float64(int64(h1)-int64(h0))/float64(k))
		stacks = append(stacks, float64(int64(s1)-int64(s0))/float64(k))
		h0, s0 = h1, s1
	}
	slices.Sort(heaps)
	slices.Sort(stacks)
	return heaps[steps/2], stacks[steps/2]
}

func BenchmarkIdleStreamMemory(b *testing.B) {
	var heap, stack float64
	for range b.N {
		heap, stack = idleStreamCost(b, 1000)
	}
	b.ReportMetric(heap, "heap-B/stream")
	b.ReportMetric(stack, "stack-B/stream")
}

// TestIdleStreamMemory holds an idle tunnelled connection to amber's
// budget: both ends of a stream, without the handler's goroutine, fit in
// 1.25 KiB of heap (≈ 0.9 KiB with Go 1.26: the two Stream structs, with
// no signal channel or deadline made for an idle stream, and the server's
// request with the handler's wait for data), against 16–20
// KiB per side for goroutine-per-direction Go proxies and ≈ 3.8 KiB for
// Istio's Rust ztunnel (docs/facts.md §4; ARCHITECTURE.md, "Idle
// connections hold no goroutine").
func TestIdleStreamMemory(t *testing.T) {
	if testing.Short() {
		t.Skip("allocates 1000 streams")
	}
	checkLeaks(t)
	heap, stack := idleStreamCost(t, 1000)
	t.Logf("idle stream: %.0f B heap, %.0f B goroutine stack (client and server side)", heap, stack)
	if heap > 1280 {
		t.Errorf("an idle stream holds %.0f B of heap, want ≤ 1.25 KiB", heap)
	}
}

// TestIdleReadFromMemory: a tunnel's upload direction, ReadFrom on an
// idle TCP connection, waits without holding a read buffer.
func TestIdleReadFromMemory(t *testing.T) {
	checkLeaks(t)
	const n, msg = 200, "hello"
	// got: a handler read its stream's message, so ReadFrom has passed it on.
	got := make(chan struct{}, n)
	ts := startServer(t, hbone.HandlerFunc(func(ctx context.Context, req *hbone.Request, rw hbone.Responder) {
		s, err := rw.Accept()
		if err != nil {
			return
		}
		if _, err := io.ReadFull(s, make([]byte, len(msg))); err != nil {
			return
		}
		got <- struct{}{}
		io.Copy(io.Discard, s)
		s.CloseWrite()
	}))
	tp := newPool(t, ts)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	var srcs, peers []net.Conn
	var streams []*hbone.Stream
	for range n {
		c, err := net.Dial("tcp", ln.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		p, err := ln.Accept()
		if err != nil {
			t.Fatal(err)
		}
		srcs, peers = append(srcs, c), append(peers, p)
		streams = append(streams, tp.connect(t))
	}
	var ms runtime.MemStats
	runtime.GC()
	runtime.GC() // the second empties sync.Pools
	runtime.ReadMemStats(&ms)
	before := ms.HeapAlloc
	var wg sync.WaitGroup
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			streams[i].ReadFrom(srcs[i])
		}()
	}
	// One message each: the buffer used for it must not stay behind.
	for _, p := range peers {
		p.Write([]byte(msg))
	}
	for range n {
		<-got
	}
	// The HBONE connection releases its own buffers (the writer's batch,
	// ≈ 324 KiB, 1.6 KiB per ReadFrom here) once it has been idle, which
	// may come after the messages arrived: wait for that, so that only
	// what each ReadFrom keeps is left. A read buffer kept per ReadFrom
	// never goes away, and the wait fails.
	testutil.EventuallyNil(t, "idle ReadFroms to hold no read buffer", func() error {
		runtime.GC()
		runtime.GC()
		runtime.ReadMemStats(&ms)
		per := float64(int64(ms.HeapAlloc)-int64(before)) / n
		if per > 1024 {
			return fmt.Errorf("an idle ReadFrom holds %.0f B of heap", per)
		}
		t.Logf("idle ReadFrom holds %.0f B of heap", per)
		return nil
	})
	for _, p := range peers {
		p.Close()
	}
	wg.Wait()
	for _, c := range srcs {
		c.Close()
	}
}

// BenchmarkRequestResponse sends b.N 1 KiB requests, one at a time, over
// one stream to an echo handler and reports the p50 and p99 round trip,
// then the same over a plain TLS connection to an echo server: what the
// HTTP/2 layer adds to each exchange, mostly goroutine hand-offs.
func BenchmarkRequestResponse(b *testing.B) {
	ts := startServer(b, echo)
	tp := newPool(b, ts)
	s := tp.connect(b)

	stls, ctls := mustTLS(b)
	ln, err := tls.Listen("tcp", "127.0.0.1:0", stls)
	if err != nil {
		b.Fatal(err)
	}
	defer ln.Close()
	go func() {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		io.Copy(c, c)
	}()
	tc, err := tls.Dial("tcp", ln.Addr().String(), ctls)
	if err != nil {
		b.Fatal(err)
	}
	defer tc.Close()

	b.ResetTimer()
	p50, p99 := roundTrips(b, s, b.N, 0)
	b.StopTimer()
	t50, t99 := roundTrips(b, tc, b.N, 0)
	b.ReportMetric(p50, "p50-µs")
	b.ReportMetric(p99, "p99-µs")
	b.ReportMetric(t50, "tls-p50-µs")
	b.ReportMetric(t99, "tls-p99-µs")
}

// BenchmarkProxyRequestResponse is BenchmarkRequestResponse through the
// whole tunnel on loopback, as the ztunnel runs it: TCP client → proxy →
// HBONE → proxy → TCP echo server. The baseline is the echo server
// reached directly.
func BenchmarkProxyRequestResponse(b *testing.B) {
	dst, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	tcptest.Serve(b, dst, func(c net.Conn) { io.Copy(c, c) })
	out := startTunnel(b, dst.Addr().String())

	dial := func(addr string) net.Conn {
		c, err := net.Dial("tcp", addr)
		if err != nil {
			b.Fatal(err)
		}
		b.Cleanup(func() { c.Close() })
		return c
	}
	tunnelled, direct := dial(out), dial(dst.Addr().String())
	for _, pace := range []time.Duration{0, time.Millisecond} {
		name := "back-to-back"
		if pace > 0 {
			// amber-bench's latency test: 1000 req/s, the tunnel idle
			// between requests.
			name = "1000rps"
		}
		b.Run(name, func(b *testing.B) {
			p50, p99 := roundTrips(b, tunnelled, b.N, pace)
			b.StopTimer()
			d50, d99 := roundTrips(b, direct, b.N, pace)
			b.ReportMetric(p50, "p50-µs")
			b.ReportMetric(p99, "p99-µs")
			b.ReportMetric(d50, "tcp-p50-µs")
			b.ReportMetric(d99, "tcp-p99-µs")
		})
	}
}

// startTunnel runs the two halves of a tunnel to dst on loopback and
// returns the address of its outbound TCP listener.
func startTunnel(b *testing.B, dst string) string {
	ts := startServer(b, hbone.HandlerFunc(func(ctx context.Context, req *hbone.Request, rw hbone.Responder) {
		up, err := net.Dial("tcp", dst)
		if err != nil {
			rw.Reject(http.StatusServiceUnavailable, err.Error())
			return
		}
		defer up.Close()
		s, err := rw.Accept()
		if err != nil {
			return
		}
		proxy(s, up.(*net.TCPConn))
	}))
	tp := newPool(b, ts)
	out, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	tcptest.Serve(b, out, func(c net.Conn) {
		s, err := tp.Connect(context.Background(), tp.Key, "10.0.0.1:8080", nil)
		if err != nil {
			return
		}
		defer s.Close()
		proxy(s, c.(*net.TCPConn))
	})
	return out.Addr().String()
}

// roundTrips sends n 1 KiB requests over c, each after the previous
// response and at most one per pace, and returns the p50 and p99 round
// trip in µs.
func roundTrips(b *testing.B, c io.ReadWriter, n int, pace time.Duration) (p50, p99 float64) {
	req := make([]byte, 1024)
	resp := make([]byte, len(req))
	rtts := make([]time.Duration, n)
	next := time.Now()
	for i := range n {
		time.Sleep(time.Until(next))
		next = next.Add(pace)
		start := time.Now()
		if _, err := c.Write(req); err != nil {
			b.Fatal(err)
		}
		if _, err := io.ReadFull(c, resp); err != nil {
			b.Fatal(err)
		}
		rtts[i] = time.Since(start)
	}
	slices.Sort(rtts)
	us := func(q int) float64 { return float64(rtts[(n-1)*q/100].Nanoseconds()) / 1e3 }
	return us(50), us(99)
}
