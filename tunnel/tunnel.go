// Package tunnel runs amber's ztunnel: it wires the xDS client (against
// istiod, or an in-process server reading a local mesh file), the CA, the
// certificate manager and the data plane's listeners, and serves metrics,
// readiness and the admin endpoint.
package tunnel

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/pprof"
	"net/netip"
	"os"
	"strconv"
	"sync/atomic"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/amber-mesh/amber/bpf"
	"github.com/amber-mesh/amber/internal/logkey"
	"github.com/amber-mesh/amber/internal/supervise"
	"github.com/amber-mesh/amber/tunnel/ca"
	"github.com/amber-mesh/amber/tunnel/certs"
	"github.com/amber-mesh/amber/tunnel/hbone"
	"github.com/amber-mesh/amber/tunnel/metrics"
	"github.com/amber-mesh/amber/tunnel/proxy"
	"github.com/amber-mesh/amber/tunnel/sockopt"
	"github.com/amber-mesh/amber/xds/client"
	"github.com/amber-mesh/amber/xds/server"
	"github.com/amber-mesh/amber/xds/state"
)

// Sentinel errors.
var (
	ErrNoControlPlane = errors.New("ztunnel: set LocalConfig (local mode) or XDSAddress (istiod)")
	ErrNoCA           = errors.New("ztunnel: set CADir (local CA) or CAAddress with RootCertFile (istiod)")
)

// Ports are the ztunnel's ports. Zero fields mean Istio's defaults.
type Ports struct {
	Outbound  uint16 // zero: 15001
	Inbound   uint16 // zero: 15006
	HBONE     uint16 // zero: 15008; also the port dialled at other pods
	Admin     uint16 // zero: 15000 (127.0.0.1 only)
	Metrics   uint16 // zero: 15020
	Readiness uint16 // zero: 15021
}

func (p Ports) withDefaults() Ports {
	def := func(v *uint16, d uint16) {
		if *v == 0 {
			*v = d
		}
	}
	def(&p.Outbound, proxy.DefaultOutboundPort)
	def(&p.Inbound, proxy.DefaultInboundPort)
	def(&p.HBONE, proxy.DefaultHBONEPort)
	def(&p.Admin, proxy.DefaultAdminPort)
	def(&p.Metrics, proxy.DefaultMetricsPort)
	def(&p.Readiness, proxy.DefaultReadinessPort)
	return p
}

// Config configures Run. Exactly one control plane (LocalConfig or
// XDSAddress) and one CA (CADir or CAAddress) must be set.
type Config struct {
	// NodeName selects the workloads this ztunnel serves. Zero means every
	// workload is local (a single-node mesh).
	NodeName string
	// TrustDomain of the mesh. Zero means "cluster.local".
	TrustDomain string

	// LocalConfig is a mesh file (format in package xds/server) served by
	// an in-process xDS server on loopback, consumed by the same xDS
	// client as with istiod. Zero means istiod mode.
	LocalConfig string
	// CADir holds a local CA (ca.OpenLocal; created when empty). Zero
	// means istiod's CA.
	CADir string

	// XDSAddress is istiod's xDS endpoint ("istiod.istio-system.svc:15012").
	// Used when LocalConfig is empty.
	XDSAddress string
	// CAAddress is istiod's CA endpoint. Zero means XDSAddress.
	CAAddress string
	// RootCertFile holds the mesh root certificates in PEM, to verify
	// istiod and peers. Required in istiod mode.
	RootCertFile string
	// TokenFile holds the bearer token (audience istio-ca) sent to istiod.
	// Zero means none.
	TokenFile string
	// ClusterID is sent to istiod (xDS and CA) as the "clusterid" header.
	// Zero means ca.DefaultClusterID ("Kubernetes", Istio's default).
	ClusterID string
	// ServerName is the name istiod's serving certificate is verified
	// against (istiod's is issued for "istiod.istio-system.svc"). Zero
	// means the host of XDSAddress (CAAddress for the CA).
	ServerName string
	// PodName, PodNamespace and NodeIP identify this ztunnel to istiod.
	// Zero values are sent as such (the local server ignores them).
	PodName, PodNamespace string
	NodeIP                netip.Addr

	// PinRoot is where the datapath's maps are pinned. Zero means
	// bpf.DefaultPinRoot.
	PinRoot string
	// NoCapture skips registering the listeners in the datapath's listener
	// map and reading its counters (running without the node agent,
	// behind nftables TPROXY, or in tests). False means registration is
	// required and failing it is fatal.
	NoCapture bool
	// DrainTimeout bounds how long a stopping ztunnel serves the
	// connections it has (after taking its listeners out of the datapath,
	// so that new connections wait for the next ztunnel) before closing
	// what is left. Zero means 5 s; negative means no drain.
	DrainTimeout time.Duration
	// Ports; see Ports for the zero values.
	Ports Ports
	// Sockets are the options of the data plane's sockets. The zero value
	// is production: bypass mark and transparent sockets.
	Sockets sockopt.Options
	// CertTTL is the lifetime asked for workload certificates. Zero means
	// certs.DefaultTTL.
	CertTTL time.Duration
	// Handshakes bound unauthenticated connections on the HBONE port: the
	// time to the first TLS record, and how many may be in their TLS
	// handshake or before their HTTP/2 preface at once, in all and per
	// source address. The zero value is hbone's defaults (2 s, 4096, 256
	// per source); README, "Security bounds".
	Handshakes hbone.HandshakeLimits
	// Logger receives logs and the access log. Nil means slog.Default().
	Logger *slog.Logger
	// Ready, if set, is called once when the ztunnel becomes ready
	// (listeners registered and the first xDS sync applied).
	Ready func()
}

