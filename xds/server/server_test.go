package server_test

import (
	"context"
	"errors"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"testing/synctest"
	"time"

	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/test/bufconn"

	"github.com/amber-mesh/amber/internal/testutil"
	"github.com/amber-mesh/amber/xds/client"
	"github.com/amber-mesh/amber/xds/server"
	"github.com/amber-mesh/amber/xds/state"
	"github.com/amber-mesh/amber/xds/workloadapi"
)

const waitTimeout = 10 * time.Second

// serveBuf serves srv on an in-memory listener until the test ends and
// returns a connection to it.
func serveBuf(t *testing.T, srv *server.Server) *grpc.ClientConn {
	t.Helper()
	lis := bufconn.Listen(1 << 20)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- srv.Serve(ctx, lis) }()
	conn, err := grpc.NewClient("passthrough:///bufnet",
		grpc.WithContextDialer(func(ctx context.Context, _ string) (net.Conn, error) { return lis.DialContext(ctx) }),
		grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		conn.Close()
		cancel()
		if err := <-done; !errors.Is(err, context.Canceled) && !errors.Is(err, server.ErrClosed) {
			t.Errorf("Serve: %v", err)
		}
	})
	return conn
}

func writeFile(t *testing.T, path, content string) {
	t.Helper()
	// Write and rename, as editors and config management do.
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, path); err != nil {
		t.Fatal(err)
	}
}

func runClient(t *testing.T, conn grpc.ClientConnInterface) *client.Client {
	t.Helper()
	c, err := client.New(client.Config{Conn: conn, InitialBackoff: 10 * time.Millisecond, MaxBackoff: 50 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- c.Run(context.Background()) }()
	t.Cleanup(func() {
		c.Close()
		<-done
	})
	select {
	case <-c.Synced():
	case <-time.After(waitTimeout):
		t.Fatal("client never synced")
	}
	return c
}

func addr(s string) state.NetworkAddr { return state.NetworkAddr{Addr: netip.MustParseAddr(s)} }

// TestFileReload edits the mesh file under a connected client: valid edits
// reach it, a broken edit is refused and the last good state stays served.
func TestFileReload(t *testing.T) {
	srv, path, logs := newFileServer(t, 5*time.Millisecond)
	t.Cleanup(func() { srv.Close() })
	c := runClient(t, serveBuf(t, srv))
	if c.Store().Load().WorkloadByAddr(addr("10.0.0.1")) == nil {
		t.Fatal("initial file not served")
	}

	writeFile(t, path, "workloads: [{name: a, addresses: [10.0.0.2]}, {name: b, addresses: [10.0.0.3]}]\n")
	testutil.Eventually(t, "the edit", func() bool {
		s := c.Store().Load()
		return s.WorkloadByAddr(addr("10.0.0.2")) != nil && s.WorkloadByAddr(addr("10.0.0.3")) != nil
	})

	writeFile(t, path, "workloads: [{name: a, adresses: [10.0.0.9]}]\n")
	if err := srv.Reload(); err == nil || !strings.Contains(err.Error(), `unknown field "adresses"`) {
		t.Errorf("Reload of a broken file: %v", err)
	}
	// Reload's error is not logged; the watcher's refusal of the same
	// file is.
	testutil.Eventually(t, "the watcher refusing the broken edit", func() bool { return logs.count(reloadFailed) > 0 })
	s := c.Store().Load()
	if s.WorkloadByAddr(addr("10.0.0.2")) == nil || s.WorkloadByAddr(addr("10.0.0.3")) == nil {
		t.Error("broken edit changed the served state")
	}

	writeFile(t, path, "workloads: [{name: b, addresses: [10.0.0.3]}]\n")
	testutil.Eventually(t, "the fix", func() bool { return c.Store().Load().Workload("Kubernetes//Pod/default/a") == nil })
}

// TestCloseStopsServe: Close alone (no context cancel) makes Serve return,
// file watcher included. In a synctest bubble: the watcher polls in fake
// time.
func TestCloseStopsServe(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		srv, path, logs := newFileServer(t, 5*time.Millisecond)
		done := make(chan error, 1)
		go func() { done <- srv.Serve(context.Background(), bufconn.Listen(1<<10)) }()
		writeFile(t, path, "workloads: [{name: a, addresses: [10.0.0.1, 10.0.0.2]}]\n")
		time.Sleep(5 * time.Millisecond)
		synctest.Wait()
		if n := logs.count(loaded); n != 2 {
			srv.Close()
			<-done
			t.Fatalf("%q logged %d times, want 2: New's load and the watcher's", loaded, n)
		}
		if err := srv.Close(); err != nil {
			t.Fatal(err)
		}
		if err := <-done; !errors.Is(err, server.ErrClosed) {
			t.Errorf("Serve returned %v, want ErrClosed", err)
		}
	})
}

