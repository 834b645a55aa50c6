package hostnet

import (
	"errors"
	"os"
	"runtime"
	"testing"

	"github.com/vishvananda/netns"

	"github.com/amber-mesh/amber/test/privileged"
)

func TestPrivilegedEnsureCheckRemove(t *testing.T) {
	privileged.Require(t)
	runtime.LockOSThread()
	orig, err := netns.Get()
	if err != nil {
		t.Fatal(err)
	}
	defer orig.Close()
	ns, err := netns.New()
	if err != nil {
		t.Fatal(err)
	}
	defer func() {
		ns.Close()
		if err := netns.Set(orig); err != nil {
			t.Errorf("restore netns: %v", err) // thread stays locked and is retired
			return
		}
		runtime.UnlockOSThread()
	}()

	// A node with a strict reverse-path filter everywhere: lo must end up
	// loose all the same (the kernel applies max(all, lo)).
	if err := os.WriteFile("/proc/sys/net/ipv4/conf/all/rp_filter", []byte("1"), 0o644); err != nil {
		t.Fatal(err)
	}
	cfg := Config{}
	if err := Check(cfg); !errors.Is(err, ErrIncomplete) {
		t.Fatalf("Check on a bare namespace = %v, want ErrIncomplete", err)
	}
	for i := 0; i < 2; i++ { // idempotent
		if err := Ensure(cfg); err != nil {
			t.Fatalf("Ensure #%d: %v", i+1, err)
		}
	}
	if err := Check(cfg); err != nil {
		t.Fatal(err)
	}
	if ok, err := acceptsLocal(); err != nil || !ok {
		t.Fatalf("lo accept_local after Ensure: %v %v, want on", ok, err)
	}
	if strict, err := loStrictRP(); err != nil || strict {
		t.Fatalf("lo reverse-path filter strict after Ensure: %v %v, want loose", strict, err)
	}
	if err := Remove(cfg); err != nil {
		t.Fatal(err)
	}
	if ok, err := acceptsLocal(); err != nil || ok {
		t.Fatalf("lo accept_local after Remove: %v %v, want off", ok, err)
	}
	if v, err := readConf("lo", "rp_filter"); err != nil || v != 0 {
		t.Fatalf("lo rp_filter after Remove: %d %v, want 0", v, err)
	}
	if err := Check(cfg); !errors.Is(err, ErrIncomplete) {
		t.Fatalf("Check after Remove = %v, want ErrIncomplete", err)
	}
	if err := Remove(cfg); err != nil {
		t.Fatalf("Remove twice: %v", err)
	}
}
