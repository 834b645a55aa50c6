package proxy_test

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"encoding/pem"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/amber-mesh/amber/test/buildcache"
	"github.com/amber-mesh/amber/test/proc"
	"github.com/amber-mesh/amber/tunnel/ca"
)

// TestIntegrationIstioHBONEClient runs Istio's own Go HBONE client
// (istio.io/istio pkg/hbone, the hbone-interop program test/interop
// uses) against the waypoint's :15008 with sleep's and notsleep's
// certificates: the waypoint's TLS, CONNECT and HTTP inside the tunnel
// work with Istio's implementation, and the policy decides.
func TestIntegrationIstioHBONEClient(t *testing.T) {
	dir := buildcache.Dir(t, buildcache.Build{
		What:      "Istio's hbone-interop",
		Script:    "istiod-bin.sh",
		Args:      []string{"hbone-interop"},
		BinDirEnv: "AMBER_ISTIOD_BIN_DIR",
		Files:     []string{"hbone-interop"},
	})
	bin := filepath.Join(dir, "hbone-interop")
	m := newMesh(t, meshOptions{})
	m.wp.Update(compile(t, golden(t, "authz-productpage-viewer")))
	const request = "GET /productpage HTTP/1.1\r\nHost: productpage:9080\r\n\r\n"
	for _, tc := range []struct {
		principal, want string
	}{
		{sleepID, "HTTP/1.1 200"},
		{notSleepID, "HTTP/1.1 403"},
	} {
		files := m.issueFiles(t, tc.principal)
		ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
		var stdout, stderr bytes.Buffer
		cmd := exec.CommandContext(ctx, bin, "client", "-proxy", m.addr.String(), "-target", productpageVIP,
			"-server-id", waypointID, "-read", "12",
			"-cert", files[0], "-key", files[1], "-roots", files[2])
		cmd.Stdin = strings.NewReader(request)
		cmd.Stdout, cmd.Stderr = &stdout, &stderr
		cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
		err := proc.RunLocked(cmd)
		cancel()
		if err != nil {
			t.Fatalf("%s: istio client: %v\n%s", tc.principal, err, stderr.Bytes())
		}
		if got := stdout.String(); got != tc.want {
			t.Errorf("%s: %q, want %q", tc.principal, got, tc.want)
		}
		if want := "proxy identity " + waypointID; !strings.Contains(stderr.String(), want) {
			t.Errorf("istio client stderr lacks %q:\n%s", want, stderr.Bytes())
		}
	}
	if n := len(m.pods["productpage-v1"].app.requests()); n != 1 {
		t.Errorf("productpage served %d requests, want sleep's", n)
	}
}

// issueFiles has the mesh CA issue a certificate for principal and
// writes chain, key and roots as PEM files.
func (m *mesh) issueFiles(t *testing.T, principal string) [3]string {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	id := mustID(t, principal)
	csr, err := ca.CreateCSR(key, id)
	if err != nil {
		t.Fatal(err)
	}
	chain, err := m.ca.Sign(context.Background(), csr, id, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	der, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	files := [3]string{filepath.Join(dir, "cert-chain.pem"), filepath.Join(dir, "key.pem"), filepath.Join(dir, "root-cert.pem")}
	for i, b := range [][]byte{ca.EncodeChain(chain), pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}), m.ca.RootPEM()} {
		if err := os.WriteFile(files[i], b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	return files
}