// TestReloadWithoutPolling: with polling off, a served file changes only
// on Reload, however long Serve runs (in fake time, in a synctest bubble).
func TestReloadWithoutPolling(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		srv, path, logs := newFileServer(t, -1)
		done := make(chan error, 1)
		go func() { done <- srv.Serve(context.Background(), bufconn.Listen(1<<10)) }()
		t.Cleanup(func() { srv.Close(); <-done })
		writeFile(t, path, "workloads: [{name: a, addresses: [10.0.0.2]}]\n")
		time.Sleep(time.Minute) // sixty of the default PollInterval
		synctest.Wait()
		if n := logs.count(loaded); n != 1 {
			t.Fatalf("%q logged %d times with polling off, want 1 (New's)", loaded, n)
		}
		if err := srv.Reload(); err != nil {
			t.Fatal(err)
		}
		if n := logs.count(loaded); n != 2 {
			t.Fatalf("%q logged %d times after Reload, want 2", loaded, n)
		}
	})
}

// newFileServer returns a server of a new mesh file, with workload a at
// 10.0.0.1, polled every poll, and the counter of its log.
func newFileServer(t *testing.T, poll time.Duration) (*server.Server, string, *logCounter) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "mesh.yaml")
	writeFile(t, path, "workloads: [{name: a, addresses: [10.0.0.1]}]\n")
	logs := new(logCounter)
	srv, err := server.New(server.Config{File: path, PollInterval: poll, Logger: slog.New(logs)})
	if err != nil {
		t.Fatal(err)
	}
	return srv, path, logs
}

// The server's log messages the tests wait for.
const (
	loaded       = "mesh file loaded"
	reloadFailed = "mesh file reload failed, keeping previous state"
)

// logCounter is a slog.Handler that counts records by message.
type logCounter struct {
	mu sync.Mutex // guards n
	n  map[string]int
}

func (l *logCounter) Enabled(context.Context, slog.Level) bool { return true }
func (l *logCounter) WithAttrs([]slog.Attr) slog.Handler       { return l }
func (l *logCounter) WithGroup(string) slog.Handler            { return l }

func (l *logCounter) Handle(_ context.Context, r slog.Record) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.n == nil {
		l.n = map[string]int{}
	}
	l.n[r.Message]++
	return nil
}

func (l *logCounter) count(msg string) int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.n[msg]
}

func TestNewRejectsBadFile(t *testing.T) {
	path := filepath.Join(t.TempDir(), "mesh.yaml")
	writeFile(t, path, "workloads: [{name: a}]\n")
	if _, err := server.New(server.Config{File: path}); err == nil || !strings.Contains(err.Error(), "needs addresses") {
		t.Errorf("New with a bad file: %v", err)
	}
	if _, err := server.New(server.Config{File: filepath.Join(t.TempDir(), "missing.yaml")}); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("New with a missing file: %v", err)
	}
}

type deltaStream = grpc.BidiStreamingClient[discoveryv3.DeltaDiscoveryRequest, discoveryv3.DeltaDiscoveryResponse]

func recv(t *testing.T, st deltaStream) *discoveryv3.DeltaDiscoveryResponse {
	t.Helper()
	resp, err := st.Recv()
	if err != nil {
		t.Fatal(err)
	}
	return resp
}

func names(resp *discoveryv3.DeltaDiscoveryResponse) []string {
	var out []string
	for _, r := range resp.GetResources() {
		out = append(out, r.GetName())
	}
	return out
}

