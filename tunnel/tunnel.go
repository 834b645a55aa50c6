// Package tunnel runs amber's ztunnel: it wires the xDS client (against
// istiod, or an in-process server reading a local mesh file), the CA, the
// certificate manager and the data plane's listeners, and serves metrics,
// readiness and the admin endpoint.
package tunnel

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"net"
	"net/http"
	"net/http/pprof"
	"net/netip"
	"os"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/amber-mesh/amber/bpf"
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

// Run runs the ztunnel until ctx is done; it then stops everything and
// returns nil, or the first error that stopped it earlier.
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
	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)

	// Everything started below is stopped in reverse order, then its
	// goroutines are waited for: they end only once their part is closed.
	var closers []func() error
	var wg sync.WaitGroup
	defer func() {
		cancel(nil)
		var errs []error
		for i := len(closers) - 1; i >= 0; i-- {
			errs = append(errs, closers[i]())
		}
		wg.Wait()
		err = errors.Join(append([]error{err}, errs...)...)
	}()
	fail := func(what string, err error) {
		if err != nil && ctx.Err() == nil {
			cancel(fmt.Errorf("%s: %w", what, err))
		}
	}

	caClient, err := newCA(cfg)
	if err != nil {
		return err
	}
	if c, ok := caClient.(interface{ Close() error }); ok {
		closers = append(closers, c.Close)
	}
	mgr := &certs.Manager{CA: caClient, TTL: cfg.CertTTL, Logger: log}
	closers = append(closers, mgr.Close)

	store := state.NewStore()
	conn, err := dialControlPlane(ctx, cfg, log, &wg, &closers, fail)
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
	wg.Go(func() {
		if err := xc.Run(ctx); err != nil && ctx.Err() == nil {
			fail("xds client", err)
		}
	})
	closers = append(closers, xc.Close)

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
		Handshakes:  cfg.Handshakes,
		// istiod describes a new pod a moment after the agent captured it.
		WorkloadWait:  5 * time.Second,
		ReservedPorts: []uint16{cfg.Ports.Outbound, cfg.Ports.Inbound, cfg.Ports.Admin, cfg.Ports.Metrics, cfg.Ports.Readiness},
	})
	if err != nil {
		return err
	}
	closers = append(closers, px.Close)
	if err := registerMetrics(reg, cfg, px, mgr, xc); err != nil {
		return err
	}

	// Data plane listeners: transparent, MPTCP off. With the datapath,
	// 15001 and 15006 listen on loopback, a socket per family, where the
	// network cannot reach them; the datapath assigns their SYNs whatever
	// their address. 15008 listens on [::] (its clients address
	// podIP:15008, the kernel's own listener lookup must find it), and so
	// does everything without the datapath (nftables TPROXY finds its
	// socket by address). ARCHITECTURE.md, "Listener addresses".
	var lns []dataListener
	for _, l := range []struct {
		kind  bpf.Listener
		port  uint16
		serve func(net.Listener) error
	}{
		{bpf.Outbound, cfg.Ports.Outbound, px.ServeOutbound},
		{bpf.Inbound, cfg.Ports.Inbound, px.ServeInbound},
		{bpf.HBONE, cfg.Ports.HBONE, px.ServeHBONE},
	} {
		dl := dataListener{kind: l.kind}
		if !cfg.NoCapture && l.kind != bpf.HBONE {
			dl.v4, dl.v6, err = cfg.Sockets.ListenLoopback(ctx, l.port)
			if err == nil && dl.v6 == nil {
				log.Info("no IPv6 loopback: captured IPv6 connections find no listener and fail closed", "listener", l.kind)
			}
		} else {
			dl.v4, err = cfg.Sockets.Listen(ctx, "[::]:"+strconv.Itoa(int(l.port)))
			dl.v6 = dl.v4
		}
		if err != nil {
			return err // px.Close closes the listeners already served
		}
		lns = append(lns, dl)
		for _, ln := range dl.sockets() {
			wg.Go(func() {
				if err := l.serve(ln); err != nil && !errors.Is(err, proxy.ErrClosed) {
					fail(l.kind.String()+" listener", err)
				}
			})
		}
	}
	if !cfg.NoCapture {
		if err := register(ctx, cfg.PinRoot, lns, log); err != nil {
			return err
		}
		log.Info("listeners registered in the datapath", "pin_root", cfg.PinRoot)
	}

	var ready atomic.Bool
	wg.Go(func() {
		select {
		case <-xc.Synced():
			ready.Store(true)
			log.Info("ztunnel ready", "node", cfg.NodeName)
			if cfg.Ready != nil {
				cfg.Ready()
			}
		case <-ctx.Done():
		}
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
		closers = append(closers, hs.Close)
		wg.Go(func() {
			if err := hs.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
				fail("http "+s.addr, err)
			}
		})
	}

	<-ctx.Done()
	if cause := context.Cause(ctx); cause != nil && !errors.Is(cause, context.Canceled) && !errors.Is(cause, context.DeadlineExceeded) {
		return cause
	}
	drain(cfg, px, lns, log)
	return nil
}

