package relay

import (
	"fmt"
	"io"
	"net"
	"runtime"
	"testing"
	"time"

	"github.com/amber-mesh/amber/internal/tcptest"
	"github.com/amber-mesh/amber/internal/testutil"
)

func mustParker(t *testing.T) *Parker {
	t.Helper()
	pk, err := NewParker()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { pk.Close() })
	return pk
}

type pumpResult struct {
	n   int64
	err error
}

// startPump copies client → peer through a pump: client writes into src,
// the pump copies src into dst, peer reads dst's other end.
func startPump(t *testing.T, pk *Parker) (client, peer *net.TCPConn, u *pump, results chan pumpResult) {
	client, src := tcptest.Pair(t)
	dst, peer := tcptest.Pair(t)
	results = make(chan pumpResult, 1)
	u = newPump(pk, dst, src, func(n int64, err error) { results <- pumpResult{n, err} })
	if u == nil {
		t.Fatal("no pump for a TCP connection")
	}
	go u.run()
	return client, peer, u, results
}

// waitParked waits until the pump gave its goroutine back.
func waitParked(t *testing.T, u *pump, base int) {
	t.Helper()
	testutil.Eventually(t, fmt.Sprintf("the pump parked, at most %d goroutines", base), func() bool {
		u.mu.Lock()
		parked := u.parked
		u.mu.Unlock()
		return parked && runtime.NumGoroutine() <= base
	})
}

// TestPumpParks: an idle upload direction holds no goroutine, wakes up
// for new data and passes the half-close on.
func TestPumpParks(t *testing.T) {
	pk := mustParker(t)
	base := runtime.NumGoroutine()
	client, peer, u, results := startPump(t, pk)
	roundTrip(t, client, peer, "first")
	waitParked(t, u, base)
	roundTrip(t, client, peer, "second")
	waitParked(t, u, base)
	client.CloseWrite()
	if rest, err := io.ReadAll(peer); err != nil || len(rest) != 0 {
		t.Fatalf("after the client's half-close read %q, %v; want EOF", rest, err)
	}
	if r := <-results; r.err != nil || r.n != 11 {
		t.Fatalf("pump ended with %d, %v; want 11, nil", r.n, r.err)
	}
}

// TestPumpStop: a parked pump whose connection is closed ends with an
// error, and its socket leaves the epoll set first.
func TestPumpStop(t *testing.T) {
	pk := mustParker(t)
	base := runtime.NumGoroutine()
	client, peer, u, results := startPump(t, pk)
	roundTrip(t, client, peer, "x")
	waitParked(t, u, base)
	u.stop()
	u.src.Close()
	select {
	case r := <-results:
		if r.err == nil {
			t.Fatalf("stopped pump ended without an error after %d bytes", r.n)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("stopped pump did not end")
	}
	pk.mu.Lock()
	defer pk.mu.Unlock()
	if len(pk.parked) != 0 || u.registered {
		t.Errorf("closed socket still in the parker: %d parked, registered=%v", len(pk.parked), u.registered)
	}
}
