// Package privileged gates tests that need root: off CI they skip with a
// reason, on CI (CI=true) they fail, because every tier must run there.
package privileged

import (
	"os"
	"testing"
)

// Require skips or fails tb unless the process runs as root.
func Require(tb testing.TB) {
	tb.Helper()
	if os.Geteuid() == 0 {
		return
	}
	if os.Getenv("CI") == "true" {
		tb.Fatal("privileged test needs root, and CI must run it")
	}
	tb.Skip("privileged test: needs root")
}
