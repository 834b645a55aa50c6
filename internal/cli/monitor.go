package cli

import (
	"fmt"
	"os"
	"slices"
	"strings"
	"syscall"
)

// MonitorSetting is the GODEBUG setting KeepMonitorAwake adds: the
// scheduler trace's period at its largest (milliseconds, an int32:
// ≈ 24.8 days). The runtime's monitor thread (sysmon) never takes its deep
// sleep while a trace period is set (runtime/proc.go, sysmon: "sysmon
// should not enter deep sleep if schedtrace is enabled"); the trace itself
// is one line on stderr per period, the first once the machine has been
// up that long (the period counts from boot), and a scheduler dump before
// a fatal error's traceback.
const MonitorSetting = "schedtrace=2147483647"

// KeepMonitorAwake re-executes the running binary, once, with
// MonitorSetting added to GODEBUG, unless GODEBUG already sets schedtrace
// (GODEBUG=schedtrace=0 turns it off). It returns only when no re-exec is
// needed, or with the error of the exec.
//
// Why: the monitor's deep sleep is taken whenever every P is idle, and the
// next system call through the runtime's syscall entry (an accept, a
// dial, a close, a setsockopt) wakes it, after which it polls every 20 µs
// until it sees the process idle again. A proxy serving many short
// connections goes idle and wakes up again several times per connection,
// and each time pays the monitor's futex wake-up and its sleeps — on a
// paravirtualised machine, where a context switch is expensive, a fifth
// to a third of a ztunnel's CPU per connection (ARCHITECTURE.md, "The
// monitor thread kept out of its deep sleep"). Kept awake, the monitor
// backs off to a 10 ms poll while nothing happens and no system call ever
// wakes it. A setting of the runtime's that is read once, at start, hence
// the exec.
func KeepMonitorAwake() error {
	env, ok := monitorEnv(os.Environ())
	if !ok {
		return nil
	}
	// /proc/self/exe: the binary that is running, even if its path has
	// since been replaced.
	if err := syscall.Exec("/proc/self/exe", os.Args, env); err != nil {
		return fmt.Errorf("re-executing with GODEBUG=%s: %w", MonitorSetting, err)
	}
	return nil // not reached
}

// monitorEnv returns environ with MonitorSetting added to GODEBUG, and
// whether it had to be (false when GODEBUG already sets schedtrace). The
// first GODEBUG entry is the one the runtime reads.
func monitorEnv(environ []string) ([]string, bool) {
	for i, kv := range environ {
		v, ok := strings.CutPrefix(kv, "GODEBUG=")
		if !ok {
			continue
		}
		for _, setting := range strings.Split(v, ",") {
			// The runtime skips a setting without "=".
			if key, _, found := strings.Cut(setting, "="); found && key == "schedtrace" {
				return environ, false
			}
		}
		if v != "" {
			kv += ","
		}
		out := slices.Clone(environ)
		out[i] = kv + MonitorSetting
		return out, true
	}
	return append(slices.Clone(environ), "GODEBUG="+MonitorSetting), true
}