// TestDeltaProtocol drives the server with raw protocol messages, the way
// a client other than ours (Istio's ztunnel) would.
func TestDeltaProtocol(t *testing.T) {
	srv, err := server.New(server.Config{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { srv.Close() })
	r, err := server.ParseMesh([]byte("workloads: [{name: a, addresses: [10.0.0.1]}, {name: b, addresses: [10.0.0.2]}]"))
	if err != nil {
		t.Fatal(err)
	}
	if err := srv.Replace(r); err != nil {
		t.Fatal(err)
	}
	conn := serveBuf(t, srv)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	ads := discoveryv3.NewAggregatedDiscoveryServiceClient(conn)

	// Wildcard subscription: everything, sorted by name.
	st, err := ads.DeltaAggregatedResources(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := st.Send(&discoveryv3.DeltaDiscoveryRequest{TypeUrl: workloadapi.AddressTypeURL}); err != nil {
		t.Fatal(err)
	}
	first := recv(t, st)
	if got := names(first); !slices.Equal(got, []string{"Kubernetes//Pod/default/a", "Kubernetes//Pod/default/b"}) {
		t.Fatalf("initial resources = %v", got)
	}
	versionA := first.GetResources()[0].GetVersion()
	if err := st.Send(&discoveryv3.DeltaDiscoveryRequest{TypeUrl: workloadapi.AddressTypeURL, ResponseNonce: first.GetNonce()}); err != nil {
		t.Fatal(err)
	}
	srv.Delete(workloadapi.AddressTypeURL, "Kubernetes//Pod/default/b")
	second := recv(t, st)
	if len(second.GetResources()) != 0 || !slices.Equal(second.GetRemovedResources(), []string{"Kubernetes//Pod/default/b"}) || second.GetNonce() == first.GetNonce() {
		t.Errorf("delete push = %v", second)
	}
	cancel()

	// A reconnecting client announces what it holds: an unchanged resource
	// is not resent, a stale one is removed.
	ctx, cancel = context.WithCancel(context.Background())
	defer cancel()
	st, err = ads.DeltaAggregatedResources(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := st.Send(&discoveryv3.DeltaDiscoveryRequest{
		TypeUrl: workloadapi.AddressTypeURL,
		InitialResourceVersions: map[string]string{
			"Kubernetes//Pod/default/a": versionA,
			"Kubernetes//Pod/default/z": "old",
		},
	}); err != nil {
		t.Fatal(err)
	}
	resp := recv(t, st)
	if len(resp.GetResources()) != 0 || !slices.Equal(resp.GetRemovedResources(), []string{"Kubernetes//Pod/default/z"}) {
		t.Errorf("reconnect response = %v", resp)
	}
	cancel()

	// Explicit names instead of a wildcard: only those are sent; an empty
	// type is still answered so the client knows it is in sync.
	ctx, cancel = context.WithCancel(context.Background())
	defer cancel()
	st, err = ads.DeltaAggregatedResources(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := st.Send(&discoveryv3.DeltaDiscoveryRequest{TypeUrl: workloadapi.AddressTypeURL, ResourceNamesSubscribe: []string{"Kubernetes//Pod/default/a", "nothing"}}); err != nil {
		t.Fatal(err)
	}
	if got := names(recv(t, st)); !slices.Equal(got, []string{"Kubernetes//Pod/default/a"}) {
		t.Errorf("named subscription got %v", got)
	}
	if err := st.Send(&discoveryv3.DeltaDiscoveryRequest{TypeUrl: workloadapi.AuthorizationTypeURL}); err != nil {
		t.Fatal(err)
	}
	if resp := recv(t, st); resp.GetTypeUrl() != workloadapi.AuthorizationTypeURL || len(resp.GetResources()) != 0 || resp.GetNonce() == "" {
		t.Errorf("empty type response = %v", resp)
	}
}

// TestCloseEndsStreams: a client sees the stream end when the server
// closes, and reconnect attempts fail instead of hanging.
func TestCloseEndsStreams(t *testing.T) {
	srv, err := server.New(server.Config{})
	if err != nil {
		t.Fatal(err)
	}
	conn := serveBuf(t, srv)
	c := runClient(t, conn)
	if !c.Stats().Connected {
		t.Fatal("not connected")
	}
	if err := srv.Close(); err != nil {
		t.Fatal(err)
	}
	testutil.Eventually(t, "disconnect", func() bool { return !c.Stats().Connected && c.Stats().Disconnects > 0 })
	if err := srv.Serve(context.Background(), bufconn.Listen(1)); !errors.Is(err, server.ErrClosed) {
		t.Errorf("Serve after Close: %v", err)
	}
}
