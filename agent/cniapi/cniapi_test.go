package cniapi

import (
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/amber-mesh/amber/internal/tcptest"
)

type handler struct {
	got *AddRequest
	err error
}

func (h *handler) Add(_ context.Context, req *AddRequest) (*AddResponse, error) {
	h.got = req
	if h.err != nil {
		return nil, h.err
	}
	return &AddResponse{Captured: true, Reason: "NamespaceLabel", Veth: "veth1"}, nil
}

func (h *handler) Del(_ context.Context, req *DelRequest) error { return h.err }

func serve(t *testing.T, h Handler) string {
	t.Helper()
	sock := filepath.Join(t.TempDir(), "run", "cni.sock")
	// A stale socket file from a dead agent is replaced.
	os.MkdirAll(filepath.Dir(sock), 0o700)
	os.WriteFile(sock, nil, 0o600)
	ln, err := Listen(sock)
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: Handle(h)}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
	if st, err := os.Stat(sock); err != nil || st.Mode().Perm() != 0o600 {
		t.Fatalf("socket mode %v %v", st.Mode(), err)
	}
	return sock
}

func TestAddDel(t *testing.T) {
	h := &handler{}
	c := &Client{Socket: serve(t, h)}
	ctx := context.Background()
	req := &AddRequest{ContainerID: "c1", NetNS: "/run/netns/x", IfName: "eth0", PodNamespace: "app", PodName: "web", PodUID: "u1",
		IPs: []netip.Addr{netip.MustParseAddr("10.0.0.1"), netip.MustParseAddr("fd00::1")}}
	resp, err := c.Add(ctx, req)
	if err != nil || !resp.Captured || resp.Veth != "veth1" {
		t.Fatalf("Add = %+v %v", resp, err)
	}
	if h.got.PodUID != "u1" || len(h.got.IPs) != 2 || h.got.IPs[1] != req.IPs[1] {
		t.Fatalf("agent got %+v", h.got)
	}
	if err := c.Del(ctx, &DelRequest{ContainerID: "c1", PodNamespace: "app", PodName: "web"}); err != nil {
		t.Fatal(err)
	}

	h.err = errors.New("map full")
	_, err = c.Add(ctx, req)
	if err == nil || errors.Is(err, ErrUnreachable) || !strings.Contains(err.Error(), "map full") {
		t.Fatalf("agent refusal: %v", err)
	}
	if _, err := c.Add(ctx, &AddRequest{PodName: "x"}); err == nil || errors.Is(err, ErrUnreachable) {
		t.Fatalf("bad request: %v", err)
	}
}

func TestUnreachable(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	c := &Client{Socket: filepath.Join(dir, "missing.sock")}
	if _, err := c.Add(ctx, &AddRequest{PodNamespace: "a", PodName: "b"}); !errors.Is(err, ErrUnreachable) {
		t.Fatalf("missing socket: %v", err)
	}
	// A socket file nobody listens on (agent killed).
	sock := filepath.Join(dir, "dead.sock")
	ln, err := Listen(sock)
	if err != nil {
		t.Fatal(err)
	}
	ln.(interface{ SetUnlinkOnClose(bool) }).SetUnlinkOnClose(false)
	ln.Close()
	if _, err := (&Client{Socket: sock}).Add(ctx, &AddRequest{PodNamespace: "a", PodName: "b"}); !errors.Is(err, ErrUnreachable) {
		t.Fatalf("dead socket: %v", err)
	}
	// An agent that accepts but never answers is not "unreachable": the
	// plugin must not fall back and start the pod.
	hang := filepath.Join(dir, "hang.sock")
	hl, err := Listen(hang)
	if err != nil {
		t.Fatal(err)
	}
	tcptest.Serve(t, hl, func(c net.Conn) { io.Copy(io.Discard, c) })
	tctx, cancel := context.WithTimeout(ctx, 200*time.Millisecond)
	defer cancel()
	if _, err := (&Client{Socket: hang}).Add(tctx, &AddRequest{PodNamespace: "a", PodName: "b"}); err == nil || errors.Is(err, ErrUnreachable) {
		t.Fatalf("hanging agent: %v", err)
	}
}

func TestAPIAccessFile(t *testing.T) {
	path := filepath.Join(t.TempDir(), "d", "access.json")
	a := APIAccess{Server: "https://127.0.0.1:6443", CAData: []byte("PEM"), Token: "tok", Written: time.Now().UTC().Truncate(time.Second)}
	if err := WriteAPIAccess(path, a); err != nil {
		t.Fatal(err)
	}
	if st, _ := os.Stat(path); st.Mode().Perm() != 0o600 {
		t.Fatalf("mode %v: holds a token", st.Mode())
	}
	got, err := ReadAPIAccess(path)
	if err != nil || got.Server != a.Server || got.Token != "tok" || string(got.CAData) != "PEM" || !got.Written.Equal(a.Written) {
		t.Fatalf("read back %+v %v", got, err)
	}
	os.WriteFile(path, []byte(`{}`), 0o600)
	if _, err := ReadAPIAccess(path); err == nil {
		t.Fatal("file without server accepted")
	}
}
