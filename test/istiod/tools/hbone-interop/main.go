// Command hbone-interop runs Istio's own Go HBONE implementation
// (istio.io/istio/pkg/hbone) as a client or a server, so that amber's
// tunnel/hbone can be tested against it (test/interop) and measured
// beside it (amber-bench tunnel):
//
//	hbone-interop client -proxy ADDR -target IP:PORT -cert F -key F -roots F [flags] <payload
//	hbone-interop server -listen ADDR|-listen-fd N -cert F -key F -roots F [-addr-file F]
//	hbone-interop outbound -listen-fd N -hbone-port P -cert F -key F -roots F
//
// Certificates, keys and roots are PEM files; the identities are the SPIFFE
// URI SANs of the certificates, read with Istio's own SAN parser.
//
// client opens -streams CONNECT streams to -target through the HBONE proxy
// at -proxy with hbone.NewDialer, all on one HTTP/2 connection (the dialer
// shares its transport). Each stream sends the payload read from stdin and
// reads -read bytes back (default: as many as it sent); the replies are
// written to stdout in stream order. The proxy's certificate must chain to
// -roots and, with -server-id, carry that identity; hostnames are not
// checked, as HBONE names peers by SPIFFE ID only. Istio's dialer hands out
// one end of a net.Pipe, which cannot half-close, so a stream ends by
// closing it once the reply has been read. Any failure exits with status 1.
//
// server serves CONNECT with hbone.NewServer behind a TLS listener that
// requires a client certificate chaining to -roots, and tunnels each
// stream to its :authority. It writes its listening address to -addr-file
// once it accepts connections, and one line per CONNECT to stdout:
//
//	connect <authority> peer=<client SPIFFE ID>
//
// With -listen-fd it serves a listening socket inherited as that file
// descriptor instead of opening one.
//
// outbound is the client half of a proxy pair (amber-bench's
// istio-hbone-pair): it serves the transparent listener inherited as
// -listen-fd (amber's datapath assigns a captured pod's connections to it,
// so each accepted socket's local address is the original destination),
// and carries each connection over Istio's dialer to that destination, as
// the CONNECT :authority, through the HBONE proxy at the destination's
// address and -hbone-port. One dialer per proxy address: Istio's dialer
// multiplexes all its streams on one HTTP/2 connection. It runs until
// SIGTERM or SIGINT.
//
// Istio's logs go to stderr, at -log-level (default info; Istio's
// per-stream lines are info). server runs until SIGTERM or SIGINT.
package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/signal"
	"strings"
	"sync"
	"syscall"
	"time"

	"istio.io/istio/pkg/hbone"
	istiolog "istio.io/istio/pkg/log"
	"istio.io/istio/security/pkg/pki/util"
)

const usage = `usage:
  hbone-interop client -proxy ADDR -target IP:PORT -cert F -key F -roots F [-server-id ID] [-streams N] [-read N] [-timeout D] [-log-level L] <payload
  hbone-interop server -listen ADDR|-listen-fd N -cert F -key F -roots F [-addr-file F] [-log-level L]
  hbone-interop outbound -listen-fd N -hbone-port P -cert F -key F -roots F [-server-id ID] [-log-level L]`

func main() {
	if len(os.Args) < 2 {
		fatal(errors.New(usage))
	}
	var err error
	switch os.Args[1] {
	case "client":
		err = runClient(os.Args[2:])
	case "server":
		err = runServer(os.Args[2:])
	case "outbound":
		err = runOutbound(os.Args[2:])
	default:
		err = fmt.Errorf("unknown mode %q\n%s", os.Args[1], usage)
	}
	if err != nil {
		fatal(err)
	}
}

func fatal(err error) {
	fmt.Fprintf(os.Stderr, "hbone-interop: %v\n", err)
	os.Exit(1)
}

// common are the flags of every mode: the credentials and the level of
// Istio's logs.
type common struct {
	files pemFiles
	level *string
}

func registerCommon(fs *flag.FlagSet) *common {
	c := &common{level: fs.String("log-level", "info", "level of Istio's logs: debug, info, warn, error or none")}
	c.files.register(fs)
	return c
}

// parse parses args, which must take no positional arguments and satisfy
// valid, configures Istio's logs and loads the credentials.
func (c *common) parse(fs *flag.FlagSet, args []string, valid func() bool) (tls.Certificate, *x509.CertPool, error) {
	if err := fs.Parse(args); err != nil {
		return tls.Certificate{}, nil, err
	}
	if fs.NArg() != 0 || !valid() {
		return tls.Certificate{}, nil, errors.New(usage)
	}
	if err := configureLogs(*c.level); err != nil {
		return tls.Certificate{}, nil, err
	}
	return c.files.load()
}

