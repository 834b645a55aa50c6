// Package agent runs amber's node agent: it loads the datapath, attaches
// it to the node's uplinks and pod veths, keeps pod membership in step
// with the Kubernetes API server, answers the amber-cni plugin, installs
// that plugin into the node's CNI configuration, and serves metrics and
// readiness.
package agent

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/amber-mesh/amber/agent/capture"
	"github.com/amber-mesh/amber/agent/cniapi"
	"github.com/amber-mesh/amber/agent/cniinstall"
	"github.com/amber-mesh/amber/agent/enrol"
	"github.com/amber-mesh/amber/agent/kube"
	"github.com/amber-mesh/amber/bpf"
	"github.com/amber-mesh/amber/bpf/hostnet"
	"github.com/amber-mesh/amber/internal/supervise"
)

// DefaultMetricsAddr serves /metrics and /readyz (istio-cni's monitoring
// port; the ztunnel beside the agent uses 15020 and 15021).
const DefaultMetricsAddr = ":15014"

// Config configures Run. NodeName is required; every other zero value is
// the production setting.
type Config struct {
	// NodeName is the node whose pods this agent captures.
	NodeName string
	// Kubeconfig is a kubeconfig file. Zero means in-cluster.
	Kubeconfig string
	// PinRoot is the bpffs directory of the datapath. Zero means
	// bpf.DefaultPinRoot.
	PinRoot string
	// MaxPods is the membership capacity. Zero means bpf.DefaultMaxPods.
	MaxPods int
	// Uplinks are the interfaces that receive other nodes' traffic. Zero
	// means the interfaces of the node's default routes (IPv4 and IPv6).
	Uplinks []string
	// ExcludeNamespaces are never captured. Zero means none.
	ExcludeNamespaces []string
	// CNI configures the plugin API and installation.
	CNI CNIConfig
	// MetricsAddr serves /metrics and /readyz. Zero means
	// DefaultMetricsAddr.
	MetricsAddr string
	// PodName and PodNamespace are the agent's own pod, used on shutdown
	// to tell an uninstall from a restart. Zero means never uninstall.
	PodName, PodNamespace string
	// Resync is the period of full reconciliations. Zero means a minute.
	Resync time.Duration
	// Logger; nil means slog.Default().
	Logger *slog.Logger
}

// CNIConfig configures the plugin side.
type CNIConfig struct {
	// Socket is the agent's API socket. Zero means cniapi.DefaultSocket.
	Socket string
	// APIAccessFile is written for the plugin's agent-less fallback.
	// Zero means cniapi.DefaultAPIAccess.
	APIAccessFile string
	// SkipInstall leaves the node's CNI configuration alone (the plugin
	// is installed by other means, or tests invoke it directly). Zero
	// means install and keep it chained.
	SkipInstall bool
	// Install says where the binary and configuration go; see
	// cniinstall.Config for the zero values.
	Install cniinstall.Config
}

