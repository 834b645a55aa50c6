package bpf_test

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/amber-mesh/amber/bpf"
	"github.com/amber-mesh/amber/bpf/hostnet"
	"github.com/amber-mesh/amber/test/meshbed"
	"github.com/amber-mesh/amber/test/testbed"

	"github.com/amber-mesh/amber/test/privileged"
)

// The loader child: this test binary re-executed inside a node namespace
// (AMBER_TEST_LOADER=1) loads the datapath, attaches and captures what it
// is told, says "ready" and waits to be killed — as the agent does.
func TestMain(m *testing.M) {
	if os.Getenv("AMBER_TEST_LOADER") == "1" {
		if err := loaderMain(); err != nil {
			fmt.Fprintln(os.Stderr, "loader:", err)
			os.Exit(1)
		}
		select {}
	}
	os.Exit(m.Run())
}

func loaderMain() error {
	if err := hostnet.Ensure(hostnet.Config{}); err != nil {
		return err
	}
	dp, err := bpf.Load(bpf.Config{PinRoot: os.Getenv("AMBER_PIN_ROOT")})
	if err != nil {
		return err
	}
	if err := dp.Attach(0, bpf.RoleNode); err != nil {
		return err
	}
	for _, a := range strings.Fields(os.Getenv("AMBER_ATTACH")) {
		role, idx, _ := strings.Cut(a, ":")
		i, err := strconv.Atoi(idx)
		if err != nil {
			return err
		}
		if err := dp.Attach(i, bpf.Role(role)); err != nil {
			return err
		}
	}
	for _, c := range strings.Fields(os.Getenv("AMBER_CAPTURE")) {
		idx, ips, _ := strings.Cut(c, "=")
		i, err := strconv.Atoi(idx)
		if err != nil {
			return err
		}
		var addrs []netip.Addr
		for _, s := range strings.Split(ips, ",") {
			addrs = append(addrs, netip.MustParseAddr(s))
		}
		if err := dp.Capture(i, addrs); err != nil {
			return err
		}
	}
	fmt.Println("ready")
	return nil
}

// startLoader runs a loader child in n's namespace and waits for "ready".
func startLoader(tb testing.TB, n *testbed.Node, root string, pods []*testbed.Pod, captured []*testbed.Pod) *os.Process {
	tb.Helper()
	attach := []string{fmt.Sprintf("uplink:%d", n.UplinkIndex)}
	for _, p := range pods {
		attach = append(attach, fmt.Sprintf("pod:%d", p.HostIndex))
	}
	var capture []string
	for _, p := range captured {
		capture = append(capture, fmt.Sprintf("%d=%s,%s", p.HostIndex, p.IPv4, p.IPv6))
	}
	cmd := n.Command(context.Background(), os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), "AMBER_TEST_LOADER=1", "AMBER_PIN_ROOT="+root,
		"AMBER_ATTACH="+strings.Join(attach, " "), "AMBER_CAPTURE="+strings.Join(capture, " "))
	cmd.Stderr = os.Stderr
	out, err := cmd.StdoutPipe()
	if err != nil {
		tb.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	line, err := bufio.NewReader(out).ReadString('\n')
	if err != nil || line != "ready\n" {
		tb.Fatalf("loader did not start: %q %v", line, err)
	}
	return cmd.Process
}

// TestPrivilegedSurvivesLoaderKill kills the loading process with SIGKILL
// while captured connections run, then loads again from a new process:
// pinned links and maps keep capturing throughout, the reload replaces the
// programs in place (same links, new programs) and no connection is lost.
func TestPrivilegedSurvivesLoaderKill(t *testing.T) {
	privileged.Require(t)
	n1, n2 := testbed.MustTwoNodes(t)
	a, err := n1.AddPod("a")
	if err != nil {
		t.Fatal(err)
	}
	b, err := n2.AddPod("b")
	if err != nil {
		t.Fatal(err)
	}
	root := fmt.Sprintf("/sys/fs/bpf/amber-test-%d-restart", os.Getpid())
	t.Cleanup(func() {
		n1.Do(func() error {
			return errors.Join(bpf.Uninstall(bpf.Config{PinRoot: root}), hostnet.Remove(hostnet.Config{}))
		})
	})
	loader := startLoader(t, n1, root, []*testbed.Pod{a}, []*testbed.Pod{a})

	nd := &node{&meshbed.Node{Node: n1, Root: root}}
	px := nd.proxy(t, true)
	mustEcho(t, b, 8080)

	// Long-lived connections through the capture.
	const conns = 20
	var live []net.Conn
	for i := 0; i < conns; i++ {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		c, err := a.Dial(ctx, "tcp", netip.AddrPortFrom(b.IPv4, 8080).String())
		cancel()
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		live = append(live, c)
	}
	waitEvents(t, px, conns)
	ping := func(when string) {
		t.Helper()
		for i, c := range live {
			msg := fmt.Sprintf("%s %d", when, i)
			c.SetDeadline(time.Now().Add(2 * time.Second))
			if _, err := io.WriteString(c, msg); err != nil {
				t.Fatalf("%s: conn %d write: %v", when, i, err)
			}
			buf := make([]byte, len(msg))
			if _, err := io.ReadFull(c, buf); err != nil || string(buf) != msg {
				t.Fatalf("%s: conn %d lost: %q %v", when, i, buf, err)
			}
		}
	}
	ping("before kill")
	// The node's sk_lookup, the uplink, the pod veth's ingress and egress.
	const links = 4
	before, err := bpf.Attachments(root)
	if err != nil || len(before) != links {
		t.Fatalf("attachments %v %v", before, err)
	}

	if err := loader.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	loader.Wait()

	ping("after kill")
	if err := roundTrip(context.Background(), a.Dial, netip.AddrPortFrom(b.IPv4, 8080)); err != nil {
		t.Fatalf("new connection after kill: %v", err)
	}
	waitEvents(t, px, conns+1)

	// Reload while the connections keep running.
	stop := make(chan struct{})
	errc := make(chan error, 1)
	go func() {
		defer close(errc)
		for {
			select {
			case <-stop:
				return
			default:
			}
			if err := roundTrip(context.Background(), a.Dial, netip.AddrPortFrom(b.IPv4, 8080)); err != nil {
				errc <- fmt.Errorf("new connection during reload: %w", err)
				return
			}
		}
	}()
	startLoader(t, n1, root, []*testbed.Pod{a}, []*testbed.Pod{a})
	close(stop)
	if err := <-errc; err != nil {
		t.Fatal(err)
	}
	ping("after reload")

	after, err := bpf.Attachments(root)
	if err != nil || len(after) != links {
		t.Fatalf("attachments %v %v", after, err)
	}
	for i := range after {
		if after[i].LinkID != before[i].LinkID {
			t.Errorf("%s %s link %d replaced by %d: the program should be swapped in place", after[i].Role, after[i].Hook, before[i].LinkID, after[i].LinkID)
		}
		if after[i].ProgID == before[i].ProgID {
			t.Errorf("%s %s still runs program %d after reload", after[i].Role, after[i].Hook, after[i].ProgID)
		}
		if !after[i].Live {
			t.Errorf("%s %s link not live", after[i].Role, after[i].Hook)
		}
	}
}