// configureLogs sets Istio's logs to level. Istio's logger writes to
// stdout by default, and stdout carries results: logs go to stderr.
func configureLogs(level string) error {
	switch level {
	case "debug", "info", "warn", "error", "none":
	default:
		return fmt.Errorf("-log-level %q: want debug, info, warn, error or none", level)
	}
	opts := istiolog.DefaultOptions()
	opts.OutputPaths = []string{"stderr"}
	opts.SetDefaultOutputLevel(istiolog.OverrideScopeName, istiolog.StringToLevel(level))
	if err := istiolog.Configure(opts); err != nil {
		return fmt.Errorf("configure istio logging: %w", err)
	}
	return nil
}

// pemFiles are the flags naming a side's credentials.
type pemFiles struct{ cert, key, roots string }

func (p *pemFiles) register(fs *flag.FlagSet) {
	fs.StringVar(&p.cert, "cert", "", "PEM certificate chain, leaf first (required)")
	fs.StringVar(&p.key, "key", "", "PEM private key of the leaf (required)")
	fs.StringVar(&p.roots, "roots", "", "PEM trust anchors the peer must chain to (required)")
}

func (p *pemFiles) load() (tls.Certificate, *x509.CertPool, error) {
	if p.cert == "" || p.key == "" || p.roots == "" {
		return tls.Certificate{}, nil, errors.New("-cert, -key and -roots are required")
	}
	cert, err := tls.LoadX509KeyPair(p.cert, p.key)
	if err != nil {
		return tls.Certificate{}, nil, fmt.Errorf("load key pair: %w", err)
	}
	b, err := os.ReadFile(p.roots)
	if err != nil {
		return tls.Certificate{}, nil, fmt.Errorf("read roots: %w", err)
	}
	roots := x509.NewCertPool()
	if !roots.AppendCertsFromPEM(b) {
		return tls.Certificate{}, nil, fmt.Errorf("roots %s: no PEM certificate", p.roots)
	}
	return cert, roots, nil
}

// spiffeID returns the first URI SAN of cert as Istio's SAN parser reads it.
func spiffeID(cert *x509.Certificate) (string, error) {
	ids, err := util.ExtractIDs(cert.Extensions)
	if err != nil {
		return "", fmt.Errorf("read SAN: %w", err)
	}
	if len(ids) == 0 {
		return "", errors.New("no identity in SAN")
	}
	return ids[0], nil
}

func runClient(args []string) error {
	fs := flag.NewFlagSet("client", flag.ContinueOnError)
	common := registerCommon(fs)
	proxy := fs.String("proxy", "", "address of the HBONE proxy, IP:PORT (required)")
	target := fs.String("target", "", "CONNECT :authority, IP:PORT (required)")
	serverID := fs.String("server-id", "", "SPIFFE ID the proxy's certificate must carry (empty: any)")
	streams := fs.Int("streams", 1, "concurrent streams, each sending the payload")
	read := fs.Int("read", -1, "bytes to read back per stream (negative: the payload's length)")
	timeout := fs.Duration("timeout", 20*time.Second, "limit for the whole run")
	cert, roots, err := common.parse(fs, args, func() bool { return *proxy != "" && *target != "" && *streams >= 1 })
	if err != nil {
		return err
	}
	payload, err := io.ReadAll(os.Stdin)
	if err != nil {
		return fmt.Errorf("read payload: %w", err)
	}
	want := *read
	if want < 0 {
		want = len(payload)
	}
	// Istio's dialer ignores its context, so the limit is enforced here.
	time.AfterFunc(*timeout, func() { fatal(fmt.Errorf("timed out after %v", *timeout)) })

	d := hbone.NewDialer(hbone.Config{ProxyAddress: *proxy, TLS: clientTLS(cert, roots, *serverID, true)})
	replies := make([][]byte, *streams)
	errs := make([]error, *streams)
	var wg sync.WaitGroup
	for i := range *streams {
		wg.Add(1)
		go func() {
			defer wg.Done()
			replies[i], errs[i] = exchange(d, *target, payload, want)
		}()
	}
	wg.Wait()
	for i, r := range replies {
		if _, err := os.Stdout.Write(r); err != nil {
			return fmt.Errorf("write reply: %w", err)
		}
		if errs[i] != nil {
			return fmt.Errorf("stream %d: %w", i, errs[i])
		}
	}
	return nil
}

