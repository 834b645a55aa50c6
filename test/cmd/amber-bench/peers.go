package main

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/amber-mesh/amber/bpf"
	"github.com/amber-mesh/amber/test/meshbed"
	"github.com/amber-mesh/amber/test/testbed"
	"github.com/amber-mesh/amber/tunnel/ca"
	"github.com/amber-mesh/amber/tunnel/identity"
	"github.com/amber-mesh/amber/tunnel/sockopt"
)

// Real peers: what a user could run instead of amber, in the same
// topology as the other pairs. amber's datapath captures the client pod
// into a transparent listener on the client's node and the HBONE port of
// the server pod into one on the server's node, exactly as for amber; the
// bench opens those listeners, registers them in the node's listener map
// and hands them to the peer process as fd 3:
//
//   - haproxy-pair: Debian's HAProxy, mutual TLS 1.3 with OpenSSL, one TLS
//     connection per client connection. The client side connects to the
//     original destination's address at port 15008 ("server 0.0.0.0:15008")
//     and sends the original destination in a PROXY v2 header, which
//     HAProxy writes before the TLS handshake, not inside TLS; the server
//     side reads it ("accept-proxy") and connects to that destination
//     ("server 0.0.0.0").
//   - istio-hbone-pair: Istio's Go pkg/hbone (hbone-interop outbound and
//     server): HTTP/2 CONNECT over mutual TLS, the original destination
//     as :authority, all streams to one node on one HTTP/2 connection.
//
// Both server sides dial the server pod from the node's own address
// without amber's bypass mark: the capture acts on what enters a node
// from a pod or the uplink, never on what the node itself sends to a pod,
// so the server pod stays captured and its replies reach the peer by
// ordinary routing. Sources are not preserved, unlike the splice pair's
// and amber's dials. Certificates come from the local CA the ztunnels use
// (SPIFFE IDs in URI SANs). HAProxy checks the peer's chain only, as it
// cannot match a URI SAN; Istio's side also checks the server's SPIFFE ID.

// peerHBONEPort is where a client-side peer sends a connection: the
// original destination's address at the HBONE port, so the server's node
// captures it into its HBONE listener as it does amber's tunnels.
const peerHBONEPort = 15008

// peerFiles are one side's credentials as PEM files.
type peerFiles struct {
	Cert, Key, Roots string
	// Bundle is the chain followed by the key: HAProxy's "crt" file.
	Bundle string
}

// peerCreds issues the client's and the server's certificates from the
// local CA in caDir (created if empty, as the ztunnels would) into dir.
func peerCreds(caDir, dir string) (client, server peerFiles, err error) {
	signer, err := ca.OpenLocal(caDir, "cluster.local")
	if err != nil {
		return client, server, fmt.Errorf("open local CA: %w", err)
	}
	for _, side := range []struct {
		sa  string
		out *peerFiles
	}{{"client", &client}, {"server", &server}} {
		id := identity.ID{TrustDomain: signer.TrustDomain(), Namespace: "default", ServiceAccount: side.sa}
		if *side.out, err = issuePeerFiles(signer, id, filepath.Join(dir, side.sa)); err != nil {
			return client, server, err
		}
	}
	return client, server, nil
}

// issuePeerFiles has signer issue a certificate for id the way amber's
// certificate manager asks for one (ca.CreateCSR) and writes it, its key
// and the CA's roots into dir.
func issuePeerFiles(signer *ca.Local, id identity.ID, dir string) (peerFiles, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return peerFiles{}, err
	}
	csr, err := ca.CreateCSR(key, id)
	if err != nil {
		return peerFiles{}, fmt.Errorf("csr for %s: %w", id, err)
	}
	chain, err := signer.Sign(context.Background(), csr, id, 24*time.Hour)
	if err != nil {
		return peerFiles{}, fmt.Errorf("sign %s: %w", id, err)
	}
	der, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return peerFiles{}, err
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return peerFiles{}, err
	}
	chainPEM := ca.EncodeChain(chain)
	keyPEM := pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der})
	p := peerFiles{
		Cert:   filepath.Join(dir, "cert-chain.pem"),
		Key:    filepath.Join(dir, "key.pem"),
		Roots:  filepath.Join(dir, "root-cert.pem"),
		Bundle: filepath.Join(dir, "bundle.pem"),
	}
	for name, b := range map[string][]byte{
		p.Cert:   chainPEM,
		p.Key:    keyPEM,
		p.Roots:  signer.RootPEM(),
		p.Bundle: append(append([]byte(nil), chainPEM...), keyPEM...),
	} {
		if err := os.WriteFile(name, b, 0o600); err != nil {
			return peerFiles{}, err
		}
	}
	return p, nil
}

