// Command amber-ztunnel is amber's ztunnel: the node proxy that carries
// captured pod traffic over HBONE. Flags map onto tunnel.Config.
package main

import (
	"context"
	"flag"
	"fmt"
	"net/netip"
	"os"
	"time"

	"github.com/amber-mesh/amber/bpf"
	"github.com/amber-mesh/amber/internal/cli"
	"github.com/amber-mesh/amber/tunnel"
)

func main() {
	// A performance setting: without it the proxy still works, slower
	// per connection.
	if err := cli.KeepMonitorAwake(); err != nil {
		fmt.Fprintln(os.Stderr, "amber-ztunnel: warning:", err)
	}
	if err := run(os.Args[1:]); err != nil {
		fmt.Fprintln(os.Stderr, "amber-ztunnel:", err)
		os.Exit(1)
	}
}

func run(args []string) error {
	fs := flag.NewFlagSet("amber-ztunnel", flag.ContinueOnError)
	var cfg tunnel.Config
	var nodeIP, logFormat, logLevel string
	var outbound, inbound, hbonePort, admin, metricsPort, readiness uint
	fs.StringVar(&cfg.NodeName, "node-name", os.Getenv("NODE_NAME"), "node whose workloads this ztunnel serves (empty: all)")
	fs.StringVar(&cfg.TrustDomain, "trust-domain", "cluster.local", "mesh trust domain")
	fs.StringVar(&cfg.LocalConfig, "local-config", "", "local mode: mesh YAML file served by an in-process xDS server")
	fs.StringVar(&cfg.CADir, "ca-dir", "", "local mode: directory of the local CA (created if empty)")
	fs.StringVar(&cfg.XDSAddress, "xds-address", "", "istiod xDS address, e.g. istiod.istio-system.svc:15012")
	fs.StringVar(&cfg.CAAddress, "ca-address", "", "istiod CA address (default: -xds-address)")
	fs.StringVar(&cfg.RootCertFile, "root-cert", "", "mesh root certificates (PEM) for istiod mode")
	fs.StringVar(&cfg.TokenFile, "token-file", "", "service-account token sent to istiod")
	fs.StringVar(&cfg.ClusterID, "cluster-id", "", "cluster id sent to istiod (default Kubernetes)")
	fs.StringVar(&cfg.ServerName, "istiod-server-name", "", "name istiod's certificate is verified against (default: the host of -xds-address)")
	fs.StringVar(&cfg.PodName, "pod-name", os.Getenv("POD_NAME"), "this ztunnel's pod name (sent to istiod)")
	fs.StringVar(&cfg.PodNamespace, "pod-namespace", os.Getenv("POD_NAMESPACE"), "this ztunnel's namespace (sent to istiod)")
	fs.StringVar(&nodeIP, "node-ip", os.Getenv("INSTANCE_IP"), "this ztunnel's IP (sent to istiod)")
	fs.StringVar(&cfg.PinRoot, "pin-root", bpf.DefaultPinRoot, "bpffs directory of the datapath's pins")
	fs.BoolVar(&cfg.NoCapture, "no-capture", false, "do not register listeners in the datapath")
	fs.DurationVar(&cfg.DrainTimeout, "drain-timeout", 5*time.Second, "on SIGTERM, serve open connections this long (new ones wait for the next ztunnel); negative: no drain")
	fs.UintVar(&outbound, "outbound-port", 0, "outbound listener port (0: 15001)")
	fs.UintVar(&inbound, "inbound-port", 0, "inbound plaintext listener port (0: 15006)")
	fs.UintVar(&hbonePort, "hbone-port", 0, "HBONE listener port (0: 15008)")
	fs.UintVar(&admin, "admin-port", 0, "admin port on 127.0.0.1 (0: 15000)")
	fs.UintVar(&metricsPort, "metrics-port", 0, "metrics port (0: 15020)")
	fs.UintVar(&readiness, "readiness-port", 0, "readiness port (0: 15021)")
	fs.DurationVar(&cfg.Handshakes.HelloTimeout, "hbone-hello-timeout", 0, "HBONE: reset a connection that sends nothing for this long (0: 2s)")
	fs.IntVar(&cfg.Handshakes.MaxHandshakes, "hbone-max-handshakes", 0, "HBONE: connections in their TLS handshake or before their HTTP/2 preface at once; more are reset (0: 4096, negative: no bound)")
	fs.IntVar(&cfg.Handshakes.MaxHandshakesPerSource, "hbone-max-handshakes-per-source", 0, "HBONE: the same per client address (0: 256, negative: no bound)")
	fs.StringVar(&logFormat, "log-format", "text", "log format: text or json")
	fs.StringVar(&logLevel, "log-level", "info", "log level: debug, info, warn, error")
	if err := fs.Parse(args); err != nil {
		return err
	}
	for _, p := range []struct {
		v   uint
		dst *uint16
	}{{outbound, &cfg.Ports.Outbound}, {inbound, &cfg.Ports.Inbound}, {hbonePort, &cfg.Ports.HBONE}, {admin, &cfg.Ports.Admin}, {metricsPort, &cfg.Ports.Metrics}, {readiness, &cfg.Ports.Readiness}} {
		if p.v > 65535 {
			return fmt.Errorf("port %d out of range", p.v)
		}
		*p.dst = uint16(p.v)
	}
	if nodeIP != "" {
		a, err := netip.ParseAddr(nodeIP)
		if err != nil {
			return fmt.Errorf("-node-ip: %w", err)
		}
		cfg.NodeIP = a
	}
	logger, err := cli.Logger(logFormat, logLevel)
	if err != nil {
		return err
	}
	cfg.Logger = logger
	return cli.RunUntilSignal(func(ctx context.Context) error { return tunnel.Run(ctx, cfg) })
}
