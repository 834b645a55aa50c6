package proxy_test

import (
	"bufio"
	"context"
	"io"
	"net/http"
	"testing"
	"testing/synctest"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	hcmv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"github.com/amber-mesh/amber/tunnel/hbone"
)

// The timeouts are time as the subject: these tests run the whole data
// path (HBONE client, waypoint, destination ztunnel, application) in
// memory inside a synctest bubble, where time advances only when every
// goroutine waits, so a timer fires at exactly its instant and a test
// can check the moment before it too.

// pending is a request in flight in its own goroutine.
type pending struct {
	done  chan struct{}
	resp  *http.Response
	body  string
	err   error // the request's or its body's
	start time.Time
	end   time.Time
}

func send(hc *http.Client, req *http.Request) *pending {
	p := &pending{done: make(chan struct{}), start: time.Now()}
	go func() {
		defer close(p.done)
		p.resp, p.err = hc.Do(req)
		if p.err == nil {
			var b []byte
			b, p.err = io.ReadAll(p.resp.Body)
			p.resp.Body.Close()
			p.body = string(b)
		}
		p.end = time.Now()
	}()
	return p
}

// sendRaw writes payload on a new CONNECT stream to authority and
// reads one HTTP/1 response: a client that stops in the middle of its
// request (Go's client would not return before it wrote it all).
func sendRaw(tb testing.TB, c *client, authority, payload string) *pending {
	tb.Helper()
	s, err := c.connect(context.Background(), authority)
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { s.Close() })
	p := &pending{done: make(chan struct{}), start: time.Now()}
	if _, err := io.WriteString(s, payload); err != nil {
		tb.Fatal(err)
	}
	go func() {
		defer close(p.done)
		p.resp, p.err = http.ReadResponse(bufio.NewReader(s), nil)
		if p.err == nil {
			var b []byte
			b, p.err = io.ReadAll(p.resp.Body)
			p.body = string(b)
		}
		p.end = time.Now()
	}()
	return p
}

func newGet(tb testing.TB, url string) *http.Request {
	tb.Helper()
	req, err := http.NewRequest("GET", url, nil)
	if err != nil {
		tb.Fatal(err)
	}
	return req
}

// finished reports whether p has its answer once the bubble is idle.
func (p *pending) finished() bool {
	synctest.Wait()
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// at checks that p is answered exactly d after it was sent: not at
// d - 1ns, and at d.
func (p *pending) at(t *testing.T, d time.Duration) {
	t.Helper()
	time.Sleep(d - time.Nanosecond - time.Since(p.start))
	if p.finished() {
		t.Fatalf("answered after %v (%v, %v), want %v", p.end.Sub(p.start), p.resp, p.err, d)
	}
	time.Sleep(time.Nanosecond)
	if !p.finished() {
		t.Fatalf("not answered after %v", d)
	}
}

// TestRouteTimeout: a route's timeout runs from the end of the request
// to the end of the response; an upstream that has not answered by then
// gets Envoy's 504 "upstream request timeout", flag UT.
func TestRouteTimeout(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		m := newMesh(t, meshOptions{inMemory: true})
		s := golden(t, "base")
		editRoute(t, s, productpageChain, func(r *routev3.Route) {
			r.GetRoute().Timeout = durationpb.New(3 * time.Second)
		})
		m.wp.Update(compile(t, s))
		hc := m.sleep().http1(productpageVIP)

		p := send(hc, newGet(t, "http://productpage:9080/hold"))
		p.at(t, 3*time.Second)
		if p.err != nil {
			t.Fatal(p.err)
		}
		m.checkReply(t, p.resp, p.body, 504, "upstream request timeout", "UT", "upstream_timeout")
		if got := m.pods["productpage-v1"].app.requests(); len(got) != 1 || got[0].Header.Get("X-Envoy-Expected-Rq-Timeout-Ms") != "3000" {
			t.Errorf("the application saw %+v, want one request with x-envoy-expected-rq-timeout-ms 3000", got)
		}

		// The timer starts once the request is complete: a body that
		// takes 5 s to arrive leaves the upstream its 3 s after that.
		body, bw := io.Pipe()
		req, _ := http.NewRequest("POST", "http://productpage:9080/hold", body)
		p = send(hc, req)
		io.WriteString(bw, "part;")
		time.Sleep(5 * time.Second)
		if p.finished() {
			t.Fatalf("answered while the request was still arriving: %v %v", p.resp, p.err)
		}
		bw.Close()
		p.start = time.Now()
		p.at(t, 3*time.Second)
		if p.err != nil || p.resp.StatusCode != 504 {
			t.Fatalf("%v %v, want 504", p.resp, p.err)
		}

		// An answer in time is the application's.
		m.pods["productpage-v1"].app.open()
		p = send(hc, newGet(t, "http://productpage:9080/hold"))
		if !p.finished() || p.err != nil || p.resp.StatusCode != 200 || p.body != "held" {
			t.Fatalf("%v %q %v, want the application's 200 at once", p.resp, p.body, p.err)
		}
	})
}

