package interop

import (
	"bytes"
	"context"
	"io"
	"net"
	"net/http"
	"net/netip"
	"strconv"
	"strings"
	"sync"
	"testing"

	"github.com/amber-mesh/amber/tunnel/certs"
	"github.com/amber-mesh/amber/tunnel/hbone"
)

// connectSeen is one CONNECT amber's server handed its handler.
type connectSeen struct {
	Authority string
	Peer      string // the client's SPIFFE ID, or why there is none
}

// forwarder is an amber HBONE handler that tunnels each stream to its
// :authority, half-closes each direction when the other side does, and
// records what it saw. Streams to Refuse are rejected with 403.
type forwarder struct {
	Refuse netip.AddrPort

	mu   sync.Mutex // guards seen
	seen []connectSeen
}

func (f *forwarder) Seen() []connectSeen {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]connectSeen(nil), f.seen...)
}

func (f *forwarder) ServeHBONE(ctx context.Context, req *hbone.Request, rw hbone.Responder) {
	c := connectSeen{Authority: req.Authority, Peer: "not a TLS connection"}
	if ts, ok := req.Conn.(tlsState); ok {
		if id, err := certs.PeerID(ts.ConnectionState()); err != nil {
			c.Peer = err.Error()
		} else {
			c.Peer = id.String()
		}
	}
	f.mu.Lock()
	f.seen = append(f.seen, c)
	f.mu.Unlock()

	if req.Addr == f.Refuse {
		rw.Reject(http.StatusForbidden, "refused by the test")
		return
	}
	var d net.Dialer
	up, err := d.DialContext(ctx, "tcp", req.Addr.String())
	if err != nil {
		rw.Reject(http.StatusServiceUnavailable, err.Error())
		return
	}
	defer up.Close()
	// ctx ends when the stream is reset or the server closes: drop the
	// target then too, so that neither copy outlives the stream.
	defer context.AfterFunc(ctx, func() { up.Close() })()
	s, err := rw.Accept()
	if err != nil {
		return
	}
	defer s.Close()
	sent := make(chan struct{})
	go func() {
		defer close(sent)
		if _, err := io.Copy(up, s); err != nil {
			up.Close()
			return
		}
		up.(*net.TCPConn).CloseWrite()
	}()
	if _, err := io.Copy(s, up); err == nil {
		s.CloseWrite()
	}
	<-sent
}

// TestIntegrationIstioHBONEClient runs Istio's Go HBONE dialer against
// amber's HBONE server.
func TestIntegrationIstioHBONEClient(t *testing.T) {
	bin := interopBinary(t)
	mesh := mustCA(t)
	serverID := mustID(t, "spiffe://"+trustDomain+"/ns/amber/sa/server")
	clientID := mustID(t, "spiffe://"+trustDomain+"/ns/istio/sa/client")
	clientFiles := mustIssueFiles(t, mesh, clientID, mesh.RootPEM())

	t.Run("echo on streams sharing a connection", func(t *testing.T) {
		m := mustManager(t, mesh)
		echo := startEcho(t)
		fwd := &forwarder{}
		srv, addr := startAmberServer(t, m, serverID, fwd)
		const streams = 4
		payload := randomBytes(t, 1<<20)
		res := runIstioClient(t, bin, payload, append(clientFiles.args(),
			"-proxy", addr.String(), "-target", echo.Addr.String(),
			"-server-id", serverID.String(), "-streams", strconv.Itoa(streams))...)
		if res.Err != nil {
			t.Fatalf("istio client: %v\n%s", res.Err, res.Stderr)
		}
		if want := bytes.Repeat(payload, streams); !bytes.Equal(res.Stdout, want) {
			t.Fatalf("istio client got %d bytes back, want the %d sent", len(res.Stdout), len(want))
		}
		if want := "proxy identity " + serverID.String(); !strings.Contains(string(res.Stderr), want) {
			t.Errorf("istio client stderr lacks %q:\n%s", want, res.Stderr)
		}
		seen := fwd.Seen()
		if len(seen) != streams {
			t.Fatalf("amber server saw %d CONNECTs, want %d: %v", len(seen), streams, seen)
		}
		for _, c := range seen {
			if want := (connectSeen{Authority: echo.Addr.String(), Peer: clientID.String()}); c != want {
				t.Errorf("amber server saw %+v, want %+v", c, want)
			}
		}
		if n := srv.Stats.ConnsOpened.Load(); n != 1 {
			t.Errorf("amber server: %d connections, want 1 (x/net multiplexes the dialer's streams)", n)
		}
		if n := srv.Stats.StreamsOpened.Load(); n != streams {
			t.Errorf("amber server: %d streams opened, want %d", n, streams)
		}
	})

	t.Run("amber's rejection status reaches Istio's client", func(t *testing.T) {
		m := mustManager(t, mesh)
		refused := closedPort(t)
		fwd := &forwarder{Refuse: refused}
		srv, addr := startAmberServer(t, m, serverID, fwd)
		res := runIstioClient(t, bin, []byte("x"), append(clientFiles.args(),
			"-proxy", addr.String(), "-target", refused.String())...)
		if res.Err == nil {
			t.Fatalf("istio client succeeded through a rejected CONNECT; stdout %q", res.Stdout)
		}
		if !strings.Contains(string(res.Stderr), "403") {
			t.Errorf("istio client did not report the 403:\n%s", res.Stderr)
		}
		if n := srv.Stats.StreamsRejected.Load(); n != 1 {
			t.Errorf("amber server: %d streams rejected, want 1", n)
		}
	})

	t.Run("client certificate from another CA is refused", func(t *testing.T) {
		m := mustManager(t, mesh)
		echo := startEcho(t)
		fwd := &forwarder{}
		srv, addr := startAmberServer(t, m, serverID, fwd)
		foreign := mustIssueFiles(t, mustCA(t), clientID, mesh.RootPEM())
		res := runIstioClient(t, bin, []byte("x"), append(foreign.args(),
			"-proxy", addr.String(), "-target", echo.Addr.String())...)
		if res.Err == nil {
			t.Fatalf("istio client with a foreign certificate got through; stdout %q", res.Stdout)
		}
		t.Logf("istio client failed as it should: %v: %s", res.Err, lastLine(res.Stderr))
		if seen := fwd.Seen(); len(seen) != 0 {
			t.Errorf("amber server handled CONNECTs from an untrusted client: %v", seen)
		}
		if n := srv.Stats.HandshakeErrors.Load(); n == 0 {
			t.Error("amber server counted no handshake error")
		}
		if n := m.Stats().PeersRejected; n == 0 {
			t.Error("amber's certificate manager rejected no peer")
		}
		if n := echo.Accepted.Load(); n != 0 {
			t.Errorf("echo target got %d connections", n)
		}
	})
}

// lastLine returns b's last non-empty line, for messages.
func lastLine(b []byte) string {
	s := strings.TrimSpace(string(b))
	if i := strings.LastIndexByte(s, '\n'); i >= 0 {
		s = s[i+1:]
	}
	return s
}
