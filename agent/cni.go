package agent

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/amber-mesh/amber/agent/capture"
	"github.com/amber-mesh/amber/agent/cniapi"
	"github.com/amber-mesh/amber/agent/cniinstall"
	"github.com/amber-mesh/amber/agent/kube"
	"github.com/amber-mesh/amber/internal/logkey"
)

// cniHandler answers the plugin: enrolment is decided on the pod and
// namespace read live from the API server, never on a possibly stale
// cache alone.
type cniHandler struct {
	kube    *kube.Client
	ctl     *capture.Controller
	metrics *prometheus.CounterVec
	log     *slog.Logger
}

func (h *cniHandler) Add(ctx context.Context, req *cniapi.AddRequest) (resp *cniapi.AddResponse, err error) {
	defer func() {
		result := "captured"
		switch {
		case err != nil:
			result = "error"
		case !resp.Captured:
			result = "outside_mesh"
		}
		h.metrics.WithLabelValues("add", result).Inc()
	}()
	pod, err := h.kube.Pod(ctx, req.PodNamespace, req.PodName)
	if err != nil {
		return nil, err
	}
	if req.PodUID != "" && pod.UID != req.PodUID {
		return nil, fmt.Errorf("pod %s/%s: API server has UID %s, the sandbox is for %s", req.PodNamespace, req.PodName, pod.UID, req.PodUID)
	}
	ns, err := h.kube.Namespace(ctx, req.PodNamespace)
	if err != nil {
		return nil, err
	}
	res, err := h.ctl.AddSandbox(ctx, pod, ns, capture.Sandbox{
		ContainerID: req.ContainerID, NetNS: req.NetNS, IfName: req.IfName, Addrs: req.IPs,
	})
	if err != nil {
		h.log.Warn("cni add refused", "pod", pod.Key(), logkey.Error, err)
		return nil, err
	}
	h.log.Debug("cni add", "pod", pod.Key(), "captured", res.Captured, "reason", res.Reason, "veth", res.Veth.Name)
	return &cniapi.AddResponse{Captured: res.Captured, Reason: string(res.Reason), Veth: res.Veth.Name}, nil
}

func (h *cniHandler) Del(ctx context.Context, req *cniapi.DelRequest) error {
	err := h.ctl.DelSandbox(ctx, req.PodUID, req.ContainerID)
	result := "ok"
	if err != nil {
		result = "error"
	}
	h.metrics.WithLabelValues("del", result).Inc()
	return err
}

// keepAPIAccess writes the plugin's API access file and rewrites it when
// the credentials change (projected service-account tokens rotate).
func keepAPIAccess(ctx context.Context, kc *kube.Client, path string, log *slog.Logger) error {
	var last cniapi.APIAccess
	for {
		a, err := kc.APIAccess()
		if err != nil {
			log.Warn("api access for the cni plugin", logkey.Error, err)
		} else if a.Token != last.Token || string(a.CertData) != string(last.CertData) || a.Server != last.Server {
			if err := cniapi.WriteAPIAccess(path, a); err != nil {
				log.Warn("write api access for the cni plugin", logkey.Error, err)
			} else {
				last = a
			}
		}
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(time.Minute):
		}
	}
}

// keepInstalled installs amber-cni and re-chains it whenever the node's
// configuration is rewritten (a primary CNI restarting often rewrites its
// file), checking every few seconds.
func keepInstalled(ctx context.Context, cfg Config, installed *readyFlag, log *slog.Logger) error {
	ic := cfg.CNI.Install
	ic.Plugin = map[string]any{
		"agentSocket":   cfg.CNI.Socket,
		"apiAccessFile": cfg.CNI.APIAccessFile,
	}
	if cfg.PinRoot != "" {
		ic.Plugin["pinRoot"] = cfg.PinRoot
	}
	if len(cfg.ExcludeNamespaces) > 0 {
		ic.Plugin["excludeNamespaces"] = cfg.ExcludeNamespaces
	}
	var lastErr string
	for {
		path, err := cniinstall.Install(ic)
		switch {
		case err == nil:
			if !installed.get() {
				log.Info("cni plugin chained", "conf", path)
			}
			installed.set()
			lastErr = ""
		case err.Error() != lastErr:
			lastErr = err.Error()
			if errors.Is(err, cniinstall.ErrNoConfig) {
				log.Info("waiting for the node's CNI configuration", logkey.Error, err)
			} else {
				log.Warn("install cni plugin", logkey.Error, err)
			}
		}
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(5 * time.Second):
		}
	}
}