// retryPolicy sets the route's retry policy: retryOn with n retries, a
// per-try timeout and a per-try idle timeout (zero: none), and a 1 ms
// back-off base so that the jittered waits stay below 1 ms per retry.
func retryPolicy(retryOn string, n uint32, perTry, perTryIdle time.Duration) func(*routev3.Route) {
	return func(r *routev3.Route) {
		p := &routev3.RetryPolicy{
			RetryOn:      retryOn,
			NumRetries:   wrapperspb.UInt32(n),
			RetryBackOff: &routev3.RetryPolicy_RetryBackOff{BaseInterval: durationpb.New(time.Millisecond)},
		}
		if perTry > 0 {
			p.PerTryTimeout = durationpb.New(perTry)
		}
		if perTryIdle > 0 {
			p.PerTryIdleTimeout = durationpb.New(perTryIdle)
		}
		r.GetRoute().RetryPolicy = p
	}
}

// between checks that p is answered after at least lo and at most hi
// after it was sent.
func (p *pending) between(t *testing.T, lo, hi time.Duration) {
	t.Helper()
	time.Sleep(lo - time.Nanosecond - time.Since(p.start))
	if p.finished() {
		t.Fatalf("answered after %v (%v, %v), want at least %v", p.end.Sub(p.start), p.resp, p.err, lo)
	}
	time.Sleep(hi - time.Since(p.start))
	if !p.finished() {
		t.Fatalf("not answered after %v", hi)
	}
}

