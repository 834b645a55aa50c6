package testbed_test

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/amber-mesh/amber/internal/testutil"
	"github.com/amber-mesh/amber/test/testbed"
)

// endpoint is what pods and nodes have in common for traffic tests.
type endpoint interface {
	Listen(network, address string) (net.Listener, error)
	Dial(ctx context.Context, network, address string) (net.Conn, error)
}

func mustNode(tb testing.TB, b *testbed.Testbed, name string) *testbed.Node {
	tb.Helper()
	n, err := b.AddNode(name)
	if err != nil {
		tb.Fatal(err)
	}
	return n
}

func mustPod(tb testing.TB, n *testbed.Node, name string) *testbed.Pod {
	tb.Helper()
	p, err := n.AddPod(name)
	if err != nil {
		tb.Fatal(err)
	}
	return p
}

// echo listens on dst inside to, sends a payload from inside from, and
// checks that the same bytes come back and that the server saw wantSrc as
// the peer (nothing on the path NATs).
func echo(t *testing.T, from, to endpoint, dst, wantSrc netip.Addr) {
	t.Helper()
	ln, err := to.Listen("tcp", netip.AddrPortFrom(dst, 0).String())
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	type accepted struct {
		src netip.Addr
		err error
	}
	acc := make(chan accepted, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			acc <- accepted{err: err}
			return
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(5 * time.Second))
		src := c.RemoteAddr().(*net.TCPAddr).AddrPort().Addr().Unmap()
		_, err = io.Copy(c, c)
		acc <- accepted{src: src, err: err}
	}()

	ctx, cancel := context.WithTimeout(t.Context(), 5*time.Second)
	defer cancel()
	c, err := from.Dial(ctx, "tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	payload := make([]byte, 256<<10)
	for i := range payload {
		payload[i] = byte(rand.Uint32())
	}
	werr := make(chan error, 1)
	go func() {
		_, err := c.Write(payload)
		if err == nil {
			err = c.(*net.TCPConn).CloseWrite()
		}
		werr <- err
	}()
	got, rerr := io.ReadAll(c)
	if err := <-werr; err != nil {
		t.Fatalf("write: %v", err)
	}
	if rerr != nil {
		t.Fatalf("read: %v", rerr)
	}
	if !bytes.Equal(got, payload) {
		t.Fatalf("echoed %d bytes, want the %d sent", len(got), len(payload))
	}
	a := <-acc
	if a.err != nil {
		t.Fatalf("server: %v", a.err)
	}
	if a.src != wantSrc {
		t.Errorf("server saw peer %v, want %v", a.src, wantSrc)
	}
}

func TestPrivilegedTraffic(t *testing.T) {
	b := testbed.New(t)
	n1, n2 := mustNode(t, b, "node1"), mustNode(t, b, "node2")
	a, a2 := mustPod(t, n1, "a"), mustPod(t, n1, "a2")
	c, c2 := mustPod(t, n2, "c"), mustPod(t, n2, "c2")

	tests := []struct {
		name     string
		from, to endpoint
		src, dst [2]netip.Addr // IPv4, IPv6
	}{
		{"pod to pod same node", a, a2, podAddrs(a), podAddrs(a2)},
		{"pod to pod across nodes", a, c, podAddrs(a), podAddrs(c)},
		{"pod to pod across nodes reverse", c2, a2, podAddrs(c2), podAddrs(a2)},
		{"pod to own node uplink", a, n1, podAddrs(a), nodeAddrs(n1)},
		{"pod to other node uplink", a, n2, podAddrs(a), nodeAddrs(n2)},
		{"node to own pod", n1, a, nodeAddrs(n1), podAddrs(a)},
		{"node to node", n1, n2, nodeAddrs(n1), nodeAddrs(n2)},
	}
	for _, tt := range tests {
		for i, family := range []string{"ipv4", "ipv6"} {
			t.Run(tt.name+"/"+family, func(t *testing.T) {
				echo(t, tt.from, tt.to, tt.dst[i], tt.src[i])
			})
		}
	}

	// Nothing static resolved the pod's gateways: proxy ARP answered for
	// 169.254.1.1 and NDP for fe80::1, both with the host veth's MAC.
	t.Run("gateway neighbours", func(t *testing.T) {
		var hostMAC net.HardwareAddr
		err := n1.Do(func() error {
			l, err := netlink.LinkByName(a.HostVeth)
			if err == nil {
				hostMAC = l.Attrs().HardwareAddr
			}
			return err
		})
		if err != nil {
			t.Fatal(err)
		}
		err = a.Do(func() error {
			eth, err := netlink.LinkByName("eth0")
			if err != nil {
				return err
			}
			neighs, err := netlink.NeighList(eth.Attrs().Index, netlink.FAMILY_ALL)
			if err != nil {
				return err
			}
			for _, gw := range []string{"169.254.1.1", "fe80::1"} {
				i := slices.IndexFunc(neighs, func(n netlink.Neigh) bool { return n.IP.String() == gw })
				switch {
				case i < 0:
					return fmt.Errorf("no neighbour entry for %s in %v", gw, neighs)
				case neighs[i].State&netlink.NUD_PERMANENT != 0:
					return fmt.Errorf("%s is a static entry", gw)
				case !bytes.Equal(neighs[i].HardwareAddr, hostMAC):
					return fmt.Errorf("%s resolved to %v, want host veth %v", gw, neighs[i].HardwareAddr, hostMAC)
				}
			}
			return nil
		})
		if err != nil {
			t.Error(err)
		}
	})
}

