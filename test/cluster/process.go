package cluster

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// A component runs detached from whoever started it (its own session, no
// parent-death signal): `amber-cluster up` returns and the node keeps
// running. Its pid file holds "PID BINARY"; stop and alive check that the
// pid still runs that binary, so a reused pid is never signalled.

// startDaemon starts bin with args, and env added to this process's
// environment, output appended to logs/<name>.log.
func startDaemon(l layout, name, bin string, args, env []string) error {
	for _, d := range []string{l.logs(), l.pids()} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return fmt.Errorf("start %s: %w", name, err)
		}
	}
	logFile := filepath.Join(l.logs(), name+".log")
	f, err := os.OpenFile(logFile, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return fmt.Errorf("start %s: %w", name, err)
	}
	defer f.Close()
	// The pid file must name the binary as /proc/PID/exe will (daemonPid
	// compares them): with symbolic links resolved, such as a .cache that
	// links to another checkout's.
	if real, err := filepath.EvalSymlinks(bin); err == nil {
		bin = real
	}
	fmt.Fprintf(f, "==== %s: %s %q\n", time.Now().Format(time.RFC3339Nano), bin, args)
	cmd := exec.Command(bin, args...)
	cmd.Stdout, cmd.Stderr = f, f
	cmd.Env = append(os.Environ(), env...)
	cmd.Dir = l.dir
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("start %s: %w", name, err)
	}
	// Reap it if it dies while this process lives (tests); after this
	// process exits, init does.
	go func() { _ = cmd.Wait() }()
	pidFile := filepath.Join(l.pids(), name+".pid")
	if err := os.WriteFile(pidFile, fmt.Appendf(nil, "%d %s\n", cmd.Process.Pid, bin), 0o644); err != nil {
		_ = cmd.Process.Kill()
		return fmt.Errorf("start %s: %w", name, err)
	}
	return nil
}

// daemonPid returns the pid of the running component name, or 0.
func daemonPid(l layout, name string) int {
	b, err := os.ReadFile(filepath.Join(l.pids(), name+".pid"))
	if err != nil {
		return 0
	}
	f := strings.Fields(string(b))
	if len(f) != 2 {
		return 0
	}
	pid, err := strconv.Atoi(f[0])
	if err != nil || !running(pid) {
		return 0
	}
	if exe, err := os.Readlink(fmt.Sprintf("/proc/%d/exe", pid)); err != nil || strings.TrimSuffix(exe, " (deleted)") != f[1] {
		return 0
	}
	return pid
}

// running reports whether pid exists and is not a zombie.
func running(pid int) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return false
	}
	// The state follows the parenthesised command name, which may itself
	// contain ") ".
	i := bytes.LastIndexByte(b, ')')
	return i >= 0 && i+2 < len(b) && b[i+2] != 'Z'
}

var errStillRunning = errors.New("still running after SIGKILL")

// stopDaemon sends SIGTERM, then SIGKILL after grace, and removes the pid
// file. A component that is not running is not an error.
func stopDaemon(l layout, name string, grace time.Duration) error {
	pid := daemonPid(l, name)
	defer os.Remove(filepath.Join(l.pids(), name+".pid"))
	if pid == 0 {
		return nil
	}
	return killWait(pid, grace)
}

func killWait(pid int, grace time.Duration) error {
	_ = syscall.Kill(pid, syscall.SIGTERM)
	if waitGone(pid, grace) {
		return nil
	}
	_ = syscall.Kill(pid, syscall.SIGKILL)
	if waitGone(pid, 10*time.Second) {
		return nil
	}
	return fmt.Errorf("stop pid %d: %w", pid, errStillRunning)
}

func waitGone(pid int, d time.Duration) bool {
	deadline := time.Now().Add(d)
	for running(pid) {
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(50 * time.Millisecond)
	}
	return true
}

// strays returns the pids of processes, other than this one, whose command
// line or working directory names the state directory: containerd shims
// (-address DIR/containerd/containerd.sock) and components whose pid file
// is gone.
func strays(l layout) []int {
	// Never this process or its ancestors: `go run ./test/cmd/amber-cluster
	// down -dir DIR` names the directory too.
	self := map[int]bool{}
	for pid := os.Getpid(); pid > 1 && !self[pid]; pid = parentPid(pid) {
		self[pid] = true
	}
	ents, _ := os.ReadDir("/proc")
	var out []int
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || self[pid] || !running(pid) {
			continue
		}
		cmdline, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
		cwd, _ := os.Readlink(fmt.Sprintf("/proc/%d/cwd", pid))
		if bytes.Contains(cmdline, []byte(l.dir+"/")) || bytes.Contains(cmdline, []byte(l.dir+"\x00")) ||
			cwd == l.dir || strings.HasPrefix(cwd, l.dir+"/") {
			out = append(out, pid)
		}
	}
	return out
}

func parentPid(pid int) int {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0
	}
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return 0
	}
	f := strings.Fields(string(b[i+1:]))
	if len(f) < 2 {
		return 0
	}
	ppid, _ := strconv.Atoi(f[1])
	return ppid
}