// TestPerTryTimeout: a per-try timeout ends one attempt; it is retried
// as a reset is (retry_on 5xx, gateway-error, reset), the last one
// answered 504 "upstream request timeout" (UT, and URX when the retries
// ran out), and the route timeout bounds them all.
func TestPerTryTimeout(t *testing.T) {
	const perTry = time.Second
	run := func(t *testing.T, edit func(*routev3.Route), do func(t *testing.T, m *mesh, hc *http.Client)) {
		synctest.Test(t, func(t *testing.T) {
			m := newMesh(t, meshOptions{inMemory: true})
			s := golden(t, "base")
			editRoute(t, s, productpageChain, edit)
			m.wp.Update(compile(t, s))
			do(t, m, m.sleep().http1(productpageVIP))
		})
	}
	attempts := func(m *mesh) []echo { return m.pods["productpage-v1"].app.requests() }

	t.Run("retries run out", func(t *testing.T) {
		run(t, retryPolicy("5xx", 2, perTry, 0), func(t *testing.T, m *mesh, hc *http.Client) {
			p := send(hc, newGet(t, "http://productpage:9080/hold"))
			// Three tries of 1 s, two back-offs below 1 ms and 2 ms.
			p.between(t, 3*perTry, 3*perTry+3*time.Millisecond)
			if p.err != nil {
				t.Fatal(p.err)
			}
			m.checkReply(t, p.resp, p.body, 504, "upstream request timeout", "UT,URX", "upstream_timeout")
			got := attempts(m)
			if len(got) != 3 {
				t.Fatalf("%d attempts, want 3", len(got))
			}
			for _, e := range got {
				if v := e.Header.Get("X-Envoy-Expected-Rq-Timeout-Ms"); v != "1000" {
					t.Errorf("x-envoy-expected-rq-timeout-ms %q, want the per-try timeout's 1000", v)
				}
			}
		})
	})
	t.Run("a retry answers", func(t *testing.T) {
		run(t, retryPolicy("gateway-error", 2, perTry, 0), func(t *testing.T, m *mesh, hc *http.Client) {
			p := send(hc, newGet(t, "http://productpage:9080/hold"))
			time.Sleep(perTry + time.Millisecond) // the back-off is below 1 ms
			if p.finished() || len(attempts(m)) != 2 {
				t.Fatalf("after the first per-try timeout: answered %v, %d attempts; want a second attempt waiting", p.finished(), len(attempts(m)))
			}
			m.pods["productpage-v1"].app.open()
			if !p.finished() || p.err != nil || p.resp.StatusCode != 200 || p.body != "held" {
				t.Fatalf("%v %q %v, want the second attempt's 200", p.resp, p.body, p.err)
			}
			if lines := m.logs.lines(map[string]any{"status": 200, "flags": "-"}); len(lines) != 1 {
				t.Errorf("want one access-log line 200 -:\n%s", m.logs.buf.String())
			}
		})
	})
	t.Run("it starts once the request is complete", func(t *testing.T) {
		run(t, retryPolicy("5xx", 0, perTry, 0), func(t *testing.T, m *mesh, hc *http.Client) {
			body, bw := io.Pipe()
			req, _ := http.NewRequest("POST", "http://productpage:9080/hold", body)
			p := send(hc, req)
			io.WriteString(bw, "part;")
			time.Sleep(5 * perTry)
			if p.finished() {
				t.Fatalf("answered while the request was still arriving: %v %v", p.resp, p.err)
			}
			bw.Close()
			p.start = time.Now()
			p.at(t, perTry)
			if p.err != nil || p.resp.StatusCode != 504 {
				t.Fatalf("%v %v, want 504", p.resp, p.err)
			}
		})
	})
	t.Run("istiod's retry_on does not retry it", func(t *testing.T) {
		// istiod's default policy (connect-failure, refused-stream,
		// unavailable, cancelled, retriable-status-codes) with a per-try
		// timeout, as a VirtualService's retries.perTryTimeout adds it.
		run(t, func(r *routev3.Route) {
			r.GetRoute().GetRetryPolicy().PerTryTimeout = durationpb.New(perTry)
		}, func(t *testing.T, m *mesh, hc *http.Client) {
			p := send(hc, newGet(t, "http://productpage:9080/hold"))
			p.at(t, perTry)
			if p.err != nil {
				t.Fatal(p.err)
			}
			m.checkReply(t, p.resp, p.body, 504, "upstream request timeout", "UT", "upstream_timeout")
			if n := len(attempts(m)); n != 1 {
				t.Errorf("%d attempts, want 1", n)
			}
		})
	})
	t.Run("the route timeout bounds the retries", func(t *testing.T) {
		run(t, func(r *routev3.Route) {
			retryPolicy("5xx", 5, perTry, 0)(r)
			r.GetRoute().Timeout = durationpb.New(2500 * time.Millisecond)
		}, func(t *testing.T, m *mesh, hc *http.Client) {
			p := send(hc, newGet(t, "http://productpage:9080/hold"))
			p.at(t, 2500*time.Millisecond)
			if p.err != nil {
				t.Fatal(p.err)
			}
			m.checkReply(t, p.resp, p.body, 504, "upstream request timeout", "UT", "upstream_timeout")
			if n := len(attempts(m)); n != 3 {
				t.Errorf("%d attempts, want 3 (two per-try timeouts, then the route's)", n)
			}
		})
	})
	t.Run("it bounds the response body too", func(t *testing.T) {
		// /trickle's answer takes 12 s: the per-try timeout (10 s) ends
		// it once it streams, which resets the stream (UT): no retry
		// after the response started.
		run(t, retryPolicy("5xx", 2, 10*time.Second, 0), func(t *testing.T, m *mesh, hc *http.Client) {
			p := send(hc, newGet(t, "http://productpage:9080/trickle"))
			p.at(t, 10*time.Second)
			if p.err == nil || p.resp == nil || p.resp.StatusCode != 200 || p.body != "chunk;chunk;" {
				t.Fatalf("%v %q %v, want a 200 cut after two chunks", p.resp, p.body, p.err)
			}
			if lines := m.logs.lines(map[string]any{"status": 200, "flags": "UT"}); len(lines) != 1 {
				t.Errorf("want one access-log line 200 UT:\n%s", m.logs.buf.String())
			}
			if n := len(attempts(m)); n != 1 {
				t.Errorf("%d attempts, want 1", n)
			}
		})
	})
}