// clientTLS is the client side's TLS configuration: its certificate, and
// the proxy's checked against roots and, when serverID is set, that
// identity. With report, each proxy's identity is printed to stderr.
func clientTLS(cert tls.Certificate, roots *x509.CertPool, serverID string, report bool) *tls.Config {
	return &tls.Config{
		Certificates: []tls.Certificate{cert},
		// The proxy is named by its SPIFFE ID, not a hostname: the
		// chain and the ID are checked in VerifyConnection instead.
		InsecureSkipVerify: true,
		VerifyConnection: func(cs tls.ConnectionState) error {
			return verifyServer(cs, roots, serverID, report)
		},
	}
}

func verifyServer(cs tls.ConnectionState, roots *x509.CertPool, want string, report bool) error {
	if len(cs.PeerCertificates) == 0 {
		return errors.New("proxy presented no certificate")
	}
	inter := x509.NewCertPool()
	for _, c := range cs.PeerCertificates[1:] {
		inter.AddCert(c)
	}
	leaf := cs.PeerCertificates[0]
	if _, err := leaf.Verify(x509.VerifyOptions{
		Roots:         roots,
		Intermediates: inter,
		KeyUsages:     []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}); err != nil {
		return fmt.Errorf("verify proxy certificate: %w", err)
	}
	id, err := spiffeID(leaf)
	if err != nil {
		return fmt.Errorf("proxy certificate: %w", err)
	}
	if want != "" && id != want {
		return fmt.Errorf("proxy is %s, want %s", id, want)
	}
	if report {
		fmt.Fprintf(os.Stderr, "hbone-interop: proxy identity %s\n", id)
	}
	return nil
}

// exchange sends payload on a new stream to target and returns the first
// want bytes that come back.
func exchange(d hbone.Dialer, target string, payload []byte, want int) ([]byte, error) {
	c, err := d.Dial("tcp", target)
	if err != nil {
		return nil, fmt.Errorf("dial %s: %w", target, err)
	}
	defer c.Close()
	wrote := make(chan error, 1)
	go func() {
		_, err := c.Write(payload)
		wrote <- err
	}()
	buf := make([]byte, want)
	n, err := io.ReadFull(c, buf)
	if err != nil {
		return buf[:n], fmt.Errorf("read %d of %d bytes: %w", n, want, err)
	}
	// net.Pipe writes complete only once read: a reply shorter than the
	// payload leaves the writer blocked until Close.
	c.Close()
	if err := <-wrote; err != nil && !errors.Is(err, io.ErrClosedPipe) {
		return buf, fmt.Errorf("write: %w", err)
	}
	return buf, nil
}

func runServer(args []string) error {
	fs := flag.NewFlagSet("server", flag.ContinueOnError)
	common := registerCommon(fs)
	listen := fs.String("listen", "127.0.0.1:0", "address to listen on")
	listenFD := fs.Int("listen-fd", -1, "serve this inherited listening socket instead of -listen (negative: none)")
	addrFile := fs.String("addr-file", "", "file to write the listening address to once serving (empty: none)")
	cert, roots, err := common.parse(fs, args, func() bool { return true })
	if err != nil {
		return err
	}
	var ln net.Listener
	if *listenFD >= 0 {
		ln, err = inheritedListener(*listenFD)
	} else {
		ln, err = net.Listen("tcp", *listen)
	}
	if err != nil {
		return fmt.Errorf("listen: %w", err)
	}
	// As Istio's echo server does it: NewServer's http.Server enables only
	// HTTP/1 and h2c, but serving a TLS listener that negotiates "h2"
	// still reaches its HTTP/2 handler.
	tln := tls.NewListener(ln, &tls.Config{
		Certificates: []tls.Certificate{cert},
		ClientAuth:   tls.RequireAndVerifyClientCert,
		ClientCAs:    roots,
		NextProtos:   []string{"h2"},
	})
	srv := hbone.NewServer()
	srv.Handler = reportConnect(srv.Handler)

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	served := make(chan error, 1)
	go func() { served <- srv.Serve(tln) }()
	if *addrFile != "" {
		if err := writeFileAtomic(*addrFile, ln.Addr().String()+"\n"); err != nil {
			srv.Close()
			return err
		}
	}
	select {
	case <-ctx.Done():
		return srv.Close()
	case err := <-served:
		return fmt.Errorf("serve: %w", err)
	}
}