func podAddrs(p *testbed.Pod) [2]netip.Addr   { return [2]netip.Addr{p.IPv4, p.IPv6} }
func nodeAddrs(n *testbed.Node) [2]netip.Addr { return [2]netip.Addr{n.IPv4, n.IPv6} }

func TestPrivilegedTopology(t *testing.T) {
	b := testbed.New(t)
	n1, n2 := mustNode(t, b, "node1"), mustNode(t, b, "node2")
	p := mustPod(t, n2, "p")

	if n2.IPv4.String() != "198.18.0.2" || n2.IPv6.String() != "2001:db8:ff::2" {
		t.Errorf("node2 addresses %v %v", n2.IPv4, n2.IPv6)
	}
	if p.IPv4.String() != "198.19.2.1" || p.IPv6.String() != "2001:db8:2::1" {
		t.Errorf("pod addresses %v %v", p.IPv4, p.IPv6)
	}
	if !strings.HasPrefix(p.HostVeth, "veth") || len(p.HostVeth) > 15 {
		t.Errorf("host veth name %q", p.HostVeth)
	}
	prefix := fmt.Sprintf("amb-%d-", os.Getpid())
	for _, ns := range []string{b.FabricNS, n1.NS, n2.NS, p.NS} {
		if !strings.HasPrefix(ns, prefix) {
			t.Errorf("namespace %q does not start with %q", ns, prefix)
		}
		if _, err := os.Stat(filepath.Join("/run/netns", ns)); err != nil {
			t.Error(err)
		}
	}
	if _, err := b.AddNode("node1"); !errors.Is(err, testbed.ErrExists) {
		t.Errorf("duplicate node: %v, want ErrExists", err)
	}
	if _, err := n2.AddPod("p"); !errors.Is(err, testbed.ErrExists) {
		t.Errorf("duplicate pod: %v, want ErrExists", err)
	}

	sysctls := func(do func(func() error) error, want map[string]string) {
		t.Helper()
		err := do(func() error {
			for key, v := range want {
				got, err := os.ReadFile("/proc/sys/net/" + key)
				if err != nil {
					return err
				}
				if strings.TrimSpace(string(got)) != v {
					return fmt.Errorf("%s = %s, want %s", key, strings.TrimSpace(string(got)), v)
				}
			}
			lo, err := net.InterfaceByName("lo")
			if err != nil {
				return err
			}
			if lo.Flags&net.FlagUp == 0 {
				return errors.New("lo is down")
			}
			return nil
		})
		if err != nil {
			t.Error(err)
		}
	}
	sysctls(n2.Do, map[string]string{
		"ipv4/ip_forward":                           "1",
		"ipv6/conf/all/forwarding":                  "1",
		"ipv6/conf/all/accept_dad":                  "0",
		"ipv6/conf/default/accept_dad":              "0",
		"ipv6/conf/eth0/accept_dad":                 "0",
		"ipv6/conf/" + p.HostVeth + "/accept_dad":   "0",
		"ipv4/conf/" + p.HostVeth + "/proxy_arp":    "1",
		"ipv4/neigh/" + p.HostVeth + "/proxy_delay": "0",
	})
	sysctls(p.Do, map[string]string{
		"ipv6/conf/all/accept_dad":     "0",
		"ipv6/conf/default/accept_dad": "0",
		"ipv6/conf/eth0/accept_dad":    "0",
	})

	err := n2.Do(func() error {
		up, err := net.InterfaceByName("eth0")
		if err != nil {
			return err
		}
		if up.Index != n2.UplinkIndex {
			return fmt.Errorf("eth0 has index %d, Node.UplinkIndex %d", up.Index, n2.UplinkIndex)
		}
		hv, err := net.InterfaceByName(p.HostVeth)
		if err != nil {
			return err
		}
		if hv.Index != p.HostIndex {
			return fmt.Errorf("%s has index %d, Pod.HostIndex %d", p.HostVeth, hv.Index, p.HostIndex)
		}
		return nil
	})
	if err != nil {
		t.Error(err)
	}
}

