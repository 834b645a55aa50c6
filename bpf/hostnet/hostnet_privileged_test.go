package hostnet

import (
	"errors"
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
	if err := Remove(cfg); err != nil {
		t.Fatal(err)
	}
	if ok, err := acceptsLocal(); err != nil || ok {
		t.Fatalf("lo accept_local after Remove: %v %v, want off", ok, err)
	}
	if err := Check(cfg); !errors.Is(err, ErrIncomplete) {
		t.Fatalf("Check after Remove = %v, want ErrIncomplete", err)
	}
	if err := Remove(cfg); err != nil {
		t.Fatalf("Remove twice: %v", err)
	}
}
