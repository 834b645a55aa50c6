package nonblock_test

import (
	"net"
	"os"
	"os/exec"
	"strings"
	"testing"

	"github.com/amber-mesh/amber/internal/testutil"
	"github.com/amber-mesh/amber/tunnel/nonblock"
)

// echoEnv makes the test binary an echo child (see echoChild): "nonblock"
// echoes with ReadWait and WriteAll, "netconn" with net.Conn's Read and
// Write; the value after a comma is the address to dial.
const echoEnv = "AMBER_NONBLOCK_ECHO"

// echoChild is TestNoMonitorWakeups in its child process: it echoes what
// it reads until the parent hangs up.
func echoChild(t *testing.T, mode, addr string) {
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	raw := nonblock.Raw(c)
	buf := make([]byte, 64)
	for {
		var n int
		if mode == "nonblock" {
			n, err = nonblock.ReadWait(raw, buf)
		} else {
			n, err = c.Read(buf)
		}
		if err != nil {
			return // the parent is done
		}
		if mode == "nonblock" {
			_, err = nonblock.WriteAll(raw, buf[:n])
		} else {
			_, err = c.Write(buf[:n])
		}
		if err != nil {
			t.Fatal(err)
		}
	}
}

// TestNoMonitorWakeups: ReadWait and WriteAll do not wake the Go
// runtime's monitor thread (sysmon) in a process that was idle, where
// net.Conn's Read and Write do, since they enter the kernel through the
// runtime's syscall entry. The ztunnels' data path relies on it for
// request/response traffic (see the package comment).
//
// A child process echoes messages from this one. Before each message the
// test waits until every thread of the child sleeps in futex or epoll (so
// the monitor sleeps too), and after the echo until it does again; the
// child's voluntary context switches between the two points are the
// message's cost, the monitor's included. Waiting for the child to be idle
// is the event; the counts are the kernel's.
func TestNoMonitorWakeups(t *testing.T) {
	if mode, addr, ok := strings.Cut(os.Getenv(echoEnv), ","); ok {
		echoChild(t, mode, addr)
		return
	}
	if testing.Short() {
		t.Skip("runs two child processes")
	}
	const msgs = 100
	perMsg := map[string]float64{}
	for _, mode := range []string{"netconn", "nonblock"} {
		perMsg[mode] = echoSwitches(t, mode, msgs)
		t.Logf("%s: %.2f voluntary context switches in the echo process per message", mode, perMsg[mode])
	}
	// Measured, idle machine or two cores busy alike: nonblock 1.00 (the
	// poller's thread going back to sleep), netconn 3.0–3.2 (also the
	// monitor's futex sleep and its 20 µs sleeps until it sees the process
	// idle again).
	if perMsg["nonblock"] > perMsg["netconn"]-1 {
		t.Errorf("nonblock's echo costs %.2f context switches per message, net.Conn's %.2f: the raw calls should spare the monitor's wake-up (≥ 1 fewer)",
			perMsg["nonblock"], perMsg["netconn"])
	}
}

// echoSwitches runs an echo child in mode and returns its voluntary
// context switches per message, counted from idle to idle.
func echoSwitches(t *testing.T, mode string, msgs int) float64 {
	return testutil.EchoSwitches(t, func(addr string) *exec.Cmd {
		cmd := exec.Command(os.Args[0], "-test.run=^TestNoMonitorWakeups$", "-test.v")
		// Two Ps as on the machines we measure; the monitor's behaviour
		// does not depend on it, the number of threads that spin does.
		cmd.Env = append(os.Environ(), echoEnv+"="+mode+","+addr, "GOMAXPROCS=2", "GOGC=off")
		return cmd
	}, msgs)
}