func TestPrivilegedDo(t *testing.T) {
	b := testbed.New(t)
	n := mustNode(t, b, "node1")
	p := mustPod(t, n, "p")
	want := errors.New("from fn")
	if err := n.Do(func() error { return want }); !errors.Is(err, want) {
		t.Errorf("Do returned %v, want fn's error", err)
	}
	func() {
		defer func() {
			if r := recover(); r != "boom" {
				t.Errorf("recovered %v, want the panic from fn", r)
			}
		}()
		n.Do(func() error { panic("boom") })
	}()
	// Every thread that created a namespace or ran fn went back to where it
	// came from (a thread left behind would also keep the namespace alive
	// after Close).
	for range 20 {
		n.Do(func() error { return nil })
		p.Do(func() error { return nil })
	}
	ours := map[unix.Stat_t]string{}
	for _, ns := range []string{b.FabricNS, n.NS, p.NS} {
		var st unix.Stat_t
		if err := unix.Stat(filepath.Join("/run/netns", ns), &st); err != nil {
			t.Fatal(err)
		}
		ours[unix.Stat_t{Dev: st.Dev, Ino: st.Ino}] = ns
	}
	tasks, err := os.ReadDir("/proc/self/task")
	if err != nil {
		t.Fatal(err)
	}
	for _, task := range tasks {
		var st unix.Stat_t
		if unix.Stat("/proc/self/task/"+task.Name()+"/ns/net", &st) != nil {
			continue
		}
		if ns, ok := ours[unix.Stat_t{Dev: st.Dev, Ino: st.Ino}]; ok {
			t.Errorf("thread %s left in namespace %s", task.Name(), ns)
		}
	}
	if _, err := n.Dial(t.Context(), "tcp", "localhost:80"); err == nil {
		t.Error("Dial accepted a host name")
	}
}

func TestPrivilegedCommand(t *testing.T) {
	b := testbed.New(t)
	p := mustPod(t, mustNode(t, b, "node1"), "p")
	out, err := p.Command(t.Context(), "ip", "-o", "addr", "show", "dev", "eth0").CombinedOutput()
	if err != nil {
		t.Fatalf("%v: %s", err, out)
	}
	for _, a := range []netip.Addr{p.IPv4, p.IPv6} {
		if !strings.Contains(string(out), a.String()+"/") {
			t.Errorf("pod eth0 lacks %v:\n%s", a, out)
		}
	}
	// nsenter --net keeps our mount namespace, so pinned BPF objects stay
	// visible (ip netns exec would remount /sys).
	var fs unix.Statfs_t
	if unix.Statfs("/sys/fs/bpf", &fs) == nil && fs.Type == unix.BPF_FS_MAGIC {
		out, err := p.Command(t.Context(), "stat", "-f", "-c", "%t", "/sys/fs/bpf").CombinedOutput()
		if err != nil || strings.TrimSpace(string(out)) != "cafe4a11" {
			t.Errorf("/sys/fs/bpf inside the pod: %v %s", err, out)
		}
	}
}

// start starts cmd and returns a channel that receives Wait's result; the
// test's cleanup kills the process (if still running) and reaps it.
func start(t *testing.T, cmd *exec.Cmd) <-chan error {
	t.Helper()
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	ch := make(chan error, 1)
	done := make(chan struct{})
	go func() {
		ch <- cmd.Wait()
		close(done)
	}()
	t.Cleanup(func() {
		cmd.Process.Kill()
		<-done
	})
	return ch
}

func routeTo(tb testing.TB, n *testbed.Node, a netip.Addr) bool {
	tb.Helper()
	var found bool
	err := n.Do(func() error {
		routes, err := netlink.RouteList(nil, netlink.FAMILY_ALL)
		for _, r := range routes {
			if r.Dst != nil && r.Dst.String() == netip.PrefixFrom(a, a.BitLen()).String() {
				found = true
			}
		}
		return err
	})
	if err != nil {
		tb.Fatal(err)
	}
	return found
}

