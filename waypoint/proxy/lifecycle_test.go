package proxy_test

import (
	"bufio"
	"context"
	"io"
	"net/http"
	"testing"
	"time"

	"github.com/amber-mesh/amber/internal/testutil"
)

// TestDrain: Drain closes idle inner connections at once, lets a request
// in flight finish (its response closes its connection), and returns once
// nothing is left; the listener is closed.
func TestDrain(t *testing.T) {
	m := newMesh(t, meshOptions{})
	m.wp.Update(compile(t, golden(t, "base")))
	sleep := m.sleep()
	app := m.pods["productpage-v1"].app

	idle, err := sleep.connect(context.Background(), productpageVIP)
	if err != nil {
		t.Fatal(err)
	}
	defer idle.Close()
	idleR := bufio.NewReader(idle)
	io.WriteString(idle, "GET /1 HTTP/1.1\r\nHost: productpage\r\n\r\n")
	if resp, err := http.ReadResponse(idleR, nil); err != nil || resp.StatusCode != 200 {
		t.Fatalf("%v %v", resp, err)
	} else {
		io.ReadAll(resp.Body)
	}

	busy, err := sleep.connect(context.Background(), productpageVIP)
	if err != nil {
		t.Fatal(err)
	}
	defer busy.Close()
	io.WriteString(busy, "GET /hold HTTP/1.1\r\nHost: productpage\r\n\r\n")
	testutil.Eventually(t, "the held request at the application", func() bool { return len(app.requests()) == 2 })

	drained := make(chan error, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		defer cancel()
		drained <- m.wp.Drain(ctx)
	}()
	if b, err := idleR.ReadByte(); err != io.EOF {
		t.Fatalf("idle connection: %q %v, want it ended", b, err)
	}
	// Ends its side in turn, as a ztunnel does once its application
	// closed: the waypoint lingers for that.
	idle.CloseWrite()
	app.open()
	busyR := bufio.NewReader(busy)
	resp, err := http.ReadResponse(busyR, nil)
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != 200 || string(body) != "held" || !resp.Close {
		t.Errorf("request in flight: %d %q close %v, want 200 held with the connection closed", resp.StatusCode, body, resp.Close)
	}
	if b, err := busyR.ReadByte(); err != io.EOF {
		t.Errorf("after the last response: %q %v, want the stream ended", b, err)
	}
	busy.CloseWrite()
	if err := <-drained; err != nil {
		t.Errorf("Drain: %v", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if _, err := m.client(sleepID, nil).connect(ctx, productpageVIP); err == nil {
		t.Error("a CONNECT succeeded after Drain")
	}
}

// TestUpgrade: a WebSocket upgrade the chain allows is forwarded, and the
// connection relayed both ways until it ends, bytes sent behind the
// upgrade request and behind the 101 included; the access log reports it
// then.
func TestUpgrade(t *testing.T) {
	m := newMesh(t, meshOptions{})
	m.wp.Update(compile(t, golden(t, "base")))
	s, err := m.sleep().connect(context.Background(), productpageVIP)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	// The client does not wait for the 101 before it speaks.
	io.WriteString(s, "GET /ws HTTP/1.1\r\nHost: productpage\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nX-Greeting: hello\r\n\r\nearly")
	br := bufio.NewReader(s)
	resp, err := http.ReadResponse(br, nil)
	if err != nil || resp.StatusCode != http.StatusSwitchingProtocols || resp.Header.Get("Upgrade") != "websocket" {
		t.Fatalf("%v %v", resp, err)
	}
	buf := make([]byte, len("helloearly"))
	if _, err := io.ReadFull(br, buf); err != nil || string(buf) != "helloearly" {
		t.Fatalf("read %q %v, want the greeting behind the 101, then the echo of the early bytes", buf, err)
	}
	io.WriteString(s, "ping")
	buf = make([]byte, 4)
	if _, err := io.ReadFull(br, buf); err != nil || string(buf) != "ping" {
		t.Fatalf("echo %q %v", buf, err)
	}
	s.CloseWrite()
	if rest, err := io.ReadAll(br); err != nil || len(rest) != 0 {
		t.Errorf("after the client's end: %q %v", rest, err)
	}
	testutil.Eventually(t, "the upgrade's access-log line", func() bool {
		return len(m.logs.lines(map[string]any{"status": 101, "bytes_received": nil})) == 0 &&
			len(m.logs.lines(map[string]any{"status": 101})) == 1
	})
}

// TestQuiesce: Quiesce ends an idle keep-alive connection, and a new
// CONNECT is still accepted and served, its response closing its
// connection: a ztunnel that has not heard of the pod's end yet is
// answered.
func TestQuiesce(t *testing.T) {
	m := newMesh(t, meshOptions{})
	m.wp.Update(compile(t, golden(t, "base")))
	sleep := m.sleep()
	kept, err := sleep.connect(context.Background(), productpageVIP)
	if err != nil {
		t.Fatal(err)
	}
	defer kept.Close()
	keptR := bufio.NewReader(kept)
	get := func(c io.Writer, r *bufio.Reader) *http.Response {
		t.Helper()
		io.WriteString(c, "GET /1 HTTP/1.1\r\nHost: productpage\r\n\r\n")
		resp, err := http.ReadResponse(r, nil)
		if err != nil {
			t.Fatal(err)
		}
		io.ReadAll(resp.Body)
		return resp
	}
	if resp := get(kept, keptR); resp.StatusCode != 200 || resp.Close {
		t.Fatalf("before Quiesce: %d close %v", resp.StatusCode, resp.Close)
	}
	m.wp.Quiesce()
	if b, err := keptR.ReadByte(); err != io.EOF {
		t.Errorf("idle connection after Quiesce: %q %v, want it ended", b, err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	fresh, err := m.client(sleepID, nil).connect(ctx, productpageVIP)
	if err != nil {
		t.Fatalf("a CONNECT after Quiesce: %v", err)
	}
	defer fresh.Close()
	if resp := get(fresh, bufio.NewReader(fresh)); resp.StatusCode != 200 || !resp.Close {
		t.Errorf("new connection after Quiesce: %d close %v, want 200 with the connection closed", resp.StatusCode, resp.Close)
	}
}
