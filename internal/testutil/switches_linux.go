package testutil

import (
	"bufio"
	"bytes"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// EchoSwitches measures what a message costs a process in voluntary
// context switches, the Go runtime's own threads included. It listens on
// loopback and starts the command child returns for the listener's
// address; that process must dial it and echo what it reads until the
// connection ends. For each of msgs messages it waits until the process
// is idle — every thread asleep in a futex or epoll wait, or in one of the
// system calls also names — sends the message, reads the echo, waits for
// idle again, and counts the switches between the two idle points.
// Returns the mean per message.
func EchoSwitches(t *testing.T, child func(addr string) *exec.Cmd, msgs int, also ...int) float64 {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	cmd := child(ln.Addr().String())
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() {
		cmd.Process.Kill()
		cmd.Wait()
		if t.Failed() {
			t.Logf("echo child %v:\n%s", cmd.Args, out.Bytes())
		}
	}()
	// A child that fails before it dials must not hang the test.
	ln.(*net.TCPListener).SetDeadline(time.Now().Add(Timeout))
	c, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	pid := cmd.Process.Pid
	asleep := append([]int{unix.SYS_FUTEX, unix.SYS_EPOLL_PWAIT, unix.SYS_EPOLL_PWAIT2}, also...)
	idle := func() error { return threadsAsleep(pid, asleep) }
	msg, got := []byte("ping"), make([]byte, 4)
	exchange := func() {
		if _, err := c.Write(msg); err != nil {
			t.Fatal(err)
		}
		if _, err := io.ReadFull(c, got); err != nil {
			t.Fatal(err)
		}
	}
	exchange() // starts the child's threads
	var total int
	for range msgs {
		EventuallyNil(t, "the echo child to idle", idle)
		before := voluntarySwitches(t, pid)
		exchange()
		EventuallyNil(t, "the echo child to idle", idle)
		total += voluntarySwitches(t, pid) - before
	}
	return float64(total) / float64(msgs)
}

// threadsAsleep reports, as an error, a thread of pid that is not asleep
// in one of the system calls numbered in calls.
func threadsAsleep(pid int, calls []int) error {
	tasks, err := filepath.Glob(fmt.Sprintf("/proc/%d/task/*/syscall", pid))
	if err != nil || len(tasks) == 0 {
		return Final(fmt.Errorf("no threads of %d: %v", pid, err))
	}
	for _, f := range tasks {
		b, err := os.ReadFile(f)
		if err != nil {
			return err
		}
		nr, _, _ := strings.Cut(strings.TrimSpace(string(b)), " ")
		n, err := strconv.Atoi(nr) // "running" is not a number
		if err != nil || !slices.Contains(calls, n) {
			return fmt.Errorf("%s: %s", f, b)
		}
	}
	return nil
}

// voluntarySwitches sums the voluntary context switches of pid's threads.
func voluntarySwitches(t *testing.T, pid int) int {
	tasks, err := filepath.Glob(fmt.Sprintf("/proc/%d/task/*/status", pid))
	if err != nil {
		t.Fatal(err)
	}
	sum := 0
	for _, f := range tasks {
		file, err := os.Open(f)
		if err != nil {
			t.Fatal(err)
		}
		sc := bufio.NewScanner(file)
		for sc.Scan() {
			if v, ok := strings.CutPrefix(sc.Text(), "voluntary_ctxt_switches:"); ok {
				n, err := strconv.Atoi(strings.TrimSpace(v))
				if err != nil {
					t.Fatal(err)
				}
				sum += n
			}
		}
		file.Close()
	}
	return sum
}