// Run runs the ztunnel until ctx is done; it then drains, stops
// everything and returns nil, or the first error that stopped it earlier.
func Run(ctx context.Context, cfg Config) (err error) {
	log := cfg.Logger
	if log == nil {
		log = slog.Default()
	}
	if cfg.TrustDomain == "" {
		cfg.TrustDomain = state.DefaultTrustDomain
	}
	if cfg.PinRoot == "" {
		cfg.PinRoot = bpf.DefaultPinRoot
	}
	cfg.Ports = cfg.Ports.withDefaults()

	// Each part is registered as it is set up and stopped in reverse
	// order: a closer is called once every task registered after it has
	// returned (package supervise).
	g, ctx := supervise.New(ctx)
	defer func() { err = errors.Join(err, g.Stop()) }()

	caClient, err := newCA(cfg)
	if err != nil {
		return err
	}
	if c, ok := caClient.(io.Closer); ok {
		g.Defer("ca", c.Close)
	}
	mgr := &certs.Manager{CA: caClient, TTL: cfg.CertTTL, Logger: log}
	g.Defer("certificates", mgr.Close)

	store := state.NewStore()
	conn, err := dialControlPlane(g, cfg, log)
	if err != nil {
		return err
	}
	xc, err := client.New(client.Config{
		Conn:   conn,
		Store:  store,
		Logger: log,
		Node:   client.Node{IP: cfg.NodeIP, PodName: cfg.PodName, PodNamespace: cfg.PodNamespace},
	})
	if err != nil {
		return fmt.Errorf("xds client: %w", err)
	}
	g.Go("xds client", func(ctx context.Context) error { return unless(xc.Run(ctx), client.ErrClosed) })
	g.Defer("xds client", xc.Close)

	lns, err := listenData(ctx, cfg, log)
	if err != nil {
		return err
	}
	g.Defer("data listeners", lns.Close)
	var captured func(netip.Addr) bool
	if !cfg.NoCapture {
		m := &membership{root: cfg.PinRoot, log: log}
		g.Defer("membership map", m.Close)
		captured = m.captured
	}
	reg := metrics.New()
	px, err := proxy.New(proxy.Config{
		Store:       store,
		Certs:       mgr,
		TrustDomain: cfg.TrustDomain,
		NodeName:    cfg.NodeName,
		Metrics:     reg,
		Logger:      log,
		Sockets:     cfg.Sockets,
		HBONEPort:   cfg.Ports.HBONE,
		Captured:    captured,
		Handshakes:  cfg.Handshakes,
		// istiod describes a new pod a moment after the agent captured it.
		WorkloadWait:  5 * time.Second,
		ReservedPorts: []uint16{cfg.Ports.Outbound, cfg.Ports.Inbound, cfg.Ports.Admin, cfg.Ports.Metrics, cfg.Ports.Readiness},
	})
	if err != nil {
		return err
	}
	// The accept loops end when the proxy closes their listeners: they
	// are registered before its closer.
	for _, dl := range lns {
		serve := dl.handler(px)
		for _, ln := range dl.sockets() {
			g.Go(dl.role.String()+" listener", func(context.Context) error { return unless(serve(ln), proxy.ErrClosed) })
		}
	}
	g.Defer("proxy", px.Close)
	if err := registerMetrics(reg, cfg, px, mgr, xc); err != nil {
		return err
	}
	if !cfg.NoCapture {
		if err := lns.register(ctx, cfg.PinRoot, log); err != nil {
			return err
		}
		log.Info("listeners registered in the datapath", logkey.PinRoot, cfg.PinRoot)
	}

	var ready atomic.Bool
	g.Go("readiness", func(ctx context.Context) error {
		select {
		case <-xc.Synced():
			ready.Store(true)
			log.Info("ztunnel ready", logkey.Node, cfg.NodeName)
			if cfg.Ready != nil {
				cfg.Ready()
			}
		case <-ctx.Done():
		}
		return nil
	})

	metricsMux := http.NewServeMux()
	metricsMux.Handle("/metrics", reg.Handler())
	metricsMux.Handle("/stats/prometheus", reg.Handler())
	readyMux := http.NewServeMux()
	readyMux.HandleFunc("/healthz/ready", func(w http.ResponseWriter, _ *http.Request) {
		if !ready.Load() {
			http.Error(w, "not ready", http.StatusServiceUnavailable)
			return
		}
		w.Write([]byte("ready\n"))
	})
	adminMux := http.NewServeMux()
	adminMux.Handle("/config_dump", &configDump{store: store, proxy: px, certs: mgr, xds: xc})
	// Go's profiles, where Istio's ztunnel serves its own: admin is
	// loopback only.
	adminMux.HandleFunc("/debug/pprof/", pprof.Index)
	adminMux.HandleFunc("/debug/pprof/profile", pprof.Profile)
	adminMux.HandleFunc("/debug/pprof/trace", pprof.Trace)
	for _, s := range []struct {
		addr string
		h    http.Handler
	}{
		{"[::]:" + strconv.Itoa(int(cfg.Ports.Metrics)), metricsMux},
		{"[::]:" + strconv.Itoa(int(cfg.Ports.Readiness)), readyMux},
		{"127.0.0.1:" + strconv.Itoa(int(cfg.Ports.Admin)), adminMux},
	} {
		ln, err := (&net.ListenConfig{}).Listen(ctx, "tcp", s.addr)
		if err != nil {
			return fmt.Errorf("listen %s: %w", s.addr, err)
		}
		hs := &http.Server{Handler: s.h, ReadHeaderTimeout: 10 * time.Second}
		g.Go("http "+s.addr, func(context.Context) error { return unless(hs.Serve(ln), http.ErrServerClosed) })
		g.Defer("http "+s.addr, hs.Close)
	}

	if err := g.Wait(); err != nil {
		return err
	}
	drain(cfg, px, lns, log)
	return nil
}