// inheritedListener is the listening socket the parent passed as fd.
func inheritedListener(fd int) (net.Listener, error) {
	f := os.NewFile(uintptr(fd), fmt.Sprintf("listen-fd-%d", fd))
	if f == nil {
		return nil, fmt.Errorf("fd %d is not open", fd)
	}
	defer f.Close() // FileListener holds a duplicate
	ln, err := net.FileListener(f)
	if err != nil {
		return nil, fmt.Errorf("fd %d: %w", fd, err)
	}
	return ln, nil
}

func runOutbound(args []string) error {
	fs := flag.NewFlagSet("outbound", flag.ContinueOnError)
	common := registerCommon(fs)
	listenFD := fs.Int("listen-fd", -1, "inherited transparent listening socket (required)")
	port := fs.Int("hbone-port", 15008, "port of the HBONE proxy at each destination's address")
	serverID := fs.String("server-id", "", "SPIFFE ID the proxies' certificates must carry (empty: any)")
	cert, roots, err := common.parse(fs, args, func() bool { return *listenFD >= 0 && *port >= 1 && *port <= 65535 })
	if err != nil {
		return err
	}
	ln, err := inheritedListener(*listenFD)
	if err != nil {
		return fmt.Errorf("listen: %w", err)
	}
	o := &outbound{tls: clientTLS(cert, roots, *serverID, false), port: uint16(*port), dialers: map[string]hbone.Dialer{}}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	served := make(chan error, 1)
	go func() { served <- o.serve(ln) }()
	select {
	case <-ctx.Done():
		return ln.Close()
	case err := <-served:
		return fmt.Errorf("serve: %w", err)
	}
}

// outbound carries captured connections over HBONE with Istio's dialer.
type outbound struct {
	tls  *tls.Config
	port uint16

	mu      sync.Mutex // guards the field below
	dialers map[string]hbone.Dialer
}

func (o *outbound) serve(ln net.Listener) error {
	for {
		c, err := ln.Accept()
		if err != nil {
			return err
		}
		go o.relay(c)
	}
}

// dialer returns the dialer for the HBONE proxy at proxy, made once so
// that its streams share one HTTP/2 connection, as Istio's dialer does.
func (o *outbound) dialer(proxy string) hbone.Dialer {
	o.mu.Lock()
	defer o.mu.Unlock()
	d, ok := o.dialers[proxy]
	if !ok {
		d = hbone.NewDialer(hbone.Config{ProxyAddress: proxy, TLS: o.tls})
		o.dialers[proxy] = d
	}
	return d
}

// relay tunnels one captured connection to its original destination, the
// accepted socket's local address. Istio's dialer hands out one end of a
// net.Pipe, which cannot half-close: the first direction to finish ends
// both.
func (o *outbound) relay(down net.Conn) {
	defer down.Close()
	dst := down.LocalAddr().(*net.TCPAddr).AddrPort()
	dst = netip.AddrPortFrom(dst.Addr().Unmap(), dst.Port())
	up, err := o.dialer(netip.AddrPortFrom(dst.Addr(), o.port).String()).Dial("tcp", dst.String())
	if err != nil {
		fmt.Fprintf(os.Stderr, "hbone-interop: %s: %v\n", dst, err)
		return
	}
	defer up.Close()
	done := make(chan struct{}, 2)
	go func() { io.Copy(up, down); done <- struct{}{} }()
	go func() { io.Copy(down, up); done <- struct{}{} }()
	<-done
}

// reportConnect prints each CONNECT and its client's identity before
// Istio's handler serves it.
func reportConnect(h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method == http.MethodConnect {
			peer := "none"
			if r.TLS != nil && len(r.TLS.PeerCertificates) > 0 {
				id, err := spiffeID(r.TLS.PeerCertificates[0])
				if err != nil {
					id = "unreadable(" + strings.ReplaceAll(err.Error(), " ", "_") + ")"
				}
				peer = id
			}
			fmt.Printf("connect %s peer=%s\n", r.Host, peer)
		}
		h.ServeHTTP(w, r)
	})
}

// writeFileAtomic writes s to name so that a reader polling for it never
// sees a partial file.
func writeFileAtomic(name, s string) error {
	tmp := name + ".tmp"
	if err := os.WriteFile(tmp, []byte(s), 0o644); err != nil {
		return fmt.Errorf("write address: %w", err)
	}
	if err := os.Rename(tmp, name); err != nil {
		return fmt.Errorf("write address: %w", err)
	}
	return nil
}
