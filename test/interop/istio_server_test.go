package interop

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"io"
	"net/netip"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/amber-mesh/amber/internal/testutil"
	"github.com/amber-mesh/amber/tunnel/certs"
	"github.com/amber-mesh/amber/tunnel/hbone"
	"github.com/amber-mesh/amber/tunnel/identity"
)

// TestIntegrationIstioHBONEServer runs amber's HBONE client pool against
// Istio's Go HBONE server.
func TestIntegrationIstioHBONEServer(t *testing.T) {
	bin := interopBinary(t)
	mesh := mustCA(t)
	serverID := mustID(t, "spiffe://"+trustDomain+"/ns/istio/sa/server")
	clientID := mustID(t, "spiffe://"+trustDomain+"/ns/amber/sa/client")
	istio := startIstioServer(t, bin, mustIssueFiles(t, mesh, serverID, mesh.RootPEM()))
	key := hbone.Key{Src: clientID.String(), Dst: serverID.String(), Addr: istio.Addr}
	m := mustManager(t, mesh)

	connect := func(t *testing.T, p *hbone.Pool, target netip.AddrPort) (*hbone.Stream, error) {
		t.Helper()
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		defer cancel()
		s, err := p.Connect(ctx, key, hbone.FormatAuthority(target), nil)
		if err == nil {
			t.Cleanup(func() { s.Close() })
		}
		return s, err
	}
	// deadline bounds a stream's remaining reads and writes: a tunnel
	// that fails to end must fail the test, not hang it.
	deadline := func(t *testing.T, s *hbone.Stream) {
		t.Helper()
		if err := s.SetDeadline(time.Now().Add(30 * time.Second)); err != nil {
			t.Fatal(err)
		}
	}
	wantConnect := func(t *testing.T, target netip.AddrPort) {
		t.Helper()
		want := "connect " + target.String() + " peer=" + clientID.String()
		if got := istio.Connects(); !slices.Contains(got, want) {
			t.Errorf("istio server did not print %q; it printed %q", want, got)
		}
	}

	t.Run("echo and amber's client half-closes", func(t *testing.T) {
		p := newAmberPool(t, m, clientID, serverID)
		echo := startEcho(t)
		s, err := connect(t, p, echo.Addr)
		if err != nil {
			t.Fatalf("connect through istio: %v", err)
		}
		deadline(t, s)
		data := randomBytes(t, 4<<20)
		wrote := make(chan error, 1)
		go func() {
			_, err := s.Write(data)
			if err == nil {
				err = s.CloseWrite()
			}
			wrote <- err
		}()
		got, err := io.ReadAll(s)
		if err != nil {
			t.Fatalf("read after %d bytes: %v", len(got), err)
		}
		if err := <-wrote; err != nil {
			t.Fatalf("write: %v", err)
		}
		if sha256.Sum256(got) != sha256.Sum256(data) {
			t.Fatalf("echo returned %d bytes, want the %d sent", len(got), len(data))
		}
		// The target answers the FIN that Istio's server made of amber's
		// END_STREAM; only then does the reply end, so this cannot block.
		if n := <-echo.Ended; n != int64(len(data)) {
			t.Errorf("echo target saw the client's FIN after %d bytes, want %d", n, len(data))
		}
		wantConnect(t, echo.Addr)
	})

	t.Run("streams share one connection", func(t *testing.T) {
		p := newAmberPool(t, m, clientID, serverID)
		echo := startEcho(t)
		var wg sync.WaitGroup
		for i := range 8 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				s, err := connect(t, p, echo.Addr)
				if err != nil {
					t.Errorf("stream %d: connect: %v", i, err)
					return
				}
				deadline(t, s)
				data := randomBytes(t, 256<<10)
				go func() {
					s.Write(data)
					s.CloseWrite()
				}()
				got, err := io.ReadAll(s)
				if err != nil || !bytes.Equal(got, data) {
					t.Errorf("stream %d: echoed %d of %d bytes, err %v", i, len(got), len(data), err)
				}
			}()
		}
		wg.Wait()
		if n := p.Stats.Dials.Load(); n != 1 {
			t.Errorf("amber pool dialled %d times, want 1", n)
		}
	})

	// Istio's server cannot half-close towards the client (a net/http
	// handler ends its response only by returning, see closeWriter in
	// pkg/hbone/util.go), so when the target closes first it ends the
	// whole stream: END_STREAM on the response, then RST_STREAM(NO_ERROR)
	// for the request body it stops reading. RFC 9113 §8.1 says a client
	// must not discard a complete response because of such a reset.
	t.Run("target closes first", func(t *testing.T) {
		p := newAmberPool(t, m, clientID, serverID)
		g := startGreeter(t)
		s, err := connect(t, p, g.Addr)
		if err != nil {
			t.Fatalf("connect through istio: %v", err)
		}
		deadline(t, s)
		// Read only once the reset has arrived, so that the complete
		// response must have outlived it.
		testutil.Eventually(t, "istio's server resetting the stream after the target closed", func() bool { return p.Stats.StreamsReset.Load() > 0 })
		got, err := io.ReadAll(s)
		if string(got) != g.Greeting || err != nil {
			t.Fatalf("read %q, %v; want %q and EOF", got, err, g.Greeting)
		}
		if n := <-g.Received; n != 0 {
			t.Errorf("target received %d bytes, want 0", n)
		}
	})

	// Istio's handler flushes its 200 before it dials the target, so an
	// unreachable target shows as a stream that ends at once with no
	// data rather than as a 503. Either must end the stream cleanly.
	t.Run("unreachable target", func(t *testing.T) {
		p := newAmberPool(t, m, clientID, serverID)
		s, err := connect(t, p, closedPort(t))
		if err != nil {
			if code, ok := statusOf(err); !ok || code < 500 {
				t.Fatalf("connect: %v, want a 5xx status or an empty stream", err)
			}
			t.Logf("istio answered %v", err)
			return
		}
		deadline(t, s)
		got, err := io.ReadAll(s)
		if len(got) != 0 {
			t.Errorf("read %q from an unreachable target", got)
		}
		var se *hbone.StreamError
		if err != nil && !errors.As(err, &se) {
			t.Errorf("read: %v, want EOF or a stream reset", err)
		}
		t.Logf("istio answered 200, then the stream ended (read error %v)", err)
	})

	t.Run("client certificate from another CA is refused", func(t *testing.T) {
		// Trusts Istio's server but presents a certificate of another CA.
		foreign := mustManager(t, crossCA{signer: mustCA(t), trust: mesh})
		p := newAmberPool(t, foreign, clientID, serverID)
		echo := startEcho(t)
		s, err := connect(t, p, echo.Addr)
		if err == nil {
			// In TLS 1.3 the client's handshake ends before the server
			// checked its certificate: the refusal may arrive only now.
			deadline(t, s)
			if _, err = s.Write([]byte("x")); err == nil {
				_, err = io.ReadAll(s)
			}
		}
		if err == nil {
			t.Fatal("a client certificate from another CA got through Istio's server")
		}
		t.Logf("refused as it should be: %v", err)
		if n := echo.Accepted.Load(); n != 0 {
			t.Errorf("echo target got %d connections", n)
		}
	})

	t.Run("server with another identity is refused by amber", func(t *testing.T) {
		other := identity.ID{TrustDomain: trustDomain, Namespace: "istio", ServiceAccount: "someone-else"}
		p := newAmberPool(t, m, clientID, other)
		echo := startEcho(t)
		_, err := connect(t, p, echo.Addr)
		if !errors.Is(err, certs.ErrPeerIdentity) {
			t.Fatalf("connect: %v, want %v", err, certs.ErrPeerIdentity)
		}
		if n := echo.Accepted.Load(); n != 0 {
			t.Errorf("echo target got %d connections", n)
		}
	})
}

// statusOf returns the status of a *hbone.StatusError in err.
func statusOf(err error) (int, bool) {
	var se *hbone.StatusError
	if errors.As(err, &se) {
		return se.Code, true
	}
	return 0, false
}
