package cluster

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"
)

// Grace periods before SIGKILL. The kubelet goes first and quickly; the
// API server drains requests.
var graces = map[string]time.Duration{
	"kubelet":        10 * time.Second,
	"kube-apiserver": 15 * time.Second,
	"containerd":     10 * time.Second,
}

// Stop stops the cluster whose state is in dir and removes everything it
// created, on the host and in dir: pods (through the runtime, so CNI
// releases their veths and addresses), processes, mounts, network
// namespaces, cgroups, nftables tables, the node interface and routes, the
// host paths it created; it restores the sysctls the node changed. It
// works from what it finds, so it also cleans up after a crashed Start or
// a killed test, and does nothing when nothing is there. If another state
// directory owns the host and its cluster is dead, that one is cleaned
// too.
func Stop(ctx context.Context, dir string) error {
	dir, err := filepath.Abs(dir)
	if err != nil {
		return fmt.Errorf("stop cluster: %w", err)
	}
	var errs []error
	// Host-wide state (node interface, nftables, pod netns and cgroups,
	// sysctls) belongs to the cluster that owns the host: a directory whose
	// Start was refused (ErrHostBusy) must not tear down the running one.
	host := true
	if owner, _ := os.ReadFile(ownerFile); len(owner) > 0 && string(owner) != dir {
		other := layout{string(owner)}
		if daemonPid(other, "kube-apiserver") == 0 && daemonPid(other, "kubelet") == 0 {
			errs = append(errs, stop(ctx, other, true))
		} else {
			host = false
		}
	}
	errs = append(errs, stop(ctx, layout{dir}, host))
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("stop cluster: %w", err)
	}
	return nil
}

func stop(ctx context.Context, l layout, host bool) error {
	var errs []error
	// The kubelet first: it would restart what we remove, and the API
	// server can hang on SIGTERM while a kubelet exec stream is open.
	errs = append(errs, stopDaemon(l, "kubelet", graces["kubelet"]))
	if pid := daemonPid(l, "containerd"); pid != 0 {
		cctx, cancel := context.WithTimeout(ctx, 60*time.Second)
		err := removeSandboxes(cctx, l)
		cancel()
		// A containerd that was dying (a crashed node) cannot answer; the
		// sweep below removes what its sandboxes left.
		if err != nil && waitGone(pid, 2*time.Second) {
			err = nil
		}
		errs = append(errs, err)
	}
	for i := len(components) - 1; i >= 0; i-- {
		n := components[i]
		g, ok := graces[n]
		if !ok {
			g = 5 * time.Second
		}
		errs = append(errs, stopDaemon(l, n, g))
	}
	// Whatever outlived its pid file: shims, processes of a crashed run.
	for _, pid := range strays(l) {
		errs = append(errs, killWait(pid, 2*time.Second))
	}
	errs = append(errs, unmountUnder(l.dir))
	if host {
		errs = append(errs, sweepCgroups(), sweepNetns(), restoreHost(l))
	}
	if owner, _ := os.ReadFile(ownerFile); string(owner) == l.dir {
		os.Remove(ownerFile)
		os.Remove(filepath.Dir(ownerFile))
	}
	err := errors.Join(errs...)
	if err != nil {
		return err
	}
	// Never RemoveAll across a mount point: a pod's hostPath volume
	// could be bind-mounted under the kubelet's root.
	if m := mountsUnder(l.dir); len(m) > 0 {
		return fmt.Errorf("keep %s: still mounted: %s", l.dir, strings.Join(m, " "))
	}
	return os.RemoveAll(l.dir)
}
