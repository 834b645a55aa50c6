package main

import (
	"context"
	"errors"
	"flag"
	"log/slog"
	"net"
	"net/http"
	"net/http/httputil"
	"net/netip"
	"net/url"
	"os"
	"os/signal"
	"sync"
	"syscall"
	"time"

	"github.com/amber-mesh/amber/internal/cli"
	"github.com/amber-mesh/amber/tunnel/ca"
	"github.com/amber-mesh/amber/tunnel/certs"
	"github.com/amber-mesh/amber/tunnel/hbone"
	"github.com/amber-mesh/amber/tunnel/identity"
)

// rproxyMain is the waypoint benchmark's floor for a Go L7 hop, run in a
// waypoint pod of its own in amber-waypoint's place: the same HBONE
// server and client pool and the same certificates from istiod's CA as
// amber-waypoint, and between them a plain net/http/httputil.ReverseProxy
// to one fixed backend — no xDS, routes, policy or telemetry. It answers
// /healthz/ready on :15021 once it holds its certificate, and runs until
// SIGTERM.
func rproxyMain(args []string) error {
	// amber-waypoint's runtime setting, so that the floor differs from it
	// by the L7 work alone.
	if err := cli.KeepMonitorAwake(); err != nil {
		return err
	}
	fs := flag.NewFlagSet("rproxy", flag.ContinueOnError)
	istiodAddr := fs.String("istiod", "", "istiod's CA address (15012)")
	serverName := fs.String("istiod-server-name", "", "name in istiod's serving certificate")
	rootFile := fs.String("root-cert", "", "mesh roots, PEM")
	tokenFile := fs.String("token-file", "", "the pod's service-account token (audience istio-ca)")
	self := fs.String("id", "", "own SPIFFE identity")
	backend := fs.String("backend", "", "the backend pod's IP:port")
	backendID := fs.String("backend-id", "", "the backend's SPIFFE identity")
	if err := fs.Parse(args); err != nil {
		return err
	}
	own, err := identity.Parse(*self)
	if err != nil {
		return err
	}
	dst, err := identity.Parse(*backendID)
	if err != nil {
		return err
	}
	target, err := netip.ParseAddrPort(*backend)
	if err != nil {
		return err
	}
	rootPEM, err := os.ReadFile(*rootFile)
	if err != nil {
		return err
	}
	client, err := ca.NewIstio(ca.IstioConfig{Address: *istiodAddr, ServerName: *serverName, RootPEM: rootPEM, TokenFile: *tokenFile, Self: own, SelfOnly: true})
	if err != nil {
		return err
	}
	defer client.Close()
	mgr := &certs.Manager{CA: client}
	defer mgr.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	_, err = mgr.Get(ctx, own)
	cancel()
	if err != nil {
		return err
	}

	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
	pool := &hbone.Pool{
		Dial: func(ctx context.Context, key hbone.Key) (net.Conn, error) {
			var d net.Dialer
			nc, err := d.DialContext(ctx, "tcp", key.Addr.String())
			if err != nil {
				return nil, err
			}
			tc := hbone.TLSClient(nc, mgr.ClientConfig(own, dst))
			if err := tc.HandshakeContext(ctx); err != nil {
				nc.Close()
				return nil, err
			}
			return tc, nil
		},
		Logger: log,
	}
	defer pool.Close()
	key := hbone.Key{Src: own.String(), Dst: dst.String(), Addr: netip.AddrPortFrom(target.Addr(), 15008)}
	rp := &httputil.ReverseProxy{
		Rewrite: func(r *httputil.ProxyRequest) { r.SetURL(&url.URL{Scheme: "http", Host: target.String()}) },
		Transport: &http.Transport{
			DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
				return pool.Connect(ctx, key, hbone.FormatAuthority(target), nil)
			},
			MaxIdleConnsPerHost: 100,
		},
	}

	streams := &streamListener{conns: make(chan net.Conn), done: make(chan struct{})}
	inner := &http.Server{Handler: rp}
	go inner.Serve(streams)
	srv := &hbone.Server{
		TLSConfig: mgr.ServerConfig(func(net.Addr) (identity.ID, error) { return own, nil }, own.TrustDomain),
		Handler: hbone.HandlerFunc(func(ctx context.Context, _ *hbone.Request, rw hbone.Responder) {
			s, err := rw.Accept()
			if err != nil {
				return
			}
			c := &streamConn{Conn: s, closed: make(chan struct{})}
			select {
			case streams.conns <- c:
			case <-streams.done:
				return
			}
			// The stream ends when this returns: wait until the HTTP
			// server is done with it or the client went away.
			select {
			case <-c.closed:
			case <-ctx.Done():
			}
		}),
		MaxConcurrentStreams: 100,
		Logger:               log,
	}
	ln, err := net.Listen("tcp", ":15008")
	if err != nil {
		return err
	}
	go srv.Serve(ln)
	defer srv.Close()
	status, err := net.Listen("tcp", ":15021")
	if err != nil {
		return err
	}
	go http.Serve(status, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/healthz/ready" {
			http.NotFound(w, r)
		}
	}))
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
	<-sig
	close(streams.done)
	return errors.Join(inner.Close(), status.Close())
}

// streamListener hands the HBONE handler's streams to an http.Server.
type streamListener struct {
	conns chan net.Conn
	done  chan struct{}
}

func (l *streamListener) Accept() (net.Conn, error) {
	select {
	case c := <-l.conns:
		return c, nil
	case <-l.done:
		return nil, net.ErrClosed
	}
}

func (l *streamListener) Close() error   { return nil }
func (l *streamListener) Addr() net.Addr { return &net.TCPAddr{} }

// streamConn reports when the HTTP server closed the stream.
type streamConn struct {
	net.Conn
	once   sync.Once
	closed chan struct{}
}

func (c *streamConn) Close() error {
	err := c.Conn.Close()
	c.once.Do(func() { close(c.closed) })
	return err
}
