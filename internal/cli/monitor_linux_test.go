package cli

import (
	"net"
	"os"
	"os/exec"
	"slices"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/amber-mesh/amber/internal/testutil"
)

func TestMonitorEnv(t *testing.T) {
	for _, tc := range []struct {
		name       string
		env, want  []string
		reexecuted bool
	}{
		{"no GODEBUG", []string{"A=1"}, []string{"A=1", "GODEBUG=" + MonitorSetting}, true},
		{"empty GODEBUG", []string{"GODEBUG=", "A=1"}, []string{"GODEBUG=" + MonitorSetting, "A=1"}, true},
		{"other settings kept", []string{"GODEBUG=memprofilerate=1"}, []string{"GODEBUG=memprofilerate=1," + MonitorSetting}, true},
		{"a key that only contains the name", []string{"GODEBUG=noschedtrace=1"}, []string{"GODEBUG=noschedtrace=1," + MonitorSetting}, true},
		{"turned off", []string{"GODEBUG=schedtrace=0"}, []string{"GODEBUG=schedtrace=0"}, false},
		{"the name without a value sets nothing", []string{"GODEBUG=schedtrace"}, []string{"GODEBUG=schedtrace," + MonitorSetting}, true},
		{"the operator's own period", []string{"GODEBUG=gctrace=1,schedtrace=1000"}, []string{"GODEBUG=gctrace=1,schedtrace=1000"}, false},
		{"only the first GODEBUG is read", []string{"GODEBUG=x=1", "GODEBUG=schedtrace=0"}, []string{"GODEBUG=x=1," + MonitorSetting, "GODEBUG=schedtrace=0"}, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			in := slices.Clone(tc.env)
			got, re := monitorEnv(in)
			if re != tc.reexecuted || !slices.Equal(got, tc.want) {
				t.Errorf("monitorEnv(%q) = %q, %v; want %q, %v", tc.env, got, re, tc.want, tc.reexecuted)
			}
			if !slices.Equal(in, tc.env) {
				t.Errorf("monitorEnv changed its argument: %q", in)
			}
		})
	}
}

// monitorEchoEnv makes the test binary a child of TestKeepMonitorAwake:
// the address to dial once KeepMonitorAwake has returned.
const monitorEchoEnv = "AMBER_MONITOR_ECHO"

// TestKeepMonitorAwake: a process that called KeepMonitorAwake runs with
// MonitorSetting, and its monitor thread no longer costs it context
// switches when a system call follows an idle spell.
//
// The child calls KeepMonitorAwake, then echoes messages with net.Conn,
// whose reads and writes go through the runtime's syscall entry. Idle
// between two messages, a child whose monitor takes its deep sleep pays
// for the wake-up on each message; one kept awake does not (its monitor
// sleeps in nanosleep instead, which the idle check then allows). Turned
// off with GODEBUG=schedtrace=0, the child is the one without.
func TestKeepMonitorAwake(t *testing.T) {
	if addr, ok := os.LookupEnv(monitorEchoEnv); ok {
		echoAfterKeepMonitorAwake(t, addr)
		return
	}
	if testing.Short() {
		t.Skip("runs two child processes")
	}
	const msgs = 100
	perMsg := map[string]float64{}
	for _, mode := range []string{"off", "awake"} {
		var also []int
		if mode == "awake" {
			also = []int{unix.SYS_NANOSLEEP}
		}
		perMsg[mode] = testutil.EchoSwitches(t, func(addr string) *exec.Cmd {
			cmd := exec.Command(os.Args[0], "-test.run=^TestKeepMonitorAwake$", "-test.v")
			env := slices.DeleteFunc(os.Environ(), func(kv string) bool { return strings.HasPrefix(kv, "GODEBUG=") })
			cmd.Env = append(env, monitorEchoEnv+"="+addr, "GOMAXPROCS=2", "GOGC=off")
			if mode == "off" {
				cmd.Env = append(cmd.Env, "GODEBUG=schedtrace=0")
			}
			return cmd
		}, msgs, also...)
		t.Logf("monitor %s: %.2f voluntary context switches in the echo process per message", mode, perMsg[mode])
	}
	// Measured: off 3.0–3.2 (the poller's thread, and the monitor's futex
	// sleep and its 20 µs sleeps until it sees the process idle again),
	// awake ≈ 1.0–1.1 (the poller's thread, and the monitor's 10 ms tick
	// when it falls inside a message).
	if perMsg["awake"] > perMsg["off"]-1 {
		t.Errorf("kept awake, the echo costs %.2f context switches per message, %.2f without: the monitor's wake-up should be spared (≥ 1 fewer)",
			perMsg["awake"], perMsg["off"])
	}
}

// echoAfterKeepMonitorAwake is TestKeepMonitorAwake's child: it calls
// KeepMonitorAwake (the first time through, that re-executes this test
// binary with the same arguments), checks the GODEBUG it runs with, then
// echoes what it reads from addr until the parent hangs up.
func echoAfterKeepMonitorAwake(t *testing.T, addr string) {
	if err := KeepMonitorAwake(); err != nil {
		t.Fatal(err)
	}
	godebug := os.Getenv("GODEBUG")
	if godebug != MonitorSetting && godebug != "schedtrace=0" {
		t.Fatalf("after KeepMonitorAwake, GODEBUG=%q", godebug)
	}
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	buf := make([]byte, 64)
	for {
		n, err := c.Read(buf)
		if err != nil {
			return // the parent is done
		}
		if _, err := c.Write(buf[:n]); err != nil {
			t.Fatal(err)
		}
	}
}
