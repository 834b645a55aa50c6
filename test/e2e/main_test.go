package e2e

import (
	"fmt"
	"os"
	"testing"

	"github.com/amber-mesh/amber/test/meshbed"
)

// ztunnelBin is the amber-ztunnel binary built for this run.
var ztunnelBin string

func TestMain(m *testing.M) {
	os.Exit(run(m))
}

func run(m *testing.M) int {
	dir, err := os.MkdirTemp("", "amber-e2e-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer os.RemoveAll(dir)
	if ztunnelBin, err = meshbed.BuildZtunnel(dir); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	return m.Run()
}