// unless is err, or nil if err is sentinel: what a part returns once it
// was closed.
func unless(err, sentinel error) error {
	if errors.Is(err, sentinel) {
		return nil
	}
	return err
}

func newCA(cfg Config) (ca.Client, error) {
	switch {
	case cfg.CADir != "":
		return ca.OpenLocal(cfg.CADir, cfg.TrustDomain)
	case cfg.CAAddress != "" || cfg.XDSAddress != "":
		if cfg.RootCertFile == "" {
			return nil, ErrNoCA
		}
		root, err := os.ReadFile(cfg.RootCertFile)
		if err != nil {
			return nil, fmt.Errorf("read root cert: %w", err)
		}
		addr := cfg.CAAddress
		if addr == "" {
			addr = cfg.XDSAddress
		}
		return ca.NewIstio(ca.IstioConfig{Address: addr, ServerName: cfg.ServerName, RootPEM: root, TokenFile: cfg.TokenFile, ClusterID: cfg.ClusterID})
	}
	return nil, ErrNoCA
}

// dialControlPlane returns the gRPC channel of the xDS client: to an
// in-process server on loopback in local mode, to istiod over TLS
// otherwise.
func dialControlPlane(g *supervise.Group, cfg Config, log *slog.Logger) (*grpc.ClientConn, error) {
	var cc *grpc.ClientConn
	switch {
	case cfg.LocalConfig != "":
		srv, err := server.New(server.Config{File: cfg.LocalConfig, Logger: log})
		if err != nil {
			return nil, fmt.Errorf("local xds server: %w", err)
		}
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return nil, fmt.Errorf("local xds server: %w", err)
		}
		g.Go("local xds server", func(ctx context.Context) error { return unless(srv.Serve(ctx, ln), server.ErrClosed) })
		g.Defer("local xds server", srv.Close)
		if cc, err = grpc.NewClient("passthrough:///"+ln.Addr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()), ca.Reconnect); err != nil {
			return nil, fmt.Errorf("xds channel: %w", err)
		}
	case cfg.XDSAddress != "":
		if cfg.RootCertFile == "" {
			return nil, ErrNoCA
		}
		root, err := os.ReadFile(cfg.RootCertFile)
		if err != nil {
			return nil, fmt.Errorf("read root cert: %w", err)
		}
		roots, err := ca.ParseRoots(root)
		if err != nil {
			return nil, fmt.Errorf("root cert %s: %w", cfg.RootCertFile, err)
		}
		// The token is re-read for every stream: projected tokens rotate
		// in place.
		if cc, err = ca.DialIstiod(cfg.XDSAddress, cfg.ServerName, roots, &ca.TokenCredentials{File: cfg.TokenFile, ClusterID: cfg.ClusterID}); err != nil {
			return nil, fmt.Errorf("xds channel: %w", err)
		}
	default:
		return nil, ErrNoControlPlane
	}
	g.Defer("xds channel", cc.Close)
	return cc, nil
}
