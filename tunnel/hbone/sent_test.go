package hbone_test

import (
	"context"
	"errors"
	"net"
	"testing"
	"time"

	"golang.org/x/net/http2"

	"github.com/amber-mesh/amber/internal/tcptest"
	"github.com/amber-mesh/amber/tunnel/hbone"
)

type sentResult struct {
	n, unsent int64
	err       error
}

// relayApp accepts every CONNECT and copies relay into it with ReadFrom,
// as the ztunnel's relay does, reporting what ReadFrom counted and what
// Unsent says of it.
func relayApp(relay *net.TCPConn, res chan<- sentResult) hbone.Handler {
	return hbone.HandlerFunc(func(ctx context.Context, req *hbone.Request, rw hbone.Responder) {
		s, err := rw.Accept()
		if err != nil {
			res <- sentResult{err: err}
			return
		}
		n, err := s.ReadFrom(relay)
		res <- sentResult{n: n, unsent: hbone.Unsent(s), err: err}
	})
}

// What a stream counts as sent is what reached the peer, not what it read
// from its source: bytes a zero window kept back are not sent.
func TestSentCountsWhatReachedThePeer(t *testing.T) {
	t.Run("flow-control window closed", func(t *testing.T) {
		checkLeaks(t)
		app, relay := tcptest.Pair(t) // the application writes into app
		res := make(chan sentResult, 1)
		ts := startServer(t, relayApp(relay, res))
		rc := dialRaw(t, ts)
		// The client gives its streams no window: nothing may be sent.
		rc.fr.WriteSettings(http2.Setting{ID: http2.SettingInitialWindowSize, Val: 0})
		rc.connect(1, false)
		if code := rc.expectStatus(1); code != 200 {
			t.Fatalf("status %d", code)
		}
		if _, err := app.Write(make([]byte, 64<<10)); err != nil {
			t.Fatal(err)
		}
		rc.ping() // the server has read the application's bytes meanwhile, or will
		rc.fr.WriteRSTStream(1, http2.ErrCodeCancel)
		r := <-res
		if got := r.n - r.unsent; got != 0 {
			t.Errorf("counted %d bytes sent (ReadFrom %d, Unsent %d) to a peer whose window never opened", got, r.n, r.unsent)
		}
	})

	t.Run("peer not reading", func(t *testing.T) {
		checkLeaks(t)
		app, relay := tcptest.Pair(t) // the application writes into app
		res := make(chan sentResult, 1)
		// Keepalive ends the connection once the stalled peer leaves a
		// PING unanswered.
		ts := startServer(t, relayApp(relay, res), func(s *hbone.Server) {
			s.Settings = hbone.Settings{PingInterval: 50 * time.Millisecond, PingTimeout: 200 * time.Millisecond}
		})
		rc := dialRawWith(t, ts, smallReceiveBuffer(16<<10))
		// Windows far larger than what will be sent: only TCP holds the
		// bytes back.
		rc.fr.WriteSettings(http2.Setting{ID: http2.SettingInitialWindowSize, Val: 64 << 20})
		rc.fr.WriteWindowUpdate(0, 64<<20)
		rc.connect(1, false)
		if code := rc.expectStatus(1); code != 200 {
			t.Fatalf("status %d", code)
		}
		// The client reads nothing from now on.
		const total = 8 << 20
		go func() {
			app.Write(make([]byte, total))
			app.CloseWrite()
		}()
		r := <-res
		if r.err == nil {
			t.Fatalf("ReadFrom ended without an error after %d bytes: the connection should have been torn down", r.n)
		}
		// Now read what reached the client: everything the server wrote
		// to its socket before tearing the connection down.
		var delivered int64
		rc.tc.SetReadDeadline(time.Now().Add(10 * time.Second))
		for {
			f, err := rc.fr.ReadFrame()
			if err != nil {
				var se http2.StreamError
				if errors.As(err, &se) {
					continue
				}
				break // EOF, or a TLS record cut short by the close
			}
			if d, ok := f.(*http2.DataFrame); ok && d.StreamID == 1 {
				delivered += int64(len(d.Data()))
			}
		}
		sent := r.n - r.unsent
		t.Logf("ReadFrom %d, Unsent %d, delivered %d of %d", r.n, r.unsent, delivered, total)
		if sent > delivered {
			t.Errorf("counted %d bytes sent, but only %d reached the peer", sent, delivered)
		}
		if delivered >= total {
			t.Fatalf("the peer got everything (%d bytes): the test did not stall the connection", delivered)
		}
	})
}