// Run runs the agent until ctx is done. It returns the first failure of a
// part, or else why ctx ended.
func Run(ctx context.Context, cfg Config) (err error) {
	if cfg.NodeName == "" {
		return errors.New("agent: NodeName is required")
	}
	log := cfg.Logger
	if log == nil {
		log = slog.Default()
	}
	if cfg.MetricsAddr == "" {
		cfg.MetricsAddr = DefaultMetricsAddr
	}
	if cfg.CNI.Socket == "" {
		cfg.CNI.Socket = cniapi.DefaultSocket
	}
	if cfg.CNI.APIAccessFile == "" {
		cfg.CNI.APIAccessFile = cniapi.DefaultAPIAccess
	}
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))

	// Each part is registered as it is set up and stopped in reverse
	// order: the datapath and the host are closed after every task has
	// returned and the uninstall check has run (package supervise).
	parent := ctx
	g, ctx := supervise.New(ctx)
	defer func() { err = errors.Join(err, g.Stop()) }()

	host, err := capture.OpenHost(capture.HostConfig{})
	if err != nil {
		return err
	}
	g.Defer("host", host.Close)
	if err := hostnet.Ensure(hostnet.Config{}); err != nil {
		return err
	}
	bcfg := bpf.Config{PinRoot: cfg.PinRoot, MaxPods: cfg.MaxPods}
	dp, err := bpf.Load(bcfg)
	if err != nil {
		return err
	}
	g.Defer("datapath", dp.Close)
	if err := adoptLinks(dp, log); err != nil {
		return err
	}
	// The node's listener lookups, before the uplinks bring other nodes'
	// connections (a SYN on a 4-tuple in TIME_WAIT needs it).
	if err := dp.Attach(0, bpf.RoleNode); err != nil {
		return err
	}
	if err := attachUplinks(dp, cfg.Uplinks, log); err != nil {
		return err
	}

	kc, err := kube.New(kube.Config{Kubeconfig: cfg.Kubeconfig, NodeName: cfg.NodeName, Logger: log})
	if err != nil {
		return err
	}
	capacity := cfg.MaxPods
	if capacity <= 0 {
		capacity = bpf.DefaultMaxPods
	}
	ctl, err := capture.New(capture.Config{
		Datapath:   dp,
		Host:       host,
		Reporter:   kc,
		Rules:      enrol.Rules{ExcludeNamespaces: cfg.ExcludeNamespaces},
		Capacity:   capacity,
		Resync:     cfg.Resync,
		Registerer: reg,
		Logger:     log,
	})
	if err != nil {
		return err
	}
	reg.MustRegister(capture.MapCollector{Datapath: dp, Capacity: capacity})
	cniMetrics := prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "amber_agent_cni_requests_total", Help: "CNI requests answered, by command and result.",
	}, []string{"command", "result"})
	reg.MustRegister(cniMetrics)

	// Both listeners before anything runs: a failure here returns with
	// nothing left behind.
	cniLn, err := cniapi.Listen(cfg.CNI.Socket)
	if err != nil {
		return err
	}
	mln, err := net.Listen("tcp", cfg.MetricsAddr)
	if err != nil {
		cniLn.Close()
		return fmt.Errorf("metrics listener: %w", err)
	}

	// Nothing below fails: the uninstall check runs only for an agent
	// that ran, after its tasks stopped.
	if cfg.PodName != "" && cfg.PodNamespace != "" {
		g.Defer("uninstall", func() error { return uninstallIfRemoved(kc, cfg, host, log) })
	}
	g.Go("capture", ctl.Run)
	g.Go("kubernetes", func(ctx context.Context) error { return kc.Run(ctx, ctl) })

	cniSrv := &http.Server{Handler: cniapi.Handle(&cniHandler{kube: kc, ctl: ctl, metrics: cniMetrics, log: log}), ReadHeaderTimeout: 10 * time.Second}
	serve(g, "cni server", cniSrv, cniLn)

	var installed readyFlag
	if cfg.CNI.SkipInstall {
		installed.set()
	}
	g.Go("api access", func(ctx context.Context) error { return keepAPIAccess(ctx, kc, cfg.CNI.APIAccessFile, log) })
	if !cfg.CNI.SkipInstall {
		g.Go("cni install", func(ctx context.Context) error { return keepInstalled(ctx, cfg, &installed, log) })
	}
	g.Go("pruner", func(ctx context.Context) error { return pruneLinks(ctx, dp, cfg.Resync) })

	ready := func() bool { return ctl.Ready() && installed.get() }
	mux := http.NewServeMux()
	mux.Handle("/metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{}))
	mux.HandleFunc("/readyz", func(w http.ResponseWriter, _ *http.Request) {
		if !ready() {
			http.Error(w, "not ready", http.StatusServiceUnavailable)
			return
		}
		w.Write([]byte("ok\n"))
	})
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) { w.Write([]byte("ok\n")) })
	msrv := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	serve(g, "metrics server", msrv, mln)
	log.Info("agent started", "node", cfg.NodeName, "metrics", mln.Addr().String(), "cni_socket", cfg.CNI.Socket, "pin_root", dp.PinRoot(), "capacity", capacity)

	if err := g.Wait(); err != nil {
		return err
	}
	if err := g.Stop(); err != nil {
		return err
	}
	return context.Cause(parent)
}

// serve runs srv on ln in g; stopping shuts it down gracefully, for up
// to 5 s.
func serve(g *supervise.Group, name string, srv *http.Server, ln net.Listener) {
	g.Go(name, func(context.Context) error {
		if err := srv.Serve(ln); !errors.Is(err, http.ErrServerClosed) {
			return err
		}
		return nil
	})
	g.Defer(name, func() error {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		return srv.Shutdown(ctx)
	})
}
