package bpf

import (
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"sync/atomic"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/vishvananda/netns"
)

var pinSeq atomic.Int32

// testPinRoot is a pin root of the test's own under bpffs, removed (with
// everything pinned in it) when the test ends.
func testPinRoot(tb testing.TB) string {
	tb.Helper()
	root := filepath.Join("/sys/fs/bpf", fmt.Sprintf("amber-test-%d-%d", os.Getpid(), pinSeq.Add(1)))
	tb.Cleanup(func() {
		if err := Uninstall(Config{PinRoot: root}); err != nil {
			tb.Errorf("uninstall %s: %v", root, err)
		}
	})
	return root
}

// mustLoad loads the datapath into a fresh pin root (without host
// routing: that is bpf/hostnet's).
func mustLoad(tb testing.TB, cfg Config) *Datapath {
	tb.Helper()
	if cfg.PinRoot == "" {
		cfg.PinRoot = testPinRoot(tb)
	}
	d, err := Load(cfg)
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { d.Close() })
	return d
}

// enterNetns moves the test goroutine, locked to its OS thread, into a new
// empty network namespace until the test ends. prog.Run, socket lookups
// and TCX links all use the calling thread's namespace.
func enterNetns(tb testing.TB) netns.NsHandle {
	tb.Helper()
	runtime.LockOSThread()
	orig, err := netns.Get()
	if err != nil {
		runtime.UnlockOSThread()
		tb.Fatal(err)
	}
	ns, err := netns.New()
	if err != nil {
		orig.Close()
		runtime.UnlockOSThread()
		tb.Fatal(err)
	}
	// Cleanups run on the test goroutine, still on this thread.
	tb.Cleanup(func() {
		ns.Close()
		defer orig.Close()
		if err := netns.Set(orig); err != nil {
			// Stay locked: the runtime then retires this thread with
			// the goroutine instead of reusing it inside the namespace.
			tb.Errorf("restore netns: %v", err)
			return
		}
		runtime.UnlockOSThread()
	})
	return ns
}

// emptyTC is a tc program that only returns TC_ACT_OK.
func emptyTC(tb testing.TB) *ebpf.Program {
	tb.Helper()
	p, err := ebpf.NewProgram(&ebpf.ProgramSpec{
		Type:         ebpf.SchedCLS,
		License:      "GPL",
		Instructions: asm.Instructions{asm.Mov.Imm(asm.R0, 0), asm.Return()},
	})
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { p.Close() })
	return p
}
