package capture

import (
	"fmt"
	"os"
	"path/filepath"
	"sync/atomic"
	"testing"

	"github.com/amber-mesh/amber/bpf"
	"github.com/amber-mesh/amber/test/testbed"
)

var contractSeq atomic.Int32

// The real datapath, loaded into a pin root of its own and attached to the
// pod veths of a testbed node, keeps the contract the fake keeps.
func TestPrivilegedDatapathContract(t *testing.T) {
	bed := testbed.New(t)
	n, err := bed.AddNode("n1")
	if err != nil {
		t.Fatal(err)
	}
	var veths [2]int
	for i := range veths {
		p, err := n.AddPod(fmt.Sprintf("p%d", i))
		if err != nil {
			t.Fatal(err)
		}
		veths[i] = p.HostIndex
	}
	testDatapathContract(t, func(t *testing.T) (Datapath, [2]int) {
		root := filepath.Join("/sys/fs/bpf", fmt.Sprintf("amber-test-%d-contract-%d", os.Getpid(), contractSeq.Add(1)))
		t.Cleanup(func() {
			if err := n.Do(func() error { return bpf.Uninstall(bpf.Config{PinRoot: root}) }); err != nil {
				t.Errorf("uninstall %s: %v", root, err)
			}
		})
		dp, err := bpf.Load(bpf.Config{PinRoot: root, MaxPods: contractCapacity})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { dp.Close() })
		return inNetns{dp, n.Do}, veths
	})
}

// inNetns runs Attach and Detach in the node's network namespace, where
// the veths' indexes mean them; the maps are the same from anywhere.
type inNetns struct {
	*bpf.Datapath
	do func(func() error) error
}

func (d inNetns) Attach(ifindex int, r bpf.Role) error {
	return d.do(func() error { return d.Datapath.Attach(ifindex, r) })
}

func (d inNetns) Detach(ifindex int, r bpf.Role) error {
	return d.do(func() error { return d.Datapath.Detach(ifindex, r) })
}
