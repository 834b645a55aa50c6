package accept

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"log/slog"
	"net"
	"os"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/amber-mesh/amber/internal/testutil"
)

type logBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *logBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

// levels returns the level of every line whose message contains msg.
func (l *logBuffer) levels(msg string) []string {
	l.mu.Lock()
	defer l.mu.Unlock()
	var out []string
	for _, line := range strings.Split(l.b.String(), "\n") {
		var m map[string]any
		if json.Unmarshal([]byte(line), &m) == nil && strings.Contains(m["msg"].(string), msg) {
			out = append(out, m["level"].(string))
		}
	}
	return out
}

// exhaustDescriptors lowers the process's descriptor limit and fills every
// free descriptor, leaving none; release(n) frees n of them again. The
// limit and the descriptors are restored when the test ends.
func exhaustDescriptors(t *testing.T) (release func(n int)) {
	t.Helper()
	var old syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &old); err != nil {
		t.Fatal(err)
	}
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	// Room for what is open now plus some: the fillers take the rest.
	lim := old
	lim.Cur = uint64(len(ents) + 64)
	if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		t.Fatal(err)
	}
	var fillers []*os.File
	t.Cleanup(func() {
		for _, f := range fillers {
			f.Close()
		}
		if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &old); err != nil {
			t.Error(err)
		}
	})
	for {
		f, err := os.Open(os.DevNull)
		if errors.Is(err, syscall.EMFILE) {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		fillers = append(fillers, f)
	}
	return func(n int) {
		for range n {
			fillers[len(fillers)-1].Close()
			fillers = fillers[:len(fillers)-1]
		}
	}
}

// TestServeOutOfDescriptors runs out of file descriptors while a client
// waits in the accept queue: the loop keeps running, counts EMFILE, logs
// one warning for the whole burst, and accepts the client as soon as a
// descriptor is free.
func TestServeOutOfDescriptors(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	var logs logBuffer
	stats := new(Stats)
	accepted := make(chan net.Conn, 1)
	served := make(chan error, 1)
	go func() {
		served <- Serve(context.Background(), ln, Options{
			Name: "test", Stats: stats, Logger: slog.New(slog.NewJSONHandler(&logs, nil)),
		}, func(c net.Conn) { accepted <- c })
	}()

	release := exhaustDescriptors(t)
	release(1) // one for the client's own socket
	client, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()
	// Several failed accepts, one burst.
	testutil.Eventually(t, "accepts failing with EMFILE", func() bool { return stats.Counts()["EMFILE"] >= 4 })
	select {
	case err := <-served:
		t.Fatalf("Serve returned %v while out of descriptors", err)
	case c := <-accepted:
		t.Fatalf("accepted %v without a descriptor", c.RemoteAddr())
	default:
	}
	release(1)
	var c net.Conn
	select {
	case c = <-accepted:
	case <-time.After(5 * time.Second):
		t.Fatal("client not accepted once a descriptor was free")
	}
	testutil.Eventually(t, "recovery logged", func() bool { return len(logs.levels("accepting connections again")) == 1 })
	// The accepted connection took the free descriptor: the next accept
	// fails again at once (accept4 reserves a descriptor first). That is
	// the same burst, not a new warning.
	n := stats.Counts()["EMFILE"]
	testutil.Eventually(t, "failing again at the limit", func() bool { return stats.Counts()["EMFILE"] > n })
	c.Close()
	if got := logs.levels("accept failed"); len(got) != 1 || got[0] != "WARN" {
		t.Errorf("failure lines logged: %v, want one WARN for the burst", got)
	}
	ln.Close()
	if err := <-served; !errors.Is(err, net.ErrClosed) {
		t.Errorf("Serve after Close = %v, want net.ErrClosed", err)
	}
}

// TestServeCancelledWhileBackingOff: a cancelled context ends the loop
// even when accepting keeps failing.
func TestServeCancelledWhileBackingOff(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	stats := new(Stats)
	ctx, cancel := context.WithCancel(context.Background())
	served := make(chan error, 1)
	go func() {
		served <- Serve(ctx, ln, Options{Stats: stats}, func(c net.Conn) { c.Close() })
	}()
	release := exhaustDescriptors(t)
	release(1)
	client, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()
	testutil.Eventually(t, "accepts failing", func() bool { return stats.Counts()["EMFILE"] >= 1 })
	cancel()
	select {
	case err := <-served:
		if !errors.Is(err, context.Canceled) {
			t.Errorf("Serve = %v, want context.Canceled", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Serve did not return after cancel")
	}
}