// transparentListener opens a transparent listener on port in nd's
// namespace, registers it in nd's listener map as kind for both families,
// and returns it as a file for a peer process to inherit. The caller
// closes the file once the process has it.
func transparentListener(nd *meshbed.Node, kind bpf.Listener, port int) (*os.File, error) {
	var ln *net.TCPListener
	err := nd.Do(func() (err error) {
		ln, err = sockopt.Options{}.Listen(context.Background(), fmt.Sprintf("[::]:%d", port))
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("%s listener on %s: %w", kind, nd.Name, err)
	}
	defer ln.Close() // the file holds a duplicate
	ls, err := bpf.OpenListeners(nd.Root)
	if err != nil {
		return nil, err
	}
	defer ls.Close()
	for _, f := range []bpf.Family{bpf.IPv4, bpf.IPv6} {
		if err := ls.Register(kind, f, ln); err != nil {
			return nil, fmt.Errorf("register %s listener on %s: %w", kind, nd.Name, err)
		}
	}
	return ln.File()
}

// peerProc is a peer's process in a node's namespace.
type peerProc struct {
	name   string
	cmd    *exec.Cmd
	exited chan error
}

// startPeer runs bin with args in nd's namespace with ln as fd 3. Its
// stderr is the bench's; its stdout is discarded.
func startPeer(nd *meshbed.Node, ln *os.File, bin string, args ...string) (*peerProc, error) {
	defer ln.Close()
	p := &peerProc{name: filepath.Base(bin) + " on " + nd.Name, exited: make(chan error, 1)}
	p.cmd = nd.Command(context.Background(), bin, args...)
	p.cmd.Stderr = os.Stderr
	p.cmd.ExtraFiles = []*os.File{ln}
	if err := p.cmd.Start(); err != nil {
		return nil, fmt.Errorf("start %s: %w", p.name, err)
	}
	go func() { p.exited <- p.cmd.Wait() }()
	return p, nil
}

// check returns an error if the process has ended.
func (p *peerProc) check() error {
	select {
	case err := <-p.exited:
		p.exited <- err
		return fmt.Errorf("%s exited: %v", p.name, err)
	default:
		return nil
	}
}

// stop sends SIGTERM, waits up to 5 s, then kills.
func (p *peerProc) stop() error {
	if err := p.check(); err != nil {
		return err
	}
	p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.exited:
		return nil // the signal's exit status is the expected one
	case <-time.After(5 * time.Second):
		p.cmd.Process.Kill()
		<-p.exited
		return fmt.Errorf("%s did not stop on SIGTERM", p.name)
	}
}

