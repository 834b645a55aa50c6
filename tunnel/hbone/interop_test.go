package hbone_test

import (
	"bytes"
	"context"
	"crypto/sha256"
	"crypto/tls"
	"errors"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"net/url"
	"sync"
	"testing"

	"golang.org/x/net/http2"

	"github.com/amber-mesh/amber/internal/tcptest"
	"github.com/amber-mesh/amber/tunnel/hbone"
)

// These tests pair our engine with x/net/http2, the implementation behind
// Istio's Go pkg/hbone, to check that we speak standard HTTP/2 CONNECT.

// xnetConnect opens a CONNECT through an x/net/http2 Transport; the
// request body is the returned pipe writer.
func xnetConnect(t *testing.T, tr *http2.Transport, addr, authority string) (*http.Response, *io.PipeWriter) {
	t.Helper()
	pr, pw := io.Pipe()
	req := &http.Request{
		Method: http.MethodConnect,
		URL:    &url.URL{Scheme: "https", Host: addr},
		Host:   authority,
		Header: http.Header{"Forwarded": {`for="10.0.0.2:4000"`}},
		Body:   pr,
	}
	resp, err := tr.RoundTrip(req)
	if err != nil {
		t.Fatalf("x/net CONNECT: %v", err)
	}
	t.Cleanup(func() { resp.Body.Close(); pw.Close() })
	return resp, pw
}

func newXnetTransport(t *testing.T) *http2.Transport {
	_, ctls := mustTLS(t)
	tr := &http2.Transport{TLSClientConfig: ctls}
	t.Cleanup(tr.CloseIdleConnections)
	return tr
}

func TestInteropXNetClient(t *testing.T) {
	checkLeaks(t)
	t.Run("echo and client half-close", func(t *testing.T) {
		var fwd string
		ts := startServer(t, hbone.HandlerFunc(func(ctx context.Context, req *hbone.Request, rw hbone.Responder) {
			fwd = req.Header.Get("Forwarded")
			echo(ctx, req, rw)
		}))
		tr := newXnetTransport(t)
		resp, pw := xnetConnect(t, tr, ts.Addr.String(), "10.0.0.1:8080")
		if resp.StatusCode != 200 {
			t.Fatalf("status %d", resp.StatusCode)
		}
		data := make([]byte, 6<<20)
		rand.NewChaCha8([32]byte{1}).Read(data)
		go func() {
			pw.Write(data)
			pw.Close() // END_STREAM
		}()
		got, err := io.ReadAll(resp.Body)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, data) {
			t.Fatalf("echo returned %d bytes, want %d identical", len(got), len(data))
		}
		if fwd != `for="10.0.0.2:4000"` {
			t.Errorf("forwarded = %q", fwd)
		}
	})
	t.Run("server half-closes first", func(t *testing.T) {
		received := make(chan int, 1)
		ts := startServer(t, hbone.HandlerFunc(func(ctx context.Context, req *hbone.Request, rw hbone.Responder) {
			s, err := rw.Accept()
			if err != nil {
				return
			}
			s.Write([]byte("bye"))
			s.CloseWrite()
			n, _ := io.Copy(io.Discard, s)
			received <- int(n)
		}))
		tr := newXnetTransport(t)
		resp, pw := xnetConnect(t, tr, ts.Addr.String(), "10.0.0.1:8080")
		if got := readAllString(t, resp.Body); got != "bye" {
			t.Fatalf("read %q", got)
		}
		if _, err := pw.Write(make([]byte, 1<<20)); err != nil {
			t.Fatalf("x/net client writing after the server's END_STREAM: %v", err)
		}
		pw.Close()
		if n := <-received; n != 1<<20 {
			t.Fatalf("server received %d", n)
		}
	})
	t.Run("rejections", func(t *testing.T) {
		ts := startServer(t, hbone.HandlerFunc(func(ctx context.Context, req *hbone.Request, rw hbone.Responder) {
			rw.Reject(http.StatusUnauthorized, "nope")
		}))
		tr := newXnetTransport(t)
		resp, _ := xnetConnect(t, tr, ts.Addr.String(), "10.0.0.1:8080")
		if resp.StatusCode != 401 {
			t.Errorf("status %d, want 401", resp.StatusCode)
		}
		resp, _ = xnetConnect(t, tr, ts.Addr.String(), "example.com:80")
		if resp.StatusCode != 400 {
			t.Errorf("hostname authority: status %d, want 400", resp.StatusCode)
		}
		// A GET is not a tunnel.
		req, _ := http.NewRequest(http.MethodGet, "https://"+ts.Addr.String()+"/", nil)
		resp, err := tr.RoundTrip(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != 400 {
			t.Errorf("GET: status %d, want 400", resp.StatusCode)
		}
		if n := ts.Stats.BadRequests.Load(); n != 2 {
			t.Errorf("BadRequests = %d, want 2", n)
		}
	})
}

// startXnetServer serves h with an x/net/http2 Server over TLS.
func startXnetServer(t *testing.T, h http.HandlerFunc) *testServer {
	t.Helper()
	stls, _ := mustTLS(t)
	stls.NextProtos = []string{"h2"}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &http2.Server{}
	tcptest.Serve(t, ln, func(nc net.Conn) {
		tc := tls.Server(nc, stls)
		if tc.Handshake() != nil {
			return
		}
		srv.ServeConn(tc, &http2.ServeConnOpts{Handler: h})
	})
	return &testServer{Addr: ln.Addr().(*net.TCPAddr).AddrPort()}
}

// xnetEcho is how a Go net/http handler tunnels: answer 200, then copy the
// request body to the response, flushing as it goes.
func xnetEcho(w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodConnect {
		w.WriteHeader(http.StatusMethodNotAllowed)
		return
	}
	if r.Host == "10.0.0.9:9" {
		w.WriteHeader(http.StatusForbidden)
		return
	}
	w.WriteHeader(http.StatusOK)
	w.(http.Flusher).Flush()
	buf := make([]byte, 32<<10)
	for {
		n, err := r.Body.Read(buf)
		if n > 0 {
			w.Write(buf[:n])
			w.(http.Flusher).Flush()
		}
		if err != nil {
			return
		}
	}
}

func TestInteropXNetServer(t *testing.T) {
	checkLeaks(t)
	ts := startXnetServer(t, xnetEcho)
	tp := newPool(t, ts)
	t.Run("echo and client half-close", func(t *testing.T) {
		s := tp.connect(t)
		data := make([]byte, 8<<20)
		rand.NewChaCha8([32]byte{2}).Read(data)
		go func() {
			s.Write(data)
			s.CloseWrite()
		}()
		got, err := io.ReadAll(s)
		if err != nil {
			t.Fatal(err)
		}
		if sha256.Sum256(got) != sha256.Sum256(data) {
			t.Fatalf("echo returned %d bytes, want %d identical", len(got), len(data))
		}
	})
	t.Run("many streams", func(t *testing.T) {
		var wg sync.WaitGroup
		for i := range 20 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				if err := transfer(tp, 256<<10, uint64(i)); err != nil {
					t.Error(err)
				}
			}()
		}
		wg.Wait()
	})
	t.Run("status error", func(t *testing.T) {
		_, err := tp.Connect(context.Background(), tp.Key, "10.0.0.9:9", nil)
		var se *hbone.StatusError
		if !errors.As(err, &se) || se.Code != http.StatusForbidden {
			t.Fatalf("Connect: %v, want StatusError 403", err)
		}
	})
	if n := tp.Dials.Load(); n != 1 {
		t.Errorf("dials = %d, want 1", n)
	}
}