// TestPerTryIdleTimeout: per_try_idle_timeout ends an attempt that got
// no upstream byte for its duration, re-armed by every byte, also while
// the response streams.
func TestPerTryIdleTimeout(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		m := newMesh(t, meshOptions{inMemory: true})
		s := golden(t, "base")
		editRoute(t, s, productpageChain, retryPolicy("reset", 1, 0, 4*time.Second))
		m.wp.Update(compile(t, s))
		hc := m.sleep().http1(productpageVIP)
		app := m.pods["productpage-v1"].app

		// Silent: two attempts of 4 s.
		p := send(hc, newGet(t, "http://productpage:9080/hold"))
		p.between(t, 8*time.Second, 8*time.Second+time.Millisecond)
		if p.err != nil {
			t.Fatal(p.err)
		}
		m.checkReply(t, p.resp, p.body, 504, "upstream request timeout", "UT,URX", "upstream_timeout")
		if n := len(app.requests()); n != 2 {
			t.Errorf("%d attempts, want 2", n)
		}

		// Streaming with gaps of 6 s: cut 4 s after the first chunk.
		p = send(hc, newGet(t, "http://productpage:9080/trickle"))
		p.at(t, 4*time.Second)
		if p.err == nil || p.resp == nil || p.resp.StatusCode != 200 || p.body != "chunk;" {
			t.Fatalf("%v %q %v, want a 200 cut after one chunk", p.resp, p.body, p.err)
		}
		if lines := m.logs.lines(map[string]any{"status": 200, "flags": "UT"}); len(lines) != 1 {
			t.Errorf("want one access-log line 200 UT:\n%s", m.logs.buf.String())
		}
	})
	synctest.Test(t, func(t *testing.T) {
		// Gaps below the idle timeout: the 12 s response goes through.
		m := newMesh(t, meshOptions{inMemory: true})
		s := golden(t, "base")
		editRoute(t, s, productpageChain, retryPolicy("reset", 1, 0, trickleGap+time.Second))
		m.wp.Update(compile(t, s))
		p := send(m.sleep().http1(productpageVIP), newGet(t, "http://productpage:9080/trickle"))
		p.at(t, 2*trickleGap)
		if p.err != nil || p.resp.StatusCode != 200 || p.body != "chunk;chunk;chunk;" {
			t.Fatalf("%v %q %v, want the whole 200", p.resp, p.body, p.err)
		}
	})
}

// meshWith is an in-memory mesh serving base with productpage's chain
// edited.
func meshWith(t *testing.T, hcm func(*hcmv3.HttpConnectionManager), rt func(*routev3.Route)) *mesh {
	t.Helper()
	m := newMesh(t, meshOptions{inMemory: true})
	s := golden(t, "base")
	if hcm != nil {
		editHCM(t, s, productpageChain, hcm)
	}
	if rt != nil {
		editRoute(t, s, productpageChain, rt)
	}
	m.wp.Update(compile(t, s))
	return m
}

