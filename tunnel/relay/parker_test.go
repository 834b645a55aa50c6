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

// startPump copies client → peer through a pump: client writes into src,
// the pump copies src into dst, peer reads dst's other end. It is the
// pump of a Pair of src and dst whose other direction never runs.
func startPump(t *testing.T, pk *Parker) (client, peer *net.TCPConn, p *Pair, results chan Result) {
	client, src := tcptest.Pair(t)
	dst, peer := tcptest.Pair(t)
	results = make(chan Result, 1)
	p = NewPair(src, dst)
	p.done = DoneFunc(func(r Result) { results <- r })
	p.left.Store(1)
	p.pump.pk = pk
	if !p.pump.init(&p.ab) {
		t.Fatal("no pump for a TCP connection")
	}
	p.setPump(&p.ab)
	go p.pump.run()
	return client, peer, p, results
}

// waitParked waits until the pump gave its goroutine back.
func waitParked(t *testing.T, p *Pair, base int) {
	u := &p.pump
	t.Helper()
	testutil.Eventually(t, fmt.Sprintf("the pump parked, at most %d goroutines", base), func() bool {
		u.mu.Lock()
		parked := u.parked
		u.mu.Unlock()
		return parked && runtime.NumGoroutine() <= base
	})
}

// TestPumpParks: an idle upload direction holds no goroutine, wakes up
// for new data and passes the half-close on. It parks after idleFirst
// while it has carried one burst, after idleAfter once bytes came again.
func TestPumpParks(t *testing.T) {
	pk := mustParker(t)
	base := runtime.NumGoroutine()
	client, peer, p, results := startPump(t, pk)
	roundTrip(t, client, peer, "first")
	waitParked(t, p, base) // the park orders the pump's writes before these reads
	if w := p.pump.wait(); w != idleFirst {
		t.Errorf("after one burst the pump waits %v, want idleFirst (%v)", w, idleFirst)
	}
	roundTrip(t, client, peer, "second")
	waitParked(t, p, base)
	if w := p.pump.wait(); w != idleAfter {
		t.Errorf("after a second burst the pump waits %v, want idleAfter (%v)", w, idleAfter)
	}
	client.CloseWrite()
	if rest, err := io.ReadAll(peer); err != nil || len(rest) != 0 {
		t.Fatalf("after the client's half-close read %q, %v; want EOF", rest, err)
	}
	if r := <-results; r.Err != nil || r.AToB != 11 || p.Err() != nil {
		t.Fatalf("pump ended with %d, %v (%v); want 11, nil", r.AToB, r.Err, p.Err())
	}
}

// TestPumpStop: a parked pump whose connection is closed ends with an
// error, and its socket leaves the epoll set first.
func TestPumpStop(t *testing.T) {
	pk := mustParker(t)
	base := runtime.NumGoroutine()
	client, peer, p, results := startPump(t, pk)
	roundTrip(t, client, peer, "x")
	waitParked(t, p, base)
	u := &p.pump
	u.stop()
	p.a.Close()
	select {
	case r := <-results:
		if p.Err() == nil {
			t.Fatalf("stopped pump ended without an error after %d bytes", r.AToB)
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