// waitPath polls until one byte echoes from client to the echo server on
// server through the pair, or a process ends, or 15 s pass: a peer that
// started is not yet one that accepts and forwards.
func waitPath(client, server *testbed.Pod, procs []*peerProc) error {
	dst := netip.AddrPortFrom(server.IPv4, 5002)
	deadline := time.Now().Add(15 * time.Second)
	for {
		for _, p := range procs {
			if err := p.check(); err != nil {
				return err
			}
		}
		err := echoOnce(client, dst)
		if err == nil {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("no path through the pair to %s: %w", dst, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func echoOnce(p *testbed.Pod, dst netip.AddrPort) error {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	c, err := p.Dial(ctx, "tcp", dst.String())
	if err != nil {
		return err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(2 * time.Second))
	b := []byte{'x'}
	if _, err := c.Write(b); err != nil {
		return err
	}
	_, err = io.ReadFull(c, b)
	return err
}

// peerPair starts a client-side process on nodes[0] serving the outbound
// listener and a server-side one on nodes[1] serving the HBONE listener,
// each from args(side), and waits for a path through them.
func peerPair(nodes []*meshbed.Node, client, server *testbed.Pod, bin string, args func(side string) []string) ([]*peerProc, error) {
	var procs []*peerProc
	for i, side := range []struct {
		name string
		kind bpf.Listener
		port int
	}{{"client", bpf.Outbound, 15001}, {"server", bpf.HBONE, peerHBONEPort}} {
		ln, err := transparentListener(nodes[i], side.kind, side.port)
		if err != nil {
			return procs, err
		}
		p, err := startPeer(nodes[i], ln, bin, args(side.name)...)
		if err != nil {
			return procs, err
		}
		procs = append(procs, p)
	}
	return procs, waitPath(client, server, procs)
}

// haproxyConfig is the configuration of one side of the HAProxy pair.
// Both serve the inherited listener (fd@3) in TCP mode; the timeouts only
// bound idle connections past the longest measurement.
func haproxyConfig(side string, f peerFiles) string {
	tlsArgs := fmt.Sprintf("crt %s ca-file %s verify required ssl-min-ver TLSv1.3", f.Bundle, f.Roots)
	var b strings.Builder
	b.WriteString(`global
  maxconn 8192
defaults
  mode tcp
  timeout connect 5s
  timeout client 2m
  timeout server 2m
`)
	if side == "client" {
		fmt.Fprintf(&b, `frontend captured
  bind fd@3
  default_backend peer
backend peer
  server peer 0.0.0.0:%d ssl %s send-proxy-v2
`, peerHBONEPort, tlsArgs)
	} else {
		fmt.Fprintf(&b, `frontend tunnel
  bind fd@3 accept-proxy ssl %s
  default_backend pod
backend pod
  server pod 0.0.0.0
`, tlsArgs)
	}
	return b.String()
}

// haproxyVersion is the first line of `haproxy -v`, for the table.
func haproxyVersion() (string, error) {
	out, err := exec.Command("haproxy", "-v").Output()
	if err != nil {
		return "", fmt.Errorf("haproxy -v: %w (install it: make deps)", err)
	}
	line, _, _ := strings.Cut(string(out), "\n")
	if v, ok := strings.CutPrefix(line, "HAProxy version "); ok {
		line, _, _ = strings.Cut(v, " ")
	}
	return line, nil
}

// startHAProxyPair writes both sides' configurations into dir and starts
// them.
func startHAProxyPair(nodes []*meshbed.Node, client, server *testbed.Pod, dir string, files map[string]peerFiles) ([]*peerProc, error) {
	bin, err := exec.LookPath("haproxy")
	if err != nil {
		return nil, fmt.Errorf("haproxy: %w (install it: make deps)", err)
	}
	for side, f := range files {
		if err := os.WriteFile(filepath.Join(dir, "haproxy-"+side+".cfg"), []byte(haproxyConfig(side, f)), 0o600); err != nil {
			return nil, err
		}
	}
	// -db: foreground, no master process, so the process the bench
	// starts is the one it measures and stops.
	return peerPair(nodes, client, server, bin, func(side string) []string {
		return []string{"-db", "-f", filepath.Join(dir, "haproxy-"+side+".cfg")}
	})
}

// startHBONEPair starts Istio's hbone-interop as outbound and server.
func startHBONEPair(nodes []*meshbed.Node, client, server *testbed.Pod, bin string, files map[string]peerFiles) ([]*peerProc, error) {
	return peerPair(nodes, client, server, bin, func(side string) []string {
		f := files[side]
		creds := []string{"-listen-fd", "3", "-cert", f.Cert, "-key", f.Key, "-roots", f.Roots,
			// Istio logs each stream at info; amber's ztunnel logs
			// nothing per connection at its default level.
			"-log-level", "warn"}
		if side == "client" {
			return append([]string{"outbound", "-hbone-port", fmt.Sprint(peerHBONEPort),
				"-server-id", "spiffe://cluster.local/ns/default/sa/server"}, creds...)
		}
		return append([]string{"server"}, creds...)
	})
}

// hboneInteropBin builds Istio's hbone-interop with hack/istiod-bin.sh
// (cached; seconds when pilot-discovery was built, minutes otherwise).
func hboneInteropBin() (string, error) {
	cmd := exec.Command("bash", "hack/istiod-bin.sh", "hbone-interop")
	cmd.Stderr = os.Stderr
	out, err := cmd.Output()
	if err != nil {
		return "", fmt.Errorf("hack/istiod-bin.sh hbone-interop (run from the repository root): %w", err)
	}
	bin := filepath.Join(strings.TrimSpace(string(out)), "hbone-interop")
	if _, err := os.Stat(bin); err != nil {
		return "", err
	}
	return bin, nil
}

// stopPeers stops every process, reporting each failure.
func stopPeers(procs []*peerProc) error {
	var errs []error
	for _, p := range procs {
		errs = append(errs, p.stop())
	}
	return errors.Join(errs...)
}
