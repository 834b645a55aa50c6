// Command amber-agent is amber's node agent: it keeps the eBPF datapath in
// step with mesh membership from the Kubernetes API server and answers the
// amber-cni plugin. Flags map onto agent.Config.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"strings"

	"github.com/amber-mesh/amber/agent"
	"github.com/amber-mesh/amber/agent/cniapi"
	"github.com/amber-mesh/amber/bpf"
	"github.com/amber-mesh/amber/internal/cli"
)

func main() {
	if err := run(os.Args[1:]); err != nil {
		fmt.Fprintln(os.Stderr, "amber-agent:", err)
		os.Exit(1)
	}
}

func run(args []string) error {
	fs := flag.NewFlagSet("amber-agent", flag.ContinueOnError)
	var cfg agent.Config
	var uplinks, exclude, logFormat, logLevel string
	fs.StringVar(&cfg.NodeName, "node-name", os.Getenv("NODE_NAME"), "node whose pods this agent captures")
	fs.StringVar(&cfg.Kubeconfig, "kubeconfig", "", "kubeconfig file (default: in-cluster)")
	fs.StringVar(&cfg.PinRoot, "pin-root", bpf.DefaultPinRoot, "bpffs directory of the datapath's pins")
	fs.IntVar(&cfg.MaxPods, "max-pods", bpf.DefaultMaxPods, "membership capacity: pods captured at once on this node")
	fs.StringVar(&uplinks, "uplinks", "", "comma-separated uplink interfaces (default: those of the default routes)")
	fs.StringVar(&exclude, "exclude-namespaces", "", "comma-separated namespaces never captured")
	fs.StringVar(&cfg.CNI.Socket, "cni-socket", cniapi.DefaultSocket, "unix socket the amber-cni plugin calls")
	fs.StringVar(&cfg.CNI.APIAccessFile, "cni-api-access", cniapi.DefaultAPIAccess, "API-server access file written for the plugin's agent-less fallback")
	fs.BoolVar(&cfg.CNI.SkipInstall, "cni-skip-install", false, "do not install amber-cni into the node's CNI configuration")
	fs.StringVar(&cfg.CNI.Install.BinDir, "cni-bin-dir", "/opt/cni/bin", "node directory receiving the plugin binary")
	fs.StringVar(&cfg.CNI.Install.ConfDir, "cni-conf-dir", "/etc/cni/net.d", "node directory of CNI network configurations")
	fs.StringVar(&cfg.CNI.Install.ConfFile, "cni-conf-file", "", "configuration to chain into (default: the first, as the runtime picks it)")
	fs.StringVar(&cfg.CNI.Install.Source, "cni-plugin", "", "plugin binary to install (default: amber-cni next to this binary)")
	fs.StringVar(&cfg.MetricsAddr, "metrics-addr", agent.DefaultMetricsAddr, "address serving /metrics and /readyz")
	fs.StringVar(&cfg.PodName, "pod-name", os.Getenv("POD_NAME"), "this agent's pod (to tell an uninstall from a restart)")
	fs.StringVar(&cfg.PodNamespace, "pod-namespace", os.Getenv("POD_NAMESPACE"), "this agent's namespace")
	fs.DurationVar(&cfg.Resync, "resync", 0, "period of full reconciliations (default 1m)")
	fs.StringVar(&logFormat, "log-format", "text", "log format: text or json")
	fs.StringVar(&logLevel, "log-level", "info", "log level: debug, info, warn, error")
	if err := fs.Parse(args); err != nil {
		return err
	}
	cfg.Uplinks = splitList(uplinks)
	cfg.ExcludeNamespaces = splitList(exclude)
	logger, err := cli.Logger(logFormat, logLevel)
	if err != nil {
		return err
	}
	cfg.Logger = logger
	return cli.RunUntilSignal(func(ctx context.Context) error { return agent.Run(ctx, cfg) })
}

func splitList(s string) []string {
	var out []string
	for _, f := range strings.Split(s, ",") {
		if f = strings.TrimSpace(f); f != "" {
			out = append(out, f)
		}
	}
	return out
}
