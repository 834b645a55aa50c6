// Package waypoint runs amber-waypoint's control side: the delta-ADS
// stream to istiod as a waypoint node, the waypoint's own certificate
// from istiod's CA, compilation of what istiod sends into the data path,
// and the status ports (readiness, metrics, Envoy's admin for istioctl).
package waypoint

import (
	"cmp"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/http/pprof"
	"os"
	"slices"
	"time"

	"github.com/amber-mesh/amber/internal/supervise"
	"github.com/amber-mesh/amber/tunnel/ca"
	"github.com/amber-mesh/amber/tunnel/certs"
	"github.com/amber-mesh/amber/tunnel/identity"
	"github.com/amber-mesh/amber/tunnel/metrics"
	"github.com/amber-mesh/amber/waypoint/admin"
	"github.com/amber-mesh/amber/waypoint/config"
	"github.com/amber-mesh/amber/waypoint/discovery"
	"github.com/amber-mesh/amber/waypoint/node"
	"github.com/amber-mesh/amber/waypoint/telemetry"
	"github.com/amber-mesh/amber/xds/client"
	"github.com/amber-mesh/amber/xds/state"
)

// Errors from Run before it starts anything.
var (
	ErrNoXDS      = errors.New("waypoint: no xDS address (istiod's discovery address)")
	ErrNoRoots    = errors.New("waypoint: no root certificate file")
	ErrNoToken    = errors.New("waypoint: no token file (istiod authenticates a waypoint by its own service-account token)")
	ErrNoDataPath = errors.New("waypoint: no data path")
)

// Istio's ports for a waypoint pod (istiod's waypoint template: probes on
// 15021, Prometheus annotations on 15020, the Service's mesh port 15008;
// istioctl reads the admin port 15000 through a port-forward, so loopback
// is enough).
const (
	DefaultHBONEAddr     = "[::]:15008"
	DefaultMetricsAddr   = "[::]:15020"
	DefaultReadinessAddr = "[::]:15021"
	DefaultAdminAddr     = "127.0.0.1:15000"
)

// DefaultDrainTimeout is pilot-agent's terminationDrainDuration default.
const DefaultDrainTimeout = 5 * time.Second

// DataPath is the waypoint's data path (waypoint/proxy): it serves HBONE
// with the last compiled configuration it was given, and refuses traffic
// before the first.
type DataPath interface {
	// Update installs a new configuration. Called from the xDS stream's
	// goroutine, in order; it must not block for long.
	Update(*config.Config)
	// ServeHBONE serves the HBONE listener until Drain, Close or the
	// listener's close, and then returns an error wrapping net.ErrClosed.
	ServeHBONE(net.Listener) error
	// Drain lets open streams finish, until ctx is done.
	Drain(ctx context.Context) error
	// Close stops everything.
	Close() error
}

// DataPathConfig is what Run shares with the data path.
type DataPathConfig struct {
	// Store holds WDS: the workloads istiod sends the waypoint (the
	// destinations' identities, the sources' telemetry labels).
	Store *state.Store
	// Certs holds the waypoint's certificate (Identity).
	Certs *certs.Manager
	// Identity is the waypoint's own SPIFFE identity.
	Identity identity.ID
	// Metrics is the registry served on the metrics port.
	Metrics *metrics.Metrics
	// Logger is Run's logger.
	Logger *slog.Logger
	// Node is the pod Run describes to istiod: a router's data path
	// serves the gateway listeners and reports its own workload as the
	// source of its requests.
	Node node.Node
}

// Self is the node's own workload as Istio's telemetry labels it
// (source_* of a gateway's requests): the workload name istiod gets, the
// canonical service and revision labels (else the app and version
// labels, else the workload and "latest", as istiod's
// labels.CanonicalService does), the cluster.
func (c DataPathConfig) Self() telemetry.Peer {
	n := c.Node
	md, _ := n.Metadata()
	workload := md.GetFields()["WORKLOAD_NAME"].GetStringValue()
	svc := cmp.Or(n.Labels["service.istio.io/canonical-name"], n.Labels["app.kubernetes.io/name"], n.Labels["app"], workload)
	rev := cmp.Or(n.Labels["service.istio.io/canonical-revision"], n.Labels["app.kubernetes.io/version"], n.Labels["version"], "latest")
	return telemetry.Peer{
		Workload: workload, Namespace: n.Namespace, CanonicalService: svc, CanonicalRevision: rev,
		App: cmp.Or(n.Labels["app"], n.Labels["app.kubernetes.io/name"]), Version: cmp.Or(n.Labels["version"], n.Labels["app.kubernetes.io/version"]),
		Cluster: cmp.Or(n.ClusterID, node.ClusterID),
	}
}

