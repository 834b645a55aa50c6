package agent_test

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/amber-mesh/amber/agent/capture"
	"github.com/amber-mesh/amber/agent/enrol"
	"github.com/amber-mesh/amber/test/agentbed"
)

// The real binaries, built once per test binary: the tests run the agent
// as a process (so it can be SIGKILLed) and exec the plugin as a runtime
// does.
var agentBin, cniBin string

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "amber-agent-test-bin-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	if agentBin, cniBin, err = agentbed.Build(dir); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.RemoveAll(dir)
		os.Exit(1)
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// env is agentbed's node with what these tests observe of it: connections
// through the stand-in ztunnel, the quarantine rule, annotations, events.
type env struct {
	*agentbed.Env
	t testing.TB
}

type pod = agentbed.Pod

var ambient = agentbed.Ambient

func newEnv(t *testing.T, opts agentbed.Options) *env {
	opts.AgentBin, opts.CNIBin = agentBin, cniBin
	return &env{Env: agentbed.New(t, opts), t: t}
}

// quarantined reports whether the node has the agent's quarantine rule
// for a (netlink's rule list does not report the action, so the rule is
// recognised by the agent's protocol and priority).
func (e *env) quarantined(a netip.Addr) bool {
	var found bool
	e.N1.Do(func() error {
		fam := netlink.FAMILY_V4
		if a.Is6() {
			fam = netlink.FAMILY_V6
		}
		rules, err := netlink.RuleList(fam)
		for _, r := range rules {
			if err == nil && r.Src != nil && r.Src.IP.Equal(a.AsSlice()) && r.Protocol == 0xa3 && r.Priority == capture.DefaultQuarantinePriority {
				found = true
			}
		}
		return nil
	})
	return found
}

func (e *env) annotated(p *pod) bool {
	api, err := e.Admin.CoreV1().Pods(p.NS).Get(context.Background(), p.Name, metav1.GetOptions{})
	return err == nil && api.Annotations[enrol.RedirectionAnnotation] == enrol.RedirectionEnabled
}

// connect makes one round trip from the pod to the echo server and says
// whether the transparent proxy carried it.
func (e *env) connect(p *pod) (bool, error) {
	before := e.proxied(p)
	if err := roundTrip(context.Background(), p.TB.Dial, e.Echo); err != nil {
		return false, err
	}
	return e.proxied(p) > before, nil
}

func (e *env) proxied(p *pod) int {
	n := 0
	for _, ev := range e.Proxy.Events() {
		if ev.Src.Addr().Unmap() == p.TB.IPv4 {
			n++
		}
	}
	return n
}

// mustCaptured asserts what a user observes of a captured pod.
func (e *env) mustCaptured(p *pod) {
	e.t.Helper()
	if !e.Captured(p) {
		e.t.Fatalf("%s: not in the membership maps", p.Key())
	}
	ok, err := e.connect(p)
	if err != nil || !ok {
		e.t.Fatalf("%s: connection not captured (proxied=%v err=%v)", p.Key(), ok, err)
	}
}

func (e *env) mustDirect(p *pod) {
	e.t.Helper()
	if e.InMaps(p) {
		e.t.Fatalf("%s: still in the membership maps", p.Key())
	}
	e.mustDirectNoMaps(p)
}

// mustDirectNoMaps checks a direct connection only (the maps may be gone).
func (e *env) mustDirectNoMaps(p *pod) {
	e.t.Helper()
	ok, err := e.connect(p)
	if err != nil || ok {
		e.t.Fatalf("%s: want a direct connection (proxied=%v err=%v)", p.Key(), ok, err)
	}
}

func (e *env) events(p *pod, reason string) []corev1.Event {
	evs, err := e.Admin.CoreV1().Events(p.NS).List(context.Background(), metav1.ListOptions{})
	if err != nil {
		e.t.Fatal(err)
	}
	var out []corev1.Event
	for _, ev := range evs.Items {
		if ev.InvolvedObject.UID == p.UID && ev.Reason == reason {
			out = append(out, ev)
		}
	}
	return out
}

func roundTrip(ctx context.Context, dial func(context.Context, string, string) (net.Conn, error), addr netip.AddrPort) error {
	ctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	c, err := dial(ctx, "tcp", addr.String())
	if err != nil {
		return err
	}
	defer c.Close()
	return echoOnce(c, "hello")
}

func echoOnce(c net.Conn, msg string) error {
	c.SetDeadline(time.Now().Add(2 * time.Second))
	if _, err := io.WriteString(c, msg); err != nil {
		return err
	}
	buf := make([]byte, len(msg))
	if _, err := io.ReadFull(c, buf); err != nil {
		return err
	}
	if string(buf) != msg {
		return fmt.Errorf("echo mismatch: %q", buf)
	}
	return nil
}
