package kube

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"runtime"
	"syscall"
	"time"
)

// process is one child (etcd or kube-apiserver) whose output is appended to
// a log file.
type process struct {
	name string
	cmd  *exec.Cmd
	log  string
	done chan struct{} // closed when the child has been reaped
	err  error         // Wait's result; read after done
}

// startProcess starts bin with args, output appended to logFile.
//
// The child gets Pdeathsig SIGKILL so that it dies with the test binary
// even when the test is killed (timeout, ^C, SIGKILL) before its cleanup
// runs. The kernel delivers that signal when the *thread* that forked the
// child exits, not the process, and the Go runtime may end a thread (a
// goroutine that exits while locked to its thread takes the thread with
// it). So the child is started and waited for on a goroutine that holds
// its own locked thread for the child's whole life.
func startProcess(name, bin string, args []string, logFile string) (*process, error) {
	f, err := os.OpenFile(logFile, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return nil, fmt.Errorf("start %s: %w", name, err)
	}
	fmt.Fprintf(f, "==== %s: %s %q\n", time.Now().Format(time.RFC3339Nano), bin, args)
	p := &process{name: name, log: logFile, done: make(chan struct{})}
	p.cmd = exec.Command(bin, args...)
	p.cmd.Stdout = f
	p.cmd.Stderr = f
	p.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	started := make(chan error, 1)
	go p.supervise(f, started)
	if err := <-started; err != nil {
		return nil, fmt.Errorf("start %s: %w", name, err)
	}
	return p, nil
}

// supervise starts the child and reaps it, on a locked OS thread (see
// startProcess).
func (p *process) supervise(log *os.File, started chan<- error) {
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	defer log.Close()
	if err := p.cmd.Start(); err != nil {
		started <- err
		close(p.done)
		return
	}
	started <- nil
	p.err = p.cmd.Wait()
	close(p.done)
}

// exited reports whether the child has exited, and how.
func (p *process) exited() (bool, error) {
	select {
	case <-p.done:
		return true, p.err
	default:
		return false, nil
	}
}

// stop sends SIGTERM, then SIGKILL after grace, and waits for the child
// to be reaped. Exit statuses caused by those signals are not errors; a
// child that had already exited on its own (a crash the test should hear
// about) is.
func (p *process) stop(grace time.Duration) error {
	if done, err := p.exited(); done {
		return fmt.Errorf("%s %w on its own (%v); log %s:\n%s", p.name, errExited, err, p.log, p.logTail(20))
	}
	_ = p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.done:
		return nil
	case <-time.After(grace):
	}
	_ = p.cmd.Process.Kill()
	select {
	case <-p.done:
		return nil
	case <-time.After(10 * time.Second):
		return fmt.Errorf("stop %s (pid %d): not reaped 10s after SIGKILL", p.name, p.cmd.Process.Pid)
	}
}

// runLocked runs cmd to completion on a locked OS thread, so that its
// Pdeathsig fires when the test process dies, not when some thread does
// (see startProcess).
func runLocked(cmd *exec.Cmd) error {
	done := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		defer runtime.UnlockOSThread()
		done <- cmd.Run()
	}()
	return <-done
}

// logTail returns the last n lines of the process's log.
func (p *process) logTail(n int) string {
	return tail(p.log, n)
}

func tail(file string, n int) string {
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