// Addresses are the listen addresses of Run's ports.
type Addresses struct {
	HBONE     string // zero: DefaultHBONEAddr
	Metrics   string // zero: DefaultMetricsAddr
	Readiness string // zero: DefaultReadinessAddr
	Admin     string // zero: DefaultAdminAddr
}

// Listeners are listeners already open, served instead of listening on
// Addresses (tests; socket activation). Nil fields are opened.
type Listeners struct {
	HBONE, Metrics, Readiness, Admin net.Listener
}

// Config configures Run.
type Config struct {
	// Node describes the waypoint pod to istiod. Required: Node.Validate.
	Node node.Node
	// ServiceCluster is the node's cluster (pilot-agent's --serviceCluster;
	// istiod's template passes <service account>.<namespace>). Zero means
	// that.
	ServiceCluster string
	// XDSAddress is istiod's discovery address (ProxyConfig
	// discoveryAddress), "istiod.istio-system.svc:15012". Required.
	XDSAddress string
	// CAAddress is istiod's CA (CA_ADDR). Zero means XDSAddress.
	CAAddress string
	// ServerName is the name istiod's certificate is verified against.
	// Zero means the host of each address.
	ServerName string
	// RootCertFile holds the mesh roots in PEM (the istio-ca-root-cert
	// ConfigMap, /var/run/secrets/istio/root-cert.pem). Required.
	RootCertFile string
	// TokenFile holds the pod's projected service-account token (audience
	// istio-ca), read again for every stream and certificate. Required.
	TokenFile string
	// TrustDomain of the mesh. Zero means Node.TrustDomain, else
	// cluster.local.
	TrustDomain string
	// CertTTL is the lifetime asked for the certificate. Zero means
	// certs.DefaultTTL.
	CertTTL time.Duration
	// DrainTimeout bounds the drain after ctx is done. Zero means
	// DefaultDrainTimeout; negative means no drain.
	DrainTimeout time.Duration
	// Listen and Listeners: see their types.
	Listen    Addresses
	Listeners Listeners
	// NewDataPath builds the data path. Required.
	NewDataPath func(DataPathConfig) (DataPath, error)
	// Logger receives logs. Nil means slog.Default().
	Logger *slog.Logger
	// Ready, if set, is called once when the waypoint first becomes ready.
	Ready func()
}

// Identity is the waypoint's SPIFFE identity: its pod's service account
// in the trust domain.
func (c Config) Identity() identity.ID {
	td := cmp.Or(c.TrustDomain, c.Node.TrustDomain, state.DefaultTrustDomain)
	return identity.ID{TrustDomain: td, Namespace: c.Node.Namespace, ServiceAccount: c.Node.ServiceAccount}
}

func (c Config) validate() error {
	switch {
	case c.XDSAddress == "":
		return ErrNoXDS
	case c.RootCertFile == "":
		return ErrNoRoots
	case c.TokenFile == "":
		return ErrNoToken
	case c.NewDataPath == nil:
		return ErrNoDataPath
	}
	if err := c.Node.Validate(); err != nil {
		return fmt.Errorf("waypoint: %w", err)
	}
	return c.Identity().Validate()
}