// TestStreamIdleTimeout: a stream with no byte either way for the idle
// timeout (the route's idle_timeout in place of the HCM's
// stream_idle_timeout) is answered "stream timeout" before its response
// started, 504 when the request was complete and 408 (closing the
// connection) when not, and reset after; flag SI; bytes re-arm it.
func TestStreamIdleTimeout(t *testing.T) {
	const idle = 10 * time.Second
	routeIdle := func(d time.Duration) func(*routev3.Route) {
		return func(r *routev3.Route) { r.GetRoute().IdleTimeout = durationpb.New(d) }
	}
	t.Run("before the response", func(t *testing.T) {
		synctest.Test(t, func(t *testing.T) {
			m := meshWith(t, nil, routeIdle(idle))
			p := send(m.sleep().http1(productpageVIP), newGet(t, "http://productpage:9080/hold"))
			p.at(t, idle)
			if p.err != nil {
				t.Fatal(p.err)
			}
			m.checkReply(t, p.resp, p.body, 504, "stream timeout", "SI", "stream_idle_timeout")
			if p.resp.Close {
				t.Errorf("the connection is closed after a complete request's 504")
			}
		})
	})
	t.Run("while the request arrives", func(t *testing.T) {
		synctest.Test(t, func(t *testing.T) {
			m := meshWith(t, nil, routeIdle(idle))
			// Half the body, then nothing: the application reads it.
			p := sendRaw(t, m.sleep(), productpageVIP, "POST / HTTP/1.1\r\nHost: productpage:9080\r\nContent-Length: 10\r\n\r\npart;")
			p.at(t, idle)
			if p.err != nil {
				t.Fatal(p.err)
			}
			m.checkReply(t, p.resp, p.body, 408, "stream timeout", "SI", "stream_idle_timeout")
			if !p.resp.Close {
				t.Errorf("the connection is kept after an incomplete request's 408")
			}
		})
	})
	t.Run("during the response", func(t *testing.T) {
		synctest.Test(t, func(t *testing.T) {
			m := meshWith(t, nil, routeIdle(idle))
			// /block sends its header, then nothing.
			p := send(m.sleep().http1(productpageVIP), newGet(t, "http://productpage:9080/block"))
			p.at(t, idle)
			if p.err == nil || p.resp == nil || p.resp.StatusCode != 200 {
				t.Fatalf("%v %v, want a 200 whose body is cut", p.resp, p.err)
			}
			if lines := m.logs.lines(map[string]any{"status": 200, "flags": "SI"}); len(lines) != 1 {
				t.Errorf("want one access-log line 200 SI:\n%s", m.logs.buf.String())
			}
			if m.refused("stream_idle_timeout") != 1 {
				t.Errorf("stream_idle_timeout not counted")
			}
		})
	})
	t.Run("bytes re-arm it", func(t *testing.T) {
		synctest.Test(t, func(t *testing.T) {
			m := meshWith(t, nil, routeIdle(trickleGap+time.Second))
			p := send(m.sleep().http1(productpageVIP), newGet(t, "http://productpage:9080/trickle"))
			p.at(t, 2*trickleGap)
			if p.err != nil || p.resp.StatusCode != 200 || p.body != "chunk;chunk;chunk;" {
				t.Fatalf("%v %q %v, want the whole 200", p.resp, p.body, p.err)
			}
		})
	})
	t.Run("the route turns the HCM's off", func(t *testing.T) {
		synctest.Test(t, func(t *testing.T) {
			m := meshWith(t, func(h *hcmv3.HttpConnectionManager) {
				h.StreamIdleTimeout = durationpb.New(idle)
			}, routeIdle(0))
			p := send(m.sleep().http1(productpageVIP), newGet(t, "http://productpage:9080/hold"))
			time.Sleep(time.Hour)
			if p.finished() {
				t.Fatalf("answered %v %v, want no idle timeout", p.resp, p.err)
			}
			m.pods["productpage-v1"].app.open()
			if !p.finished() || p.err != nil || p.resp.StatusCode != 200 {
				t.Fatalf("%v %v, want the application's 200", p.resp, p.err)
			}
		})
	})
	t.Run("the HCM's without a route's", func(t *testing.T) {
		synctest.Test(t, func(t *testing.T) {
			m := meshWith(t, func(h *hcmv3.HttpConnectionManager) {
				h.StreamIdleTimeout = durationpb.New(idle)
			}, nil)
			p := send(m.sleep().http2(productpageVIP), newGet(t, "http://productpage:9080/hold"))
			p.at(t, idle)
			if p.err != nil {
				t.Fatal(p.err)
			}
			m.checkReply(t, p.resp, p.body, 504, "stream timeout", "SI", "stream_idle_timeout")
		})
	})
}

