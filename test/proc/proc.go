// Package proc supervises the long-running children of tests (etcd,
// kube-apiserver, istiod): output appended to a log file, death with the
// test binary, stop with SIGTERM then SIGKILL, and the log's tail for
// failure messages.
package proc

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"runtime"
	"syscall"
	"time"
)

// ErrExited reports a child that exited when it should be running.
var ErrExited = errors.New("exited")

// Process is one supervised child.
type Process struct {
	Name string
	Cmd  *exec.Cmd
	Log  string // the log file

	done chan struct{} // closed when the child has been reaped
	err  error         // Wait's result; read after done
}

// Start starts bin with args, environment env (nil: the test's own) in
// dir (empty: the test's own), output appended to logFile.
//
// The child gets Pdeathsig SIGKILL so that it dies with the test binary
// even when the test is killed (timeout, ^C, SIGKILL) before its cleanup
// runs. The kernel delivers that signal when the *thread* that forked the
// child exits, not the process, and the Go runtime may end a thread (a
// goroutine that exits while locked to its thread takes the thread with
// it). So the child is started and waited for on a goroutine that holds
// its own locked thread for the child's whole life.
func Start(name, bin string, args, env []string, dir, logFile string) (*Process, error) {
	f, err := os.OpenFile(logFile, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return nil, fmt.Errorf("start %s: %w", name, err)
	}
	fmt.Fprintf(f, "==== %s: %s %q\n", time.Now().Format(time.RFC3339Nano), bin, args)
	p := &Process{Name: name, Log: logFile, done: make(chan struct{})}
	p.Cmd = exec.Command(bin, args...)
	p.Cmd.Dir = dir
	p.Cmd.Env = env
	p.Cmd.Stdout = f
	p.Cmd.Stderr = f
	p.Cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	started := make(chan error, 1)
	go p.supervise(f, started)
	if err := <-started; err != nil {
		return nil, fmt.Errorf("start %s: %w", name, err)
	}
	return p, nil
}

// supervise starts the child and reaps it, on a locked OS thread (see
// Start).
func (p *Process) supervise(log *os.File, started chan<- error) {
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	defer log.Close()
	if err := p.Cmd.Start(); err != nil {
		started <- err
		close(p.done)
		return
	}
	started <- nil
	p.err = p.Cmd.Wait()
	close(p.done)
}

// Exited reports whether the child has exited, and how.
func (p *Process) Exited() (bool, error) {
	select {
	case <-p.done:
		return true, p.err
	default:
		return false, nil
	}
}

// Stop sends SIGTERM, then SIGKILL after grace, and waits for the child
// to be reaped. Exit statuses caused by those signals are not errors; a
// child that had already exited on its own (a crash the test should hear
// about) is.
func (p *Process) Stop(grace time.Duration) error {
	if done, err := p.Exited(); done {
		return fmt.Errorf("%s %w on its own (%v); log %s:\n%s", p.Name, ErrExited, err, p.Log, p.LogTail(20))
	}
	_ = p.Cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.done:
		return nil
	case <-time.After(grace):
	}
	_ = p.Cmd.Process.Kill()
	select {
	case <-p.done:
		return nil
	case <-time.After(10 * time.Second):
		return fmt.Errorf("stop %s (pid %d): not reaped 10s after SIGKILL", p.Name, p.Cmd.Process.Pid)
	}
}

// RunLocked runs cmd to completion on a locked OS thread, so that its
// Pdeathsig fires when the test process dies, not when some thread does
// (see Start).
func RunLocked(cmd *exec.Cmd) error {
	done := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		defer runtime.UnlockOSThread()
		done <- cmd.Run()
	}()
	return <-done
}

// LogTail returns the last n lines of the process's log.
func (p *Process) LogTail(n int) string { return Tail(p.Log, n) }

// Tail returns the last n lines of file.
func Tail(file string, n int) string {
	b, err := os.ReadFile(file)
	if err != nil {
		return fmt.Sprintf("(read %s: %v)", file, err)
	}
	b = bytes.TrimRight(b, "\n")
	for i := len(b) - 1; i >= 0; i-- {
		if b[i] == '\n' {
			if n--; n == 0 {
				return string(b[i+1:])
			}
		}
	}
	return string(b)
}
