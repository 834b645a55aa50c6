// Command hbone-interop runs Istio's own Go HBONE implementation
// (istio.io/istio/pkg/hbone) as a client or a server, so that amber's
// tunnel/hbone can be tested against it (test/interop):
//
//	hbone-interop client -proxy ADDR -target IP:PORT -cert F -key F -roots F [flags] <payload
//	hbone-interop server -listen ADDR -cert F -key F -roots F [-addr-file F]
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
// Istio's logs go to stderr. It runs until SIGTERM or SIGINT.
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
  hbone-interop client -proxy ADDR -target IP:PORT -cert F -key F -roots F [-server-id ID] [-streams N] [-read N] [-timeout D] <payload
  hbone-interop server -listen ADDR -cert F -key F -roots F [-addr-file F]`

func main() {
	if len(os.Args) < 2 {
		fatal(errors.New(usage))
	}
	// Istio's logger writes to stdout by default; stdout carries results.
	opts := istiolog.DefaultOptions()
	opts.OutputPaths = []string{"stderr"}
	if err := istiolog.Configure(opts); err != nil {
		fatal(fmt.Errorf("configure istio logging: %w", err))
	}
	var err error
	switch os.Args[1] {
	case "client":
		err = runClient(os.Args[2:])
	case "server":
		err = runServer(os.Args[2:])
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
	var files pemFiles
	files.register(fs)
	proxy := fs.String("proxy", "", "address of the HBONE proxy, IP:PORT (required)")
	target := fs.String("target", "", "CONNECT :authority, IP:PORT (required)")
	serverID := fs.String("server-id", "", "SPIFFE ID the proxy's certificate must carry (empty: any)")
	streams := fs.Int("streams", 1, "concurrent streams, each sending the payload")
	read := fs.Int("read", -1, "bytes to read back per stream (negative: the payload's length)")
	timeout := fs.Duration("timeout", 20*time.Second, "limit for the whole run")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *proxy == "" || *target == "" || fs.NArg() != 0 || *streams < 1 {
		return errors.New(usage)
	}
	cert, roots, err := files.load()
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

	d := hbone.NewDialer(hbone.Config{
		ProxyAddress: *proxy,
		TLS: &tls.Config{
			Certificates: []tls.Certificate{cert},
			// The proxy is named by its SPIFFE ID, not a hostname: the
			// chain and the ID are checked in VerifyConnection instead.
			InsecureSkipVerify: true,
			VerifyConnection: func(cs tls.ConnectionState) error {
				return verifyServer(cs, roots, *serverID)
			},
		},
	})
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

func verifyServer(cs tls.ConnectionState, roots *x509.CertPool, want string) error {
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
	fmt.Fprintf(os.Stderr, "hbone-interop: proxy identity %s\n", id)
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
	var files pemFiles
	files.register(fs)
	listen := fs.String("listen", "127.0.0.1:0", "address to listen on")
	addrFile := fs.String("addr-file", "", "file to write the listening address to once serving (empty: none)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() != 0 {
		return errors.New(usage)
	}
	cert, roots, err := files.load()
	if err != nil {
		return err
	}
	ln, err := net.Listen("tcp", *listen)
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