func TestPrivilegedPodDelete(t *testing.T) {
	b := testbed.New(t)
	n1, n2 := mustNode(t, b, "node1"), mustNode(t, b, "node2")
	p := mustPod(t, n1, "p")
	c := mustPod(t, n2, "c")
	echo(t, c, p, p.IPv4, c.IPv4)

	waited := start(t, p.Command(context.Background(), "sleep", "60"))

	for _, a := range []netip.Addr{p.IPv4, p.IPv6} {
		if !routeTo(t, n1, a) {
			t.Fatalf("node has no route to %v before Delete", a)
		}
	}
	if err := p.Delete(); err != nil {
		t.Fatal(err)
	}
	for _, a := range []netip.Addr{p.IPv4, p.IPv6} {
		if routeTo(t, n1, a) {
			t.Errorf("node still routes %v after Delete", a)
		}
	}
	err := n1.Do(func() error {
		_, err := netlink.LinkByName(p.HostVeth)
		return err
	})
	if !errors.As(err, &netlink.LinkNotFoundError{}) {
		t.Errorf("host veth after Delete: %v, want not found", err)
	}
	if _, err := os.Stat(filepath.Join("/run/netns", p.NS)); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("pod namespace after Delete: %v", err)
	}
	select {
	case <-waited:
	case <-time.After(5 * time.Second):
		t.Error("process in the pod survived Delete")
	}
	if err := p.Delete(); err != nil {
		t.Errorf("second Delete: %v", err)
	}
	if _, err := p.Listen("tcp", ":0"); !errors.Is(err, testbed.ErrClosed) {
		t.Errorf("Listen on a deleted pod: %v, want ErrClosed", err)
	}
	ctx, cancel := context.WithTimeout(t.Context(), 300*time.Millisecond)
	defer cancel()
	if conn, err := c.Dial(ctx, "tcp", netip.AddrPortFrom(p.IPv4, 80).String()); err == nil {
		conn.Close()
		t.Error("dial to a deleted pod's address succeeded")
	}

	// The name is free again, the address is not reused at once.
	q := mustPod(t, n1, "p")
	if q.IPv4 == p.IPv4 {
		t.Errorf("new pod reused %v", p.IPv4)
	}
	echo(t, c, q, q.IPv6, c.IPv6)
}

// hostLinks lists the links of the test's own network namespace.
func hostLinks(tb testing.TB) map[string]bool {
	tb.Helper()
	links, err := netlink.LinkList()
	if err != nil {
		tb.Fatal(err)
	}
	m := map[string]bool{}
	for _, l := range links {
		m[l.Attrs().Name] = true
	}
	return m
}

func TestPrivilegedClose(t *testing.T) {
	testbed.New(t) // root check and stale sweep; an empty bed
	before := hostLinks(t)

	b, err := testbed.NewBed(t.Name())
	if err != nil {
		t.Fatal(err)
	}
	closed := false
	t.Cleanup(func() {
		if !closed {
			b.Close()
		}
	})
	n1, n2 := mustNode(t, b, "node1"), mustNode(t, b, "node2")
	p1, p2 := mustPod(t, n1, "p1"), mustPod(t, n2, "p2")
	names := []string{b.FabricNS, n1.NS, n2.NS, p1.NS, p2.NS}
	ours := []string{p1.HostVeth, p2.HostVeth, "node1", "node2"}

	var waits []<-chan error
	for _, cmd := range []*exec.Cmd{
		n1.Command(context.Background(), "sleep", "60"),
		p2.Command(context.Background(), "sleep", "60"),
	} {
		waits = append(waits, start(t, cmd))
	}

	during := hostLinks(t)
	for _, name := range ours {
		if during[name] && !before[name] {
			t.Errorf("link %s appeared in the caller's namespace", name)
		}
	}

	if err := b.Close(); err != nil {
		t.Fatal(err)
	}
	closed = true
	for _, ns := range names {
		if _, err := os.Stat(filepath.Join("/run/netns", ns)); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("namespace %s after Close: %v", ns, err)
		}
	}
	for i, ch := range waits {
		select {
		case err := <-ch:
			if err == nil {
				t.Errorf("process %d exited cleanly, want killed", i)
			}
		case <-time.After(5 * time.Second):
			t.Errorf("process %d survived Close", i)
		}
	}
	after := hostLinks(t)
	for name := range after {
		if !before[name] && slices.Contains(ours, name) {
			t.Errorf("link %s left in the caller's namespace", name)
		}
	}
	if err := b.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}
	if _, err := b.AddNode("node3"); !errors.Is(err, testbed.ErrClosed) {
		t.Errorf("AddNode after Close: %v, want ErrClosed", err)
	}
	if err := n1.Do(func() error { return nil }); !errors.Is(err, testbed.ErrClosed) {
		t.Errorf("Do after Close: %v, want ErrClosed", err)
	}
}