// TestRequestTimeout: the HCM's request_timeout bounds receiving the
// whole request, from the stream's start: 408 "request timeout" when the
// body is not complete in time; disarmed once it is.
func TestRequestTimeout(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		const limit = 5 * time.Second
		m := meshWith(t, func(h *hcmv3.HttpConnectionManager) {
			h.RequestTimeout = durationpb.New(limit)
		}, nil)
		hc := m.sleep().http1(productpageVIP)

		// Half the body, then nothing.
		p := sendRaw(t, m.sleep(), productpageVIP, "POST / HTTP/1.1\r\nHost: productpage:9080\r\nContent-Length: 10\r\n\r\npart;")
		p.at(t, limit)
		if p.err != nil {
			t.Fatal(p.err)
		}
		m.checkReply(t, p.resp, p.body, 408, "request timeout", "-", "request_timeout")

		// A complete request waits for its response past the limit.
		p = send(hc, newGet(t, "http://productpage:9080/hold"))
		time.Sleep(2 * limit)
		m.pods["productpage-v1"].app.open()
		if !p.finished() || p.err != nil || p.resp.StatusCode != 200 {
			t.Fatalf("%v %v, want the application's 200", p.resp, p.err)
		}
	})
}

// TestMaxStreamDuration: the route's max_stream_duration (in place of the
// HCM's) bounds a stream from its start: "downstream duration timeout"
// before the response (504 for a complete request; DEADLINE_EXCEEDED for
// gRPC), a reset after; no flag.
func TestMaxStreamDuration(t *testing.T) {
	const limit = 9 * time.Second
	synctest.Test(t, func(t *testing.T) {
		m := meshWith(t, nil, func(r *routev3.Route) {
			r.GetRoute().MaxStreamDuration = &routev3.RouteAction_MaxStreamDuration{MaxStreamDuration: durationpb.New(limit)}
		})
		hc := m.sleep().http1(productpageVIP)
		p := send(hc, newGet(t, "http://productpage:9080/hold"))
		p.at(t, limit)
		if p.err != nil {
			t.Fatal(p.err)
		}
		m.checkReply(t, p.resp, p.body, 504, "downstream duration timeout", "-", "max_stream_duration")

		// /trickle lasts 12 s: cut after its second chunk.
		p = send(hc, newGet(t, "http://productpage:9080/trickle"))
		p.at(t, limit)
		if p.err == nil || p.resp == nil || p.resp.StatusCode != 200 || p.body != "chunk;chunk;" {
			t.Fatalf("%v %q %v, want a 200 cut after two chunks", p.resp, p.body, p.err)
		}
		if lines := m.logs.lines(map[string]any{"status": 200, "refusal": "max_stream_duration"}); len(lines) != 1 {
			t.Errorf("want one access-log line 200 refused max_stream_duration:\n%s", m.logs.buf.String())
		}

		// gRPC: Envoy's trailers-only DEADLINE_EXCEEDED.
		req := newGet(t, "http://productpage:9080/hold")
		req.Method = "POST"
		req.Header.Set("Content-Type", "application/grpc")
		p = send(m.sleep().http2(productpageVIP), req)
		p.at(t, limit)
		if p.err != nil || p.resp.StatusCode != 200 || p.resp.Header.Get("Grpc-Status") != "4" {
			t.Fatalf("%v %v, want grpc-status 4", p.resp, p.err)
		}
	})
}

