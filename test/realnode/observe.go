package realnode

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"time"

	"github.com/vishvananda/netns"
	corev1 "k8s.io/api/core/v1"

	"github.com/amber-mesh/amber/bpf"
	"github.com/amber-mesh/amber/bpf/hostnet"
	"github.com/amber-mesh/amber/test/cluster"
	"github.com/amber-mesh/amber/test/promtext"
)

// ZtunnelMetricsURL is the ztunnel's Prometheus endpoint on the node
// (the DaemonSet is hostNetwork).
var ZtunnelMetricsURL = "http://" + net.JoinHostPort(cluster.NodeIP, "15020") + "/metrics"

// Metric is one sample of a Prometheus text exposition.
type Metric = promtext.Sample

// Metrics fetches and parses the ztunnel's metrics; only samples whose
// name is in names are returned (all when names is empty).
func Metrics(ctx context.Context, names ...string) ([]Metric, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, ZtunnelMetricsURL, nil)
	if err != nil {
		return nil, err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return nil, fmt.Errorf("ztunnel metrics: %w", err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("ztunnel metrics: %s", resp.Status)
	}
	return parseMetrics(resp.Body, names)
}

func parseMetrics(r io.Reader, names []string) ([]Metric, error) {
	return promtext.Parse(r, names...)
}

// Sum adds the values of the samples whose labels include every pair of
// match.
func Sum(ms []Metric, match map[string]string) float64 { return promtext.Sum(ms, match) }

// Datapath reads the node's pinned datapath (what `amberctl` shows).
func Datapath() (*bpf.Status, error) {
	return bpf.Inspect(bpf.DefaultPinRoot, func() error { return hostnet.Check(hostnet.Config{}) })
}

// Captured reports whether ip is in the datapath's membership map.
func Captured(ip string) (bool, error) {
	st, err := Datapath()
	if err != nil {
		return false, err
	}
	a, err := netip.ParseAddr(ip)
	if err != nil {
		return false, err
	}
	for _, m := range st.Members {
		if m.Addr == a {
			return true, nil
		}
	}
	return false, nil
}

// ZtunnelLogs returns the ztunnel container's log since t.
func ZtunnelLogs(ctx context.Context, c *cluster.Cluster, since time.Time) (string, error) {
	out, err := c.Kubectl(ctx, "-n", Namespace, "logs", "ds/"+DaemonSet, "-c", "amber-ztunnel",
		"--since-time="+since.UTC().Format(time.RFC3339))
	return string(out), err
}

// LogRecord is one line of a log written by log/slog's text or JSON
// handler (amber's -log-format), as attribute key → value; time, level
// and msg included.
type LogRecord map[string]string

// FindLogLine returns the first line of log whose record satisfies
// match. Lines in neither format (a stack trace, kubectl's own notes) are
// skipped.
func FindLogLine(log string, match func(LogRecord) bool) (string, bool) {
	for _, line := range strings.Split(log, "\n") {
		if r, ok := ParseLogLine(line); ok && match(r) {
			return line, true
		}
	}
	return "", false
}

// ParseLogLine parses one line of slog's text format (key=value, values
// quoted with Go's syntax when they need it) or JSON format (one flat
// object; amber's attribute keys carry their dots, "src.identity", instead
// of nesting).
func ParseLogLine(line string) (LogRecord, bool) {
	line = strings.TrimSpace(line)
	if strings.HasPrefix(line, "{") {
		var m map[string]any
		if err := json.Unmarshal([]byte(line), &m); err != nil {
			return nil, false
		}
		r := LogRecord{}
		for k, v := range m {
			switch v := v.(type) {
			case string:
				r[k] = v
			case float64:
				r[k] = strconv.FormatFloat(v, 'f', -1, 64)
			default:
				b, _ := json.Marshal(v)
				r[k] = string(b)
			}
		}
		return r, len(r) > 0
	}
	r := LogRecord{}
	for line != "" {
		eq := strings.IndexByte(line, '=')
		if eq <= 0 || strings.ContainsAny(line[:eq], " \"") {
			return nil, false
		}
		key, rest := line[:eq], line[eq+1:]
		var val string
		if strings.HasPrefix(rest, `"`) {
			q, err := strconv.QuotedPrefix(rest)
			if err != nil {
				return nil, false
			}
			val, _ = strconv.Unquote(q)
			rest = rest[len(q):]
		} else {
			sp := strings.IndexByte(rest, ' ')
			if sp < 0 {
				sp = len(rest)
			}
			val, rest = rest[:sp], rest[sp:]
		}
		if rest != "" && rest[0] != ' ' {
			return nil, false
		}
		r[key] = val
		line = strings.TrimLeft(rest, " ")
	}
	return r, len(r) > 0
}