const helperEnv = "AMBER_TESTBED_HELPER"

// TestHelperProcess is run by TestPrivilegedCleanupOnFailure in a child
// process: it builds a bed, starts a process in a pod, then dies in the
// way the parent asks.
func TestHelperProcess(t *testing.T) {
	mode := os.Getenv(helperEnv)
	if mode == "" {
		return // not a skip: CI=true fails on any (hack/go-test.sh)
	}
	b := testbed.New(t)
	n := mustNode(t, b, "node1")
	p := mustPod(t, n, "p")
	sleep := p.Command(context.Background(), "sleep", "60")
	if err := sleep.Start(); err != nil {
		t.Fatal(err)
	}
	fmt.Printf("NS %s\nNS %s\nNS %s\nPID %d\n", b.FabricNS, n.NS, p.NS, sleep.Process.Pid)
	switch mode {
	case "panic":
		panic("helper panics mid-test")
	case "fatal":
		t.Fatal("helper fails mid-test")
	case "kill":
		unix.Kill(os.Getpid(), unix.SIGKILL)
		select {}
	}
}

func TestPrivilegedCleanupOnFailure(t *testing.T) {
	testbed.New(t) // root check
	for _, mode := range []string{"panic", "fatal", "kill"} {
		t.Run(mode, func(t *testing.T) {
			cmd := exec.CommandContext(t.Context(), os.Args[0], "-test.run=^TestHelperProcess$", "-test.count=1")
			cmd.Env = append(os.Environ(), helperEnv+"="+mode)
			out, err := cmd.CombinedOutput()
			if err == nil {
				t.Fatalf("helper succeeded, want it to fail:\n%s", out)
			}
			var names []string
			var pid int
			sc := bufio.NewScanner(bytes.NewReader(out))
			for sc.Scan() {
				if ns, ok := strings.CutPrefix(sc.Text(), "NS "); ok {
					names = append(names, ns)
				}
				if s, ok := strings.CutPrefix(sc.Text(), "PID "); ok {
					pid, _ = strconv.Atoi(s)
				}
			}
			if len(names) != 3 || pid == 0 {
				t.Fatalf("helper did not report its namespaces:\n%s", out)
			}
			if mode == "kill" {
				// Nothing ran its cleanup; the next bed sweeps the remains.
				for _, ns := range names {
					if _, err := os.Stat(filepath.Join("/run/netns", ns)); err != nil {
						t.Fatalf("crashed run's namespace %s already gone: %v", ns, err)
					}
				}
				testbed.New(t)
			}
			for _, ns := range names {
				if _, err := os.Stat(filepath.Join("/run/netns", ns)); !errors.Is(err, os.ErrNotExist) {
					t.Errorf("namespace %s left behind: %v", ns, err)
				}
			}
			waitGone(t, pid)
		})
	}
}

// waitGone waits until pid has exited; a zombie waiting for its new parent
// to reap it counts as gone.
func waitGone(t *testing.T, pid int) {
	t.Helper()
	testutil.Eventually(t, fmt.Sprintf("process %d started in the pod gone", pid), func() bool {
		stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
		if err != nil {
			return true
		}
		i := bytes.LastIndexByte(stat, ')')
		return i > 0 && len(stat) > i+2 && stat[i+2] == 'Z'
	})
}

func TestPrivilegedParallelBeds(t *testing.T) {
	var mu sync.Mutex
	seen := map[string]bool{}
	for i := range 3 {
		t.Run(strconv.Itoa(i), func(t *testing.T) {
			t.Parallel()
			b := testbed.New(t)
			n1, n2 := mustNode(t, b, "node1"), mustNode(t, b, "node2")
			p1, p2 := mustPod(t, n1, "p"), mustPod(t, n2, "p")
			mu.Lock()
			for _, ns := range []string{b.FabricNS, n1.NS, n2.NS, p1.NS, p2.NS} {
				if seen[ns] {
					t.Errorf("namespace name %s used twice", ns)
				}
				seen[ns] = true
			}
			mu.Unlock()
			echo(t, p1, p2, p2.IPv4, p1.IPv4)
			echo(t, p2, p1, p1.IPv6, p2.IPv6)
		})
	}
}