// TestMaxConnectionDuration: the HCM's max_connection_duration drains an
// inner connection at its age: an idle HTTP/1 connection ends at once, a
// busy one after its response (Connection: close); an HTTP/2 one with
// GOAWAY, its streams finishing.
func TestMaxConnectionDuration(t *testing.T) {
	const limit = 30 * time.Second
	maxAge := func(h *hcmv3.HttpConnectionManager) {
		if h.CommonHttpProtocolOptions == nil {
			h.CommonHttpProtocolOptions = &corev3.HttpProtocolOptions{}
		}
		h.CommonHttpProtocolOptions.MaxConnectionDuration = durationpb.New(limit)
	}
	synctest.Test(t, func(t *testing.T) {
		m := meshWith(t, maxAge, nil)
		c := m.sleep()

		// Idle at its age: the waypoint ends it.
		s, err := c.connect(context.Background(), productpageVIP)
		if err != nil {
			t.Fatal(err)
		}
		defer s.Close()
		io.WriteString(s, "GET / HTTP/1.1\r\nHost: productpage:9080\r\n\r\n")
		br := bufio.NewReader(s)
		resp, err := http.ReadResponse(br, nil)
		if err != nil || resp.StatusCode != 200 || resp.Close {
			t.Fatalf("%v %v, want a 200 keeping the connection", resp, err)
		}
		io.Copy(io.Discard, resp.Body)
		ended := make(chan error, 1)
		go func() { _, err := br.ReadByte(); ended <- err }()
		time.Sleep(limit - time.Nanosecond)
		synctest.Wait()
		if len(ended) != 0 {
			t.Fatalf("the connection ended before its maximum age: %v", <-ended)
		}
		time.Sleep(time.Nanosecond)
		synctest.Wait()
		if len(ended) == 0 {
			t.Fatal("the idle connection outlived its maximum age")
		}
		if err := <-ended; err != io.EOF {
			t.Errorf("read %v, want the stream ended cleanly (EOF)", err)
		}

		// Busy at its age: the response in flight finishes, then the
		// connection ends.
		s, err = c.connect(context.Background(), productpageVIP)
		if err != nil {
			t.Fatal(err)
		}
		defer s.Close()
		start := time.Now()
		time.Sleep(limit - trickleGap)
		io.WriteString(s, "GET /trickle HTTP/1.1\r\nHost: productpage:9080\r\n\r\n")
		br = bufio.NewReader(s)
		resp, err = http.ReadResponse(br, nil)
		if err != nil {
			t.Fatal(err)
		}
		body, err := io.ReadAll(resp.Body)
		if err != nil || string(body) != "chunk;chunk;chunk;" {
			t.Fatalf("%q %v, want the whole response", body, err)
		}
		if d := time.Since(start); d != limit+trickleGap {
			t.Errorf("response ended after %v, want %v", d, limit+trickleGap)
		}
		if _, err := br.ReadByte(); err != io.EOF {
			t.Errorf("after the response: %v, want the stream ended (EOF)", err)
		}
		if d := time.Since(start); d != limit+trickleGap {
			t.Errorf("stream ended after %v, want at once after the response", d)
		}
		// HTTP/2: GOAWAY at its age; the stream in flight finishes and
		// the next request takes a new connection.
		hc := c.http2(productpageVIP)
		if resp, _ := do(t, hc, "GET", "http://productpage:9080/", nil, nil); resp.StatusCode != 200 {
			t.Fatalf("first request: %d", resp.StatusCode)
		}
		time.Sleep(limit - trickleGap)
		p := send(hc, newGet(t, "http://productpage:9080/trickle"))
		p.at(t, 2*trickleGap)
		if p.err != nil || p.body != "chunk;chunk;chunk;" {
			t.Fatalf("%q %v, want the whole response after GOAWAY", p.body, p.err)
		}
		if resp, _ := do(t, hc, "GET", "http://productpage:9080/", nil, nil); resp.StatusCode != 200 {
			t.Fatalf("after GOAWAY: %d", resp.StatusCode)
		}
		if n := m.refused("max_connection_duration"); n != 3 {
			t.Errorf("max_connection_duration counted %v, want 3", n)
		}
	})
}

