package agent

import (
	"context"
	"errors"
	"log/slog"
	"os"
	"time"

	"github.com/amber-mesh/amber/agent/capture"
	"github.com/amber-mesh/amber/agent/cniinstall"
	"github.com/amber-mesh/amber/agent/kube"
	"github.com/amber-mesh/amber/bpf"
	"github.com/amber-mesh/amber/bpf/hostnet"
	"github.com/amber-mesh/amber/internal/logkey"
)

// uninstallIfRemoved takes amber off the node when the agent stops
// because its DaemonSet is being deleted. On a restart or upgrade
// everything stays: pinned programs keep capturing, and the chained
// plugin makes new enrolled pods wait for the next agent.
func uninstallIfRemoved(kc *kube.Client, cfg Config, host capture.Host, log *slog.Logger) error {
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	var removed bool
	var err error
	for attempt := 0; attempt < 3; attempt++ {
		if removed, err = kc.Uninstalling(ctx, cfg.PodNamespace, cfg.PodName); err == nil {
			break
		}
		time.Sleep(time.Second)
	}
	if err != nil {
		// Unknown: keeping everything in place fails closed.
		log.Warn("cannot tell uninstall from restart; leaving amber installed", logkey.Error, err)
		return nil
	}
	if !removed {
		log.Info("agent stopping for a restart; capture stays in place")
		return nil
	}
	log.Info("daemonset removed: uninstalling amber from the node")
	var errs []error
	if !cfg.CNI.SkipInstall {
		errs = append(errs, cniinstall.Uninstall(cfg.CNI.Install))
	}
	errs = append(errs, os.Remove(cfg.CNI.APIAccessFile))
	if q, err := host.Quarantined(); err == nil {
		errs = append(errs, host.Unquarantine(q))
	}
	errs = append(errs, bpf.Uninstall(bpf.Config{PinRoot: cfg.PinRoot}), hostnet.Remove(hostnet.Config{}))
	var out []error
	for _, e := range errs {
		if e != nil && !errors.Is(e, os.ErrNotExist) {
			out = append(out, e)
		}
	}
	return errors.Join(out...)
}