// Run runs the waypoint until ctx is done, then drains the data path and
// stops; it returns nil, or the error that stopped it earlier.
func Run(ctx context.Context, cfg Config) (err error) {
	if err := cfg.validate(); err != nil {
		return err
	}
	log := cfg.Logger
	if log == nil {
		log = slog.Default()
	}
	id := cfg.Identity()
	clusterID := cmp.Or(cfg.Node.ClusterID, node.ClusterID)
	rootPEM, err := os.ReadFile(cfg.RootCertFile)
	if err != nil {
		return fmt.Errorf("waypoint: %w", err)
	}
	roots, err := ca.ParseRoots(rootPEM)
	if err != nil {
		return fmt.Errorf("waypoint: %s: %w", cfg.RootCertFile, err)
	}
	xdsNode, err := cfg.Node.Proto()
	if err != nil {
		return fmt.Errorf("waypoint: %w", err)
	}
	xdsNode.Cluster = cmp.Or(cfg.ServiceCluster, cfg.Node.ServiceAccount+"."+cfg.Node.Namespace)

	// Each part is registered as it is set up and stopped in reverse
	// order: a closer is called once every task registered after it has
	// returned (package supervise).
	g, ctx := supervise.New(ctx)
	defer func() { err = errors.Join(err, g.Stop()) }()

	// The certificate: the waypoint's own identity, with its own token.
	caClient, err := ca.NewIstio(ca.IstioConfig{
		Address: cmp.Or(cfg.CAAddress, cfg.XDSAddress), ServerName: cfg.ServerName, RootPEM: rootPEM,
		TokenFile: cfg.TokenFile, ClusterID: clusterID, Self: id, SelfOnly: true,
	})
	if err != nil {
		return fmt.Errorf("waypoint: %w", err)
	}
	g.Defer("ca client", caClient.Close)
	mgr := &certs.Manager{CA: caClient, TTL: cfg.CertTTL, Logger: log}
	g.Defer("certificates", mgr.Close)

	store := state.NewStore()
	// The data path registers the istio_* families with an Envoy
	// waypoint's labels; the ztunnel's would clash.
	reg := metrics.NewRegistry()
	dp, err := cfg.NewDataPath(DataPathConfig{Store: store, Certs: mgr, Identity: id, Metrics: reg, Logger: log, Node: cfg.Node})
	if err != nil {
		return fmt.Errorf("waypoint: data path: %w", err)
	}
	// Closed once everything registered below, which feeds it or serves
	// with it, has stopped.
	g.Defer("data path", dp.Close)

	ready := &readiness{onReady: func() {
		log.Info("waypoint ready", "identity", id.String())
		if cfg.Ready != nil {
			cfg.Ready()
		}
	}}
	newSet := discovery.New
	if cfg.Node.IsRouter() {
		newSet = discovery.NewRouter
	}
	set := newSet(func(c *config.Config) {
		dp.Update(c)
		ready.check()
	})
	ready.set = set
	g.Go("certificate", func(ctx context.Context) error {
		if _, err := mgr.Get(ctx, id); err != nil {
			// Get returns the first failure; the manager retries on its
			// own, so wait for a success rather than give up.
			log.Warn("no certificate yet; retrying", "identity", id.String(), "error", err)
			for ctx.Err() == nil {
				if _, err = mgr.Get(ctx, id); err == nil {
					break
				}
				select {
				case <-ctx.Done():
				case <-time.After(time.Second):
				}
			}
			if ctx.Err() != nil {
				return nil
			}
		}
		ready.cert.Store(true)
		ready.check()
		return nil
	})

	// xDS: CDS and LDS, WDS, then EDS by the EDS clusters' names.
	conn, err := ca.DialIstiod(cfg.XDSAddress, cfg.ServerName, roots, &ca.TokenCredentials{File: cfg.TokenFile, ClusterID: clusterID})
	if err != nil {
		return fmt.Errorf("waypoint: xds channel: %w", err)
	}
	g.Defer("xds channel", conn.Close)
	types := set.Types()
	if !cfg.Node.IsRouter() {
		// A router gets no WDS from istiod (pkg/bootstrap/config.go: only
		// with PEER_METADATA_DISCOVERY or ENABLE_HBONE metadata).
		types = slices.Insert(types, 2, client.Workloads(store))
	}
	xc, err := client.New(client.Config{Conn: conn, XDSNode: xdsNode, Types: types, Logger: log})
	if err != nil {
		return fmt.Errorf("waypoint: xds client: %w", err)
	}
	g.Go("xds client", func(ctx context.Context) error { return unless(xc.Run(ctx), client.ErrClosed) })
	g.Defer("xds client", xc.Close)
	if err := registerMetrics(reg, xc, set, mgr); err != nil {
		return fmt.Errorf("waypoint: metrics: %w", err)
	}

	lns, err := listen(ctx, cfg)
	if err != nil {
		return err
	}
	g.Defer("listeners", lns.close)
	if !cfg.Node.IsRouter() {
		// An ingress gateway serves the listeners istiod gives it (the
		// data path opens them) and no HBONE: Envoy gateways do not
		// listen on 15008 either.
		// The HBONE task ends when its listener closes: on Drain, or at
		// Stop, which closes it before waiting for the task.
		g.Go("hbone", func(context.Context) error { return unless(dp.ServeHBONE(lns.HBONE), net.ErrClosed) })
		g.Defer("hbone listener", func() error { return unless(lns.HBONE.Close(), net.ErrClosed) })
	}

	metricsMux := http.NewServeMux()
	metricsMux.Handle("/stats/prometheus", reg.Handler())
	metricsMux.Handle("/metrics", reg.Handler())
	metricsMux.Handle("/healthz/ready", ready) // pilot-agent's status port serves it too
	readyMux := http.NewServeMux()
	readyMux.Handle("/healthz/ready", ready)
	adminMux := http.NewServeMux()
	adminMux.Handle("/", admin.Handler(admin.Source{
		Set: set, Node: xdsNode, Started: time.Now(), RootPEM: rootPEM,
		Certificate: func(ctx context.Context) (*tls.Certificate, error) { return mgr.Get(ctx, id) },
	}))
	adminMux.HandleFunc("/ready", func(w http.ResponseWriter, _ *http.Request) {
		// Envoy's admin /ready: the server state.
		if err := ready.check(); err != nil {
			state := "PRE_INITIALIZING"
			if errors.Is(err, errDraining) {
				state = "DRAINING"
			}
			http.Error(w, state, http.StatusServiceUnavailable)
			return
		}
		w.Write([]byte("LIVE\n"))
	})
	adminMux.Handle("/stats/prometheus", reg.Handler())
	adminMux.HandleFunc("/debug/pprof/", pprof.Index)
	adminMux.HandleFunc("/debug/pprof/profile", pprof.Profile)
	adminMux.HandleFunc("/debug/pprof/trace", pprof.Trace)
	for _, s := range []struct {
		name string
		ln   net.Listener
		h    http.Handler
	}{{"metrics", lns.Metrics, metricsMux}, {"readiness", lns.Readiness, readyMux}, {"admin", lns.Admin, adminMux}} {
		hs := &http.Server{Handler: s.h, ReadHeaderTimeout: 10 * time.Second}
		g.Go(s.name+" server", func(context.Context) error { return unless(hs.Serve(s.ln), http.ErrServerClosed) })
		g.Defer(s.name+" server", hs.Close)
	}
	hboneAddr := "none (router)"
	if lns.HBONE != nil {
		hboneAddr = lns.HBONE.Addr().String()
	}
	log.Info("waypoint started", "identity", id.String(), "node", xdsNode.GetId(), "xds", cfg.XDSAddress,
		"hbone", hboneAddr, "admin", lns.Admin.Addr().String())

	if err := g.Wait(); err != nil {
		return err
	}
	// Like pilot-agent on SIGTERM: fail readiness so that istiod and the
	// ztunnels take the endpoint away, and let open streams finish.
	ready.draining.Store(true)
	drain(cfg, dp, log)
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

func drain(cfg Config, dp DataPath, log *slog.Logger) {
	timeout := cfg.DrainTimeout
	if timeout < 0 {
		return
	}
	if timeout == 0 {
		timeout = DefaultDrainTimeout
	}
	t0 := time.Now()
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	if err := dp.Drain(ctx); err != nil {
		log.Info("drained; closing the rest", "took", time.Since(t0).Round(time.Millisecond), "error", err)
		return
	}
	log.Info("drained", "took", time.Since(t0).Round(time.Millisecond))
}

// close closes the listeners; one closed already (by Drain, or by the
// server that served it) is not an error.
func (l Listeners) close() error {
	var errs []error
	for _, ln := range []net.Listener{l.HBONE, l.Metrics, l.Readiness, l.Admin} {
		if ln == nil {
			continue
		}
		errs = append(errs, unless(ln.Close(), net.ErrClosed))
	}
	return errors.Join(errs...)
}

// listen opens the listeners cfg does not bring.
func listen(ctx context.Context, cfg Config) (Listeners, error) {
	lns := cfg.Listeners
	var opened []net.Listener
	for _, l := range []struct {
		ln   *net.Listener
		addr string
	}{
		{&lns.HBONE, cmp.Or(cfg.Listen.HBONE, DefaultHBONEAddr)},
		{&lns.Metrics, cmp.Or(cfg.Listen.Metrics, DefaultMetricsAddr)},
		{&lns.Readiness, cmp.Or(cfg.Listen.Readiness, DefaultReadinessAddr)},
		{&lns.Admin, cmp.Or(cfg.Listen.Admin, DefaultAdminAddr)},
	} {
		if *l.ln != nil || (l.ln == &lns.HBONE && cfg.Node.IsRouter()) {
			continue
		}
		ln, err := (&net.ListenConfig{}).Listen(ctx, "tcp", l.addr)
		if err != nil {
			for _, o := range opened {
				o.Close()
			}
			return Listeners{}, fmt.Errorf("waypoint: listen %s: %w", l.addr, err)
		}
		opened = append(opened, ln)
		*l.ln = ln
	}
	return lns, nil
}

// registerMetrics adds the control side's metrics to the registry the
// data path fills with Istio's.
func registerMetrics(reg *metrics.Metrics, xc *client.Client, set *discovery.Set, mgr *certs.Manager) error {
	if err := reg.RegisterCounterFunc("amber_xds_events_total", "xDS client events.", "event", func() map[string]uint64 { return xc.Stats().Counters() }); err != nil {
		return err
	}
	if err := reg.RegisterCounterFunc("amber_certificate_events_total", "Workload certificate issuance events.", "event", func() map[string]uint64 {
		s := mgr.Stats()
		return map[string]uint64{"issued": s.Issued, "issue_failures": s.IssueFailures, "peers_rejected": s.PeersRejected}
	}); err != nil {
		return err
	}
	if err := reg.RegisterCounterSamples("amber_waypoint_xds_updates_total",
		"Responses per xDS type of the compiled configuration, by result (rejected: NACKed, at least one resource refused).",
		[]string{"type", "result"}, func() []metrics.Sample {
			var out []metrics.Sample
			for _, t := range []struct{ url, name string }{{config.ListenerType, "lds"}, {config.ClusterType, "cds"}, {config.EndpointType, "eds"}, {config.RouteType, "rds"}, {config.SecretType, "sds"}} {
				u := set.Updates(t.url)
				out = append(out, metrics.Sample{Labels: []string{t.name, "success"}, Value: u.Success}, metrics.Sample{Labels: []string{t.name, "rejected"}, Value: u.Rejected})
			}
			return out
		}); err != nil {
		return err
	}
	return reg.RegisterGaugeSamples("amber_waypoint_config_fields",
		"Parts of the current configuration amber refused (refused: they fail closed) or accepted without honouring (telemetry, resilience), by type or reason.",
		[]string{"verdict", "kind"}, func() []metrics.Sample {
			c := set.Snapshot().Config
			counts := map[[2]string]uint64{}
			for _, k := range []string{"listener", "cluster", "endpoints", "routes", "secrets"} {
				counts[[2]string{"refused", k}] = 0
			}
			counts[[2]string{"degraded", "telemetry"}] = 0
			counts[[2]string{"degraded", "resilience"}] = 0
			if c != nil {
				for _, p := range c.Problems {
					counts[[2]string{"refused", kind(p.TypeURL)}]++
				}
				for _, d := range c.Degraded {
					counts[[2]string{"degraded", d.Reason}]++
				}
			}
			var out []metrics.Sample
			for k, v := range counts {
				out = append(out, metrics.Sample{Labels: k[:], Value: v})
			}
			return out
		})
}

func kind(typeURL string) string {
	switch typeURL {
	case config.ListenerType:
		return "listener"
	case config.ClusterType:
		return "cluster"
	case config.EndpointType:
		return "endpoints"
	case config.RouteType:
		return "routes"
	case config.SecretType:
		return "secrets"
	}
	return typeURL
}