// TestGRPCTimeout: with istiod's max_grpc_timeout 0s, a gRPC request's
// grpc-timeout header is its route timeout: Envoy's trailers-only
// UNAVAILABLE with the timeout's text when it passes.
func TestGRPCTimeout(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		m := meshWith(t, nil, nil)
		req := newGet(t, "http://productpage:9080/hold")
		req.Method = "POST"
		req.Header = http.Header{"Content-Type": {"application/grpc"}, "Grpc-Timeout": {"1500m"}}
		p := send(m.sleep().http2(productpageVIP), req)
		p.at(t, 1500*time.Millisecond)
		if p.err != nil || p.resp.StatusCode != 200 || p.resp.Header.Get("Grpc-Status") != "14" || p.resp.Header.Get("Grpc-Message") != "upstream%20request%20timeout" {
			t.Fatalf("%v %v, want a trailers-only UNAVAILABLE with Envoy's timeout text", p.resp, p.err)
		}
		if lines := m.logs.lines(map[string]any{"flags": "UT"}); len(lines) != 1 {
			t.Errorf("no UT access-log line")
		}
	})
}

// TestUpgradeTimeouts: an accepted upgrade keeps its stream's idle timeout
// (every relayed byte re-arms it; flag SI when it ends the relay) and
// maximum duration, as Envoy's HCM keeps both on upgraded streams.
func TestUpgradeTimeouts(t *testing.T) {
	const idle = 10 * time.Second
	upgrade := func(t *testing.T, m *mesh) (*hbone.Stream, *bufio.Reader) {
		t.Helper()
		s, err := m.sleep().connect(context.Background(), productpageVIP)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { s.Close() })
		io.WriteString(s, "GET /ws HTTP/1.1\r\nHost: productpage\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
		br := bufio.NewReader(s)
		resp, err := http.ReadResponse(br, nil)
		if err != nil || resp.StatusCode != http.StatusSwitchingProtocols {
			t.Fatalf("%v %v, want 101", resp, err)
		}
		return s, br
	}
	echo := func(t *testing.T, s *hbone.Stream, br *bufio.Reader) {
		t.Helper()
		io.WriteString(s, "ping")
		buf := make([]byte, 4)
		if _, err := io.ReadFull(br, buf); err != nil || string(buf) != "ping" {
			t.Fatalf("echo %q %v", buf, err)
		}
	}
	// ended waits until the relay ends the stream, and returns when.
	ended := func(t *testing.T, br *bufio.Reader) time.Time {
		t.Helper()
		if b, err := br.ReadByte(); err == nil {
			t.Fatalf("read %q, want the stream ended", b)
		}
		return time.Now()
	}
	t.Run("idle", func(t *testing.T) {
		synctest.Test(t, func(t *testing.T) {
			m := meshWith(t, nil, func(r *routev3.Route) { r.GetRoute().IdleTimeout = durationpb.New(idle) })
			s, br := upgrade(t, m)
			for range 3 {
				time.Sleep(idle - time.Second)
				echo(t, s, br)
			}
			last := time.Now()
			if d := ended(t, br).Sub(last); d != idle {
				t.Errorf("relay ended %v after the last byte, want %v", d, idle)
			}
			synctest.Wait()
			if lines := m.logs.lines(map[string]any{"status": 101, "flags": "SI", "refusal": "stream_idle_timeout"}); len(lines) != 1 {
				t.Errorf("want one access-log line 101 SI:\n%s", m.logs.buf.String())
			}
		})
	})
	t.Run("max duration", func(t *testing.T) {
		synctest.Test(t, func(t *testing.T) {
			const limit = time.Minute
			m := meshWith(t, nil, func(r *routev3.Route) {
				r.GetRoute().MaxStreamDuration = &routev3.RouteAction_MaxStreamDuration{MaxStreamDuration: durationpb.New(limit)}
			})
			start := time.Now()
			s, br := upgrade(t, m)
			echo(t, s, br)
			if d := ended(t, br).Sub(start); d != limit {
				t.Errorf("relay ended after %v, want %v", d, limit)
			}
			synctest.Wait()
			if lines := m.logs.lines(map[string]any{"status": 101, "refusal": "max_stream_duration"}); len(lines) != 1 {
				t.Errorf("want one access-log line 101 max_stream_duration:\n%s", m.logs.buf.String())
			}
		})
	})
}