// drain hands new connections over to the next ztunnel and lets the
// current ones finish: the listeners leave the datapath's listener map
// first (new SYNs are dropped and retransmitted until the next ztunnel
// registers), handshakes already assigned complete and are accepted, then
// the proxy serves what it has for up to DrainTimeout.
func drain(cfg Config, px *proxy.Proxy, lns []dataListener, log *slog.Logger) {
	timeout := cfg.DrainTimeout
	if timeout < 0 {
		return
	}
	if timeout == 0 {
		timeout = 5 * time.Second
	}
	t0 := time.Now()
	if !cfg.NoCapture {
		if ls, err := bpf.OpenListeners(cfg.PinRoot); err == nil {
			for _, dl := range lns {
				dl.each(func(f bpf.Family, ln *net.TCPListener) {
					if err := ls.UnregisterSocket(dl.kind, f, ln); err != nil {
						log.Warn("drain: unregister listener", "err", err)
					}
				})
			}
			ls.Close()
			// A SYN assigned just before is still in its handshake.
			time.Sleep(200 * time.Millisecond)
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	if err := px.Drain(ctx); err != nil {
		log.Info("drained; closing the rest", "took", time.Since(t0).Round(time.Millisecond), "err", err)
		return
	}
	log.Info("drained", "took", time.Since(t0).Round(time.Millisecond))
}

// dataListener is one of the data plane's listeners: its socket for each
// family, the same dual-stack socket twice, or none for a family the host
// lacks.
type dataListener struct {
	kind   bpf.Listener
	v4, v6 *net.TCPListener
}

// each calls fn for every family that has a socket.
func (dl dataListener) each(fn func(bpf.Family, *net.TCPListener)) {
	if dl.v4 != nil {
		fn(bpf.IPv4, dl.v4)
	}
	if dl.v6 != nil {
		fn(bpf.IPv6, dl.v6)
	}
}

// sockets are dl's distinct sockets.
func (dl dataListener) sockets() []*net.TCPListener {
	switch {
	case dl.v6 == nil || dl.v6 == dl.v4:
		return []*net.TCPListener{dl.v4}
	case dl.v4 == nil:
		return []*net.TCPListener{dl.v6}
	}
	return []*net.TCPListener{dl.v4, dl.v6}
}

// register puts the listeners into the datapath's listener map. The node
// agent pins that map: a ztunnel started first (both containers of the
// DaemonSet's pod start together) waits for it, up to ctx.
func register(ctx context.Context, root string, lns []dataListener, log *slog.Logger) error {
	ls, err := bpf.OpenListeners(root)
	for waited := false; errors.Is(err, fs.ErrNotExist); ls, err = bpf.OpenListeners(root) {
		if !waited {
			log.Info("waiting for the agent to pin the datapath", "pin_root", root)
			waited = true
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("%w (gave up: %v)", err, context.Cause(ctx))
		case <-time.After(250 * time.Millisecond):
		}
	}
	if err != nil {
		return err
	}
	defer ls.Close()
	for _, dl := range lns {
		dl.each(func(f bpf.Family, ln *net.TCPListener) {
			if err == nil {
				err = ls.Register(dl.kind, f, ln)
			}
		})
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
func dialControlPlane(ctx context.Context, cfg Config, log *slog.Logger, wg *sync.WaitGroup, closers *[]func() error, fail func(string, error)) (*grpc.ClientConn, error) {
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
		wg.Go(func() {
			if err := srv.Serve(ctx, ln); err != nil && ctx.Err() == nil && !errors.Is(err, server.ErrClosed) {
				fail("local xds server", err)
			}
		})
		*closers = append(*closers, srv.Close)
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
	*closers = append(*closers, cc.Close)
	return cc, nil
}
