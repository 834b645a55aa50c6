// Package meshbed runs amber on testbed nodes the way the node agent and
// the DaemonSet will: the datapath loaded and attached to a node's uplink
// and pod veths, pods captured, and a real amber-ztunnel process in the
// node's namespace, in local mode or against istiod (reached from the node
// through a Forwarder). Tests and benchmarks share it.
package meshbed

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/amber-mesh/amber/bpf"
	"github.com/amber-mesh/amber/bpf/hostnet"
	"github.com/amber-mesh/amber/test/testbed"
)

var rootSeq atomic.Int32

// Node is a testbed node running amber's datapath.
type Node struct {
	*testbed.Node
	// Root is the node's pin root, of its own under /sys/fs/bpf.
	Root string
	// DP is the loaded datapath.
	DP *bpf.Datapath
}

// LoadDatapath loads the datapath into a fresh pin root named after
// prefix and attaches it to n's namespace, its uplink and every pod veth n
// has now.
func LoadDatapath(n *testbed.Node, prefix string) (*Node, error) {
	nd := &Node{Node: n, Root: filepath.Join("/sys/fs/bpf", fmt.Sprintf("%s-%d-n%d", prefix, os.Getpid(), rootSeq.Add(1)))}
	err := n.Do(func() (err error) {
		if err := hostnet.Ensure(hostnet.Config{}); err != nil {
			return err
		}
		if nd.DP, err = bpf.Load(bpf.Config{PinRoot: nd.Root}); err != nil {
			return err
		}
		if err := nd.DP.Attach(0, bpf.RoleNode); err != nil {
			return err
		}
		if err := nd.DP.Attach(n.UplinkIndex, bpf.RoleUplink); err != nil {
			return err
		}
		for _, p := range n.Pods() {
			if err := nd.DP.Attach(p.HostIndex, bpf.RolePod); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		return nil, errors.Join(err, nd.Close())
	}
	return nd, nil
}

// MustLoadDatapath is LoadDatapath for tests: it fails tb on error and
// unloads the datapath when the test ends.
func MustLoadDatapath(tb testing.TB, n *testbed.Node, prefix string) *Node {
	tb.Helper()
	nd, err := LoadDatapath(n, prefix)
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() {
		if err := nd.Close(); err != nil {
			tb.Errorf("unload datapath: %v", err)
		}
	})
	return nd
}

// MustCapture is Capture for tests.
func (nd *Node) MustCapture(tb testing.TB, p *testbed.Pod) {
	tb.Helper()
	if err := nd.Capture(p); err != nil {
		tb.Fatal(err)
	}
}

// Attach runs the pod program on a pod added after LoadDatapath.
func (nd *Node) Attach(p *testbed.Pod) error {
	return nd.Do(func() error { return nd.DP.Attach(p.HostIndex, bpf.RolePod) })
}

// Capture makes p a captured pod.
func (nd *Node) Capture(p *testbed.Pod) error {
	return nd.DP.Capture(p.HostIndex, []netip.Addr{p.IPv4, p.IPv6})
}

// Close unloads the datapath: links, pins and host routing.
func (nd *Node) Close() error {
	var errs []error
	if nd.DP != nil {
		errs = append(errs, nd.DP.Close())
		nd.DP = nil
	}
	errs = append(errs, nd.Do(func() error {
		return errors.Join(bpf.Uninstall(bpf.Config{PinRoot: nd.Root}), hostnet.Remove(hostnet.Config{}))
	}))
	return errors.Join(errs...)
}

// BuildZtunnel builds cmd/amber-ztunnel into dir and returns its path.
func BuildZtunnel(dir string) (string, error) {
	return build(dir, "amber-ztunnel", nil)
}

// build builds cmd/<name> into dir, with env added to the go command's.
func build(dir, name string, env []string) (string, error) {
	bin := filepath.Join(dir, name)
	cmd := exec.Command("go", "build", "-o", bin, "github.com/amber-mesh/amber/cmd/"+name)
	cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
	cmd.Env = append(os.Environ(), env...)
	if err := cmd.Run(); err != nil {
		return "", fmt.Errorf("build %s: %w", name, err)
	}
	return bin, nil
}

// Process is an amber process in a testbed namespace (a node's ztunnel, a
// pod's waypoint) and an HTTP client dialling from that namespace to its
// status ports.
type Process struct {
	Cmd  *exec.Cmd
	HTTP *http.Client

	name   string     // for errors: "ztunnel on n1"
	addr   netip.Addr // where its metrics and readiness ports listen
	exited chan error
}

// StartProcess starts cmd, whose output goes to log, and waits up to
// timeout until it answers /healthz/ready on port 15021 of addr, dialled
// with dial.
func StartProcess(name string, cmd *exec.Cmd, log io.Writer, addr netip.Addr, dial func(ctx context.Context, network, address string) (net.Conn, error), timeout time.Duration) (*Process, error) {
	p := &Process{Cmd: cmd, name: name, addr: addr, exited: make(chan error, 1)}
	cmd.Stdout, cmd.Stderr = log, log
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	go func() { p.exited <- cmd.Wait() }()
	p.HTTP = &http.Client{
		Timeout:   2 * time.Second,
		Transport: &http.Transport{DialContext: dial},
	}
	deadline := time.Now().Add(timeout)
	for {
		code, _, err := p.Get(15021, "/healthz/ready")
		if err == nil && code == http.StatusOK {
			return p, nil
		}
		if done, err := p.Exited(); done {
			return nil, fmt.Errorf("%s exited: %v", name, err)
		}
		if time.Now().After(deadline) {
			p.Stop()
			return nil, fmt.Errorf("%s not ready: %d %v", name, code, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// Exited reports whether the process has ended, and how, without waiting.
func (p *Process) Exited() (bool, error) {
	select {
	case err := <-p.exited:
		p.exited <- err
		return true, err
	default:
		return false, nil
	}
}

// Stop sends SIGTERM and waits up to 10 s, then kills. It returns the
// process's exit error, or an error when it had to be killed.
func (p *Process) Stop() error {
	p.HTTP.CloseIdleConnections()
	if ok, err := p.Exited(); ok {
		return fmt.Errorf("exited early: %v", err)
	}
	p.Cmd.Process.Signal(syscall.SIGTERM)
	select {
	case err := <-p.exited:
		p.exited <- err
		return err
	case <-time.After(10 * time.Second):
		p.Cmd.Process.Kill()
		err := <-p.exited
		p.exited <- err
		return errors.New("did not stop on SIGTERM")
	}
}

// Kill ends the process with SIGKILL, as a crash or the OOM killer would,
// and waits for it.
func (p *Process) Kill() error {
	p.HTTP.CloseIdleConnections()
	if ok, err := p.Exited(); ok {
		return fmt.Errorf("exited early: %v", err)
	}
	p.Cmd.Process.Kill()
	err := <-p.exited
	p.exited <- err
	return nil
}

// Get fetches path from the process's port on its namespace's address.
func (p *Process) Get(port int, path string) (int, string, error) {
	return p.get(fmt.Sprintf("http://%s%s", netip.AddrPortFrom(p.addr, uint16(port)), path))
}

// Admin returns the body of path on the admin port, which listens on
// 127.0.0.1 inside the namespace only.
func (p *Process) Admin(path string) (string, error) {
	code, body, err := p.get("http://127.0.0.1:15000" + path)
	if err == nil && code != http.StatusOK {
		err = fmt.Errorf("%s of %s: status %d: %s", path, p.name, code, body)
	}
	return body, err
}

func (p *Process) get(url string) (int, string, error) {
	resp, err := p.HTTP.Get(url)
	if err != nil {
		return 0, "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b), err
}

// RSS is the process's resident set size in bytes.
func (p *Process) RSS() (int64, error) { return RSS(p.Cmd.Process.Pid) }

// RSS is the resident set size of process pid in bytes (VmRSS).
func RSS(pid int) (int64, error) { return statusBytes(pid, "VmRSS:") }

// PeakRSS is the largest resident set size process pid has had, in bytes
// (VmHWM).
func PeakRSS(pid int) (int64, error) { return statusBytes(pid, "VmHWM:") }

// statusBytes reads a "<key> <n> kB" line of /proc/PID/status.
func statusBytes(pid int, key string) (int64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, err
	}
	for _, line := range strings.Split(string(b), "\n") {
		if rest, ok := strings.CutPrefix(line, key); ok {
			var kb int64
			if _, err := fmt.Sscanf(strings.TrimSpace(rest), "%d kB", &kb); err != nil {
				return 0, err
			}
			return kb << 10, nil
		}
	}
	return 0, fmt.Errorf("pid %d: no %s", pid, strings.TrimSuffix(key, ":"))
}

// CPU is the processor time the process has used, user and system.
func (p *Process) CPU() (time.Duration, error) { return CPUTime(p.Cmd.Process.Pid) }

// userHZ is the unit of utime and stime in /proc/PID/stat: USER_HZ, fixed
// at 100 in Linux's user ABI whatever the kernel's HZ.
const userHZ = 100

// CPUTime is the user and system processor time process pid has used,
// all threads included (/proc/PID/stat fields 14 and 15), at 10 ms
// resolution: enough over a measurement of seconds.
func CPUTime(pid int) (time.Duration, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, err
	}
	// The command name (field 2) is in parentheses and may hold spaces:
	// count fields after its closing parenthesis.
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return 0, fmt.Errorf("/proc/%d/stat: no command name", pid)
	}
	f := strings.Fields(string(b[i+1:]))
	if len(f) < 13 {
		return 0, fmt.Errorf("/proc/%d/stat: %d fields", pid, len(f)+2)
	}
	var ticks int64
	for _, s := range f[11:13] { // fields 14 and 15
		t, err := strconv.ParseInt(s, 10, 64)
		if err != nil {
			return 0, fmt.Errorf("/proc/%d/stat: %w", pid, err)
		}
		ticks += t
	}
	return time.Duration(ticks) * time.Second / userHZ, nil
}

// Ztunnel is an amber-ztunnel process in a node's namespace.
type Ztunnel struct {
	Node *Node
	*Process
}

// localReadyTimeout and istiodReadyTimeout bound the wait for
// /healthz/ready: in istiod mode the first xDS sync crosses TLS, token
// review and istiod's push on a machine that may be busy.
const (
	localReadyTimeout  = 15 * time.Second
	istiodReadyTimeout = 45 * time.Second
)

// StartZtunnel starts bin on nd in local mode with the mesh file and the
// local CA directory, logging to log, and waits until /healthz/ready.
func StartZtunnel(nd *Node, bin, meshFile, caDir string, log io.Writer, args ...string) (*Ztunnel, error) {
	return startZtunnel(nd, bin, log, localReadyTimeout, append([]string{
		"-node-name", nd.Name,
		"-local-config", meshFile,
		"-ca-dir", caDir,
		"-pin-root", nd.Root,
		"-log-format", "json",
	}, args...))
}

// startZtunnel runs bin with args in nd's namespace and waits up to
// timeout for /healthz/ready.
func startZtunnel(nd *Node, bin string, log io.Writer, timeout time.Duration, args []string) (*Ztunnel, error) {
	p, err := StartProcess("ztunnel on "+nd.Name, nd.Command(context.Background(), bin, args...), log, nd.IPv4, nd.Dial, timeout)
	if err != nil {
		return nil, err
	}
	return &Ztunnel{Node: nd, Process: p}, nil
}

// ConfigDump fetches /config_dump from the admin port, which listens on
// 127.0.0.1 inside the node only.
func (z *Ztunnel) ConfigDump() (string, error) {
	return z.Admin("/config_dump")
}

// Workload is a pod as the local-mode mesh file describes it.
type Workload struct {
	Name           string
	ServiceAccount string // empty: none
	Pod            *testbed.Pod
	HBONE          bool // enrolled (protocol HBONE) or plain TCP
	Labels         map[string]string
}

// MeshYAML renders workloads in xds/server's local-mode format, followed
// by extra (policies, services) verbatim.
func MeshYAML(ws []Workload, extra string) string {
	var b strings.Builder
	b.WriteString("workloads:\n")
	for _, w := range ws {
		fmt.Fprintf(&b, "  - name: %s\n", w.Name)
		if w.ServiceAccount != "" {
			fmt.Fprintf(&b, "    serviceAccount: %s\n", w.ServiceAccount)
		}
		fmt.Fprintf(&b, "    addresses: [%q, %q]\n", w.Pod.IPv4.String(), w.Pod.IPv6.String())
		fmt.Fprintf(&b, "    node: %s\n", w.Pod.Node.Name)
		proto := "TCP"
		if w.HBONE {
			proto = "HBONE"
		}
		fmt.Fprintf(&b, "    protocol: %s\n", proto)
		if len(w.Labels) > 0 {
			b.WriteString("    labels:\n")
			for k, v := range w.Labels {
				fmt.Fprintf(&b, "      %s: %q\n", k, v)
			}
		}
	}
	b.WriteString(extra)
	return b.String()
}