// PodNetns returns the network namespace of pod's first container, as
// /proc/PID/ns/net of its process.
func PodNetns(ctx context.Context, c *cluster.Cluster, pod *corev1.Pod) (string, error) {
	if len(pod.Status.ContainerStatuses) == 0 {
		return "", fmt.Errorf("pod %s/%s: no container status", pod.Namespace, pod.Name)
	}
	id, ok := strings.CutPrefix(pod.Status.ContainerStatuses[0].ContainerID, "containerd://")
	if !ok {
		return "", fmt.Errorf("pod %s/%s: container id %q", pod.Namespace, pod.Name, pod.Status.ContainerStatuses[0].ContainerID)
	}
	out, err := exec.CommandContext(ctx, "ctr", "-a", c.ContainerdSocket, "-n", "k8s.io", "task", "ls").Output()
	if err != nil {
		return "", fmt.Errorf("ctr task ls: %w", err)
	}
	for _, line := range strings.Split(string(out), "\n") {
		if f := strings.Fields(line); len(f) >= 2 && f[0] == id {
			return "/proc/" + f[1] + "/ns/net", nil
		}
	}
	return "", fmt.Errorf("pod %s/%s: no running task %s", pod.Namespace, pod.Name, id)
}

// DialFrom opens a TCP connection from inside the network namespace nsPath
// (a pod's): the socket belongs to that namespace, so the connection
// leaves through the pod's veth as the pod's own would.
func DialFrom(ctx context.Context, nsPath, addr string) (net.Conn, error) {
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	orig, err := netns.Get()
	if err != nil {
		return nil, err
	}
	defer orig.Close()
	target, err := netns.GetFromPath(nsPath)
	if err != nil {
		return nil, err
	}
	defer target.Close()
	if err := netns.Set(target); err != nil {
		return nil, err
	}
	// Dial in this goroutine only: the socket is made in this thread's
	// namespace, and the thread goes back before it is unlocked.
	d := net.Dialer{Timeout: 30 * time.Second}
	d.SetMultipathTCP(false)
	conn, dialErr := d.DialContext(ctx, "tcp", addr)
	if err := netns.Set(orig); err != nil {
		// The thread is in the wrong namespace: never unlock it.
		runtime.LockOSThread()
		if conn != nil {
			conn.Close()
		}
		return nil, fmt.Errorf("restore network namespace: %w", err)
	}
	return conn, dialErr
}

// ProcessOf returns the pid of the process running bin (the full path a
// container's command names) in the pod with UID uid: its cgroup path
// names the pod, so a process of the same name outside it (another
// benchmark's, another node's) is never taken for it.
func ProcessOf(bin, uid string) (int, error) {
	procs, err := filepath.Glob("/proc/[0-9]*/cmdline")
	if err != nil {
		return 0, err
	}
	podID := strings.ReplaceAll(uid, "-", "_")
	for _, f := range procs {
		cmd, err := os.ReadFile(f)
		if err != nil || !strings.HasPrefix(string(cmd), bin+"\x00") {
			continue
		}
		dir := filepath.Dir(f)
		cg, err := os.ReadFile(filepath.Join(dir, "cgroup"))
		if err != nil || !(strings.Contains(string(cg), uid) || strings.Contains(string(cg), podID)) {
			continue
		}
		return strconv.Atoi(filepath.Base(dir))
	}
	return 0, fmt.Errorf("no process %s in pod %s", bin, uid)
}
