package istiod_test

import (
	"bufio"
	"context"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	adminv3 "github.com/envoyproxy/go-control-plane/envoy/admin/v3"
	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	"google.golang.org/protobuf/encoding/protojson"

	"github.com/amber-mesh/amber/internal/testutil"
	"github.com/amber-mesh/amber/test/istiod"
	"github.com/amber-mesh/amber/test/kube"
	"github.com/amber-mesh/amber/tunnel/identity"
	"github.com/amber-mesh/amber/waypoint"
	"github.com/amber-mesh/amber/waypoint/config"
)

// recordingDataPath stands in for waypoint/proxy at Run's interface: it
// keeps every configuration Run hands it and closes every HBONE
// connection (it serves nothing).
type recordingDataPath struct {
	deps waypoint.DataPathConfig

	mu      sync.Mutex
	configs []*config.Config
	drained bool
	closed  bool
}

func (r *recordingDataPath) Update(c *config.Config) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.configs = append(r.configs, c)
}

func (r *recordingDataPath) latest() *config.Config {
	r.mu.Lock()
	defer r.mu.Unlock()
	if len(r.configs) == 0 {
		return nil
	}
	return r.configs[len(r.configs)-1]
}

func (r *recordingDataPath) ServeHBONE(ln net.Listener) error {
	for {
		c, err := ln.Accept()
		if err != nil {
			return err
		}
		c.Close()
	}
}

func (r *recordingDataPath) Quiesce() {}

func (r *recordingDataPath) Drain(context.Context) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.drained = true
	return nil
}

func (r *recordingDataPath) Close() error {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.closed = true
	return nil
}

func mustListen(t *testing.T) net.Listener {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	must(t, err)
	return ln
}

// testLog writes Run's log into the test's.
type testLog struct{ t *testing.T }

func (w testLog) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimSpace(string(p)))
	return len(p), nil
}

func httpGet(ctx context.Context, url string) (int, []byte, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return 0, nil, err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return 0, nil, err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return resp.StatusCode, b, err
}

const viewerRule = "ns[default]-policy[productpage-viewer]-rule[0]"

// hasPolicy reports whether c enforces the viewer policy on productpage.
func hasPolicy(c *config.Config, name string) bool {
	if c == nil || c.Dispatch == nil {
		return false
	}
	ch := c.Dispatch.Chains["inbound-vip|9080|http|productpage.default.svc.cluster.local"]
	if ch == nil || ch.HTTP == nil {
		return false
	}
	for _, f := range ch.HTTP.RBAC {
		if f.Rules != nil && slices.Contains(f.Rules.Policies(), name) {
			return true
		}
	}
	return false
}

// TestIntegrationWaypointRun runs amber-waypoint's control side in process
// as the walkthrough's waypoint pod would run it (its own token, node
// metadata and certificate) against a real istiod: it becomes ready,
// compiles istiod's configuration without a problem, serves Envoy's
// config_dump (which istioctl's proxy-config reads), follows a policy
// change, and keeps its configuration and readiness when istiod goes away.
func TestIntegrationWaypointRun(t *testing.T) {
	bin := istiod.Binaries(t)
	istioctl := istiod.Istioctl(t)
	cp := kube.Start(t, kube.Options{})
	d := istiod.Start(t, cp, istiod.Options{BinDir: bin, GatewayAPI: true})
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	wp := setupWaypointMesh(t, ctx, cp)
	waitGatewayAddress(t, ctx, cp)

	// The pod's projected files.
	dir := t.TempDir()
	token, err := d.TokenFor(ctx, meshNS, waypointName, wp)
	must(t, err)
	tokenFile, rootFile := filepath.Join(dir, "istio-token"), filepath.Join(dir, "root-cert.pem")
	must(t, os.WriteFile(tokenFile, []byte(token), 0o600))
	must(t, os.WriteFile(rootFile, d.RootPEM, 0o644))

	w := startWaypoint(t, ctx, waypoint.Config{
		Node:         waypointNode(),
		XDSAddress:   d.Address,
		ServerName:   d.ServerName,
		RootCertFile: rootFile,
		TokenFile:    tokenFile,
	})
	dp, readyURL, metricsURL, adminURL := w.dp, w.readyURL, w.metricsURL, w.adminURL
	if code, body, err := httpGet(ctx, readyURL); err != nil || code != http.StatusOK {
		t.Fatalf("/healthz/ready after Ready: %d %s %v", code, body, err)
	}

	// What istiod sent compiles without a problem, and the data path got it.
	c := dp.latest()
	if c == nil {
		t.Fatal("no configuration handed to the data path")
	}
	if err := c.Err(""); err != nil {
		t.Errorf("problems compiling istiod's configuration: %v", err)
	}
	if c.Terminate == nil || c.Dispatch == nil || c.Originate == nil {
		t.Fatalf("incomplete: terminate %v dispatch %v originate %v", c.Terminate, c.Dispatch, c.Originate)
	}
	for _, s := range meshServices {
		name := fmt.Sprintf("inbound-vip|9080|http|%s.default.svc.cluster.local", s.name)
		if ch := c.Dispatch.Chains[name]; ch == nil || ch.Err != nil {
			t.Errorf("chain %s: %+v", name, ch)
		}
		if cl := c.Clusters[name]; cl == nil || cl.Err != nil || len(cl.Endpoints) == 0 {
			t.Errorf("cluster %s: %+v", name, cl)
		}
	}
	// WDS reached the store the data path reads.
	if w := dp.deps.Store.Load().Workload("Kubernetes//Pod/default/productpage-v1"); w == nil || w.ServiceAccount != "bookinfo-productpage" {
		t.Errorf("productpage-v1 in WDS: %+v", w)
	}
	if want := (identity.ID{TrustDomain: "cluster.local", Namespace: meshNS, ServiceAccount: waypointName}); dp.deps.Identity != want {
		t.Errorf("identity %v, want %v", dp.deps.Identity, want)
	}

	dump := checkConfigDump(t, ctx, adminURL, d.RootPEM)
	checkIstioctl(t, ctx, istioctl, adminURL, dump)

	// A policy change in the API server reaches the compiled configuration.
	applyYAML(t, ctx, cp, "viewer", istiod.ViewerPolicy("default", "productpage", "GET"))
	testutil.EventuallyNil(t, "the viewer policy compiled", func() error {
		if !hasPolicy(dp.latest(), viewerRule) {
			return errors.New("the viewer policy is not compiled yet")
		}
		return nil
	})
	if err := dp.latest().Err(""); err != nil {
		t.Errorf("problems with the policy: %v", err)
	}

	// istiod goes away: the configuration stays, and so does readiness.
	dp.mu.Lock()
	n := len(dp.configs)
	dp.mu.Unlock()
	must(t, d.Stop())
	testutil.EventuallyNil(t, "istiod's disconnect counted", func() error {
		_, body, err := httpGet(ctx, metricsURL)
		if err != nil {
			return err
		}
		if v := metricValue(string(body), `amber_xds_events_total{event="disconnects"}`); v == "" || v == "0" {
			return fmt.Errorf("no disconnect counted yet (%q)", v)
		}
		return nil
	})
	if code, body, err := httpGet(ctx, readyURL); err != nil || code != http.StatusOK {
		t.Errorf("/healthz/ready without istiod: %d %s %v", code, body, err)
	}
	dp.mu.Lock()
	if len(dp.configs) != n {
		t.Errorf("%d configurations handed on after istiod went away", len(dp.configs)-n)
	}
	dp.mu.Unlock()
	if !hasPolicy(dp.latest(), viewerRule) {
		t.Error("the last good configuration was dropped")
	}
	if code, _, err := httpGet(ctx, adminURL+"/config_dump"); err != nil || code != http.StatusOK {
		t.Errorf("config_dump without istiod: %d %v", code, err)
	}

	// SIGTERM: drain, then close.
	w.stop(t)
	dp.mu.Lock()
	defer dp.mu.Unlock()
	if !dp.drained || !dp.closed {
		t.Errorf("drained %v, closed %v", dp.drained, dp.closed)
	}
}

// runningWaypoint is waypoint.Run in a goroutine, on loopback listeners,
// with a recordingDataPath.
type runningWaypoint struct {
	dp                             *recordingDataPath
	readyURL, metricsURL, adminURL string
	done                           chan error
	cancel                         context.CancelFunc
	stopped                        bool
}

// startWaypoint runs cfg (its listeners, data path, logger and Ready set
// here) until the test ends, and waits until it is ready.
func startWaypoint(t *testing.T, ctx context.Context, cfg waypoint.Config) *runningWaypoint {
	t.Helper()
	w := &runningWaypoint{dp: &recordingDataPath{}, done: make(chan error, 1)}
	cfg.Listeners = waypoint.Listeners{HBONE: mustListen(t), Metrics: mustListen(t), Readiness: mustListen(t), Admin: mustListen(t)}
	w.readyURL = "http://" + cfg.Listeners.Readiness.Addr().String() + "/healthz/ready"
	w.metricsURL = "http://" + cfg.Listeners.Metrics.Addr().String() + "/stats/prometheus"
	w.adminURL = "http://" + cfg.Listeners.Admin.Addr().String()
	cfg.NewDataPath = func(c waypoint.DataPathConfig) (waypoint.DataPath, error) {
		w.dp.deps = c
		return w.dp, nil
	}
	cfg.Logger = slog.New(slog.NewTextHandler(testLog{t}, &slog.HandlerOptions{Level: slog.LevelInfo}))
	ready := make(chan struct{})
	cfg.Ready = func() { close(ready) }
	var runCtx context.Context
	runCtx, w.cancel = context.WithCancel(context.Background())
	go func() { w.done <- waypoint.Run(runCtx, cfg) }()
	t.Cleanup(func() { w.stop(t) })

	select {
	case <-ready:
	case err := <-w.done:
		w.stopped = true
		t.Fatalf("Run returned before ready: %v", err)
	case <-ctx.Done():
		_, body, _ := httpGet(context.Background(), w.readyURL)
		t.Fatalf("never ready: %s", body)
	}
	return w
}

// stop is SIGTERM: Run drains and returns, which must be without error.
func (w *runningWaypoint) stop(t *testing.T) {
	if w.stopped {
		return
	}
	w.stopped = true
	w.cancel()
	if err := <-w.done; err != nil {
		t.Errorf("Run: %v", err)
	}
}

func metricValue(body, series string) string {
	sc := bufio.NewScanner(strings.NewReader(body))
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), series+" "); ok {
			return v
		}
	}
	return ""
}

// checkConfigDump reads /config_dump as Envoy's ConfigDump (strictly:
// every field Envoy's, every Any known) and checks the waypoint's
// listeners, clusters and certificate in it; it returns the dump.
func checkConfigDump(t *testing.T, ctx context.Context, adminURL string, rootPEM []byte) []byte {
	t.Helper()
	code, body, err := httpGet(ctx, adminURL+"/config_dump")
	if err != nil || code != http.StatusOK {
		t.Fatalf("config_dump: %d %v %s", code, err, body)
	}
	dump := &adminv3.ConfigDump{}
	if err := protojson.Unmarshal(body, dump); err != nil {
		t.Fatalf("config_dump is not an envoy.admin.v3.ConfigDump: %v", err)
	}
	var listeners, clusters []string
	for _, a := range dump.GetConfigs() {
		switch {
		case a.MessageIs(&adminv3.ListenersConfigDump{}):
			ld := &adminv3.ListenersConfigDump{}
			must(t, a.UnmarshalTo(ld))
			for _, l := range ld.GetDynamicListeners() {
				m := &listenerv3.Listener{}
				must(t, l.GetActiveState().GetListener().UnmarshalTo(m))
				listeners = append(listeners, m.GetName())
				if l.GetClientStatus() != adminv3.ClientResourceStatus_ACKED {
					t.Errorf("listener %s: %v %s", m.GetName(), l.GetClientStatus(), l.GetErrorState().GetDetails())
				}
			}
		case a.MessageIs(&adminv3.ClustersConfigDump{}):
			cd := &adminv3.ClustersConfigDump{}
			must(t, a.UnmarshalTo(cd))
			for _, c := range cd.GetDynamicActiveClusters() {
				m := &clusterv3.Cluster{}
				must(t, c.GetCluster().UnmarshalTo(m))
				clusters = append(clusters, m.GetName())
			}
		case a.MessageIs(&adminv3.SecretsConfigDump{}):
			sd := &adminv3.SecretsConfigDump{}
			must(t, a.UnmarshalTo(sd))
			checkCertificate(t, sd, rootPEM)
		}
	}
	for _, want := range []string{config.ConnectTerminate, config.MainInternal, config.ConnectOriginate} {
		if !slices.Contains(listeners, want) {
			t.Errorf("config_dump listeners %v lack %s", listeners, want)
		}
	}
	for _, want := range []string{config.ConnectOriginate, "inbound-vip|9080|http|productpage.default.svc.cluster.local"} {
		if !slices.Contains(clusters, want) {
			t.Errorf("config_dump clusters %v lack %s", clusters, want)
		}
	}
	return body
}

// checkCertificate: the waypoint's own certificate from istiod's CA, for
// its own identity, chaining to the mesh roots.
func checkCertificate(t *testing.T, sd *adminv3.SecretsConfigDump, rootPEM []byte) {
	t.Helper()
	for _, s := range sd.GetDynamicActiveSecrets() {
		if s.GetName() != "default" {
			continue
		}
		sec := &tlsv3.Secret{}
		must(t, s.GetSecret().UnmarshalTo(sec))
		block, rest := pem.Decode(sec.GetTlsCertificate().GetCertificateChain().GetInlineBytes())
		if block == nil {
			t.Fatal("no certificate in the default secret")
		}
		leaf, err := x509.ParseCertificate(block.Bytes)
		must(t, err)
		id, err := identity.FromCertificate(leaf)
		must(t, err)
		if id.String() != "spiffe://cluster.local/ns/"+meshNS+"/sa/"+waypointName {
			t.Errorf("certificate for %s", id)
		}
		roots, inter := x509.NewCertPool(), x509.NewCertPool()
		roots.AppendCertsFromPEM(rootPEM)
		inter.AppendCertsFromPEM(rest)
		if _, err := leaf.Verify(x509.VerifyOptions{Roots: roots, Intermediates: inter, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}}); err != nil {
			t.Errorf("certificate does not chain to the mesh roots: %v", err)
		}
		return
	}
	t.Error("no default secret (the waypoint's certificate) in config_dump")
}

// checkIstioctl runs the pinned istioctl's proxy-config on what the
// admin port serves, as `istioctl proxy-config <kind> <pod>` would read
// it through a port-forward (the --file form takes the same parsers).
func checkIstioctl(t *testing.T, ctx context.Context, istioctl, adminURL string, dump []byte) {
	t.Helper()
	dir := t.TempDir()
	dumpFile, clustersFile := filepath.Join(dir, "config_dump.json"), filepath.Join(dir, "clusters.json")
	must(t, os.WriteFile(dumpFile, dump, 0o644))
	code, clusters, err := httpGet(ctx, adminURL+"/clusters?format=json")
	if err != nil || code != http.StatusOK {
		t.Fatalf("/clusters: %d %v", code, err)
	}
	must(t, os.WriteFile(clustersFile, clusters, 0o644))
	for _, tc := range []struct {
		args []string
		want []string
	}{
		// The summary of a waypoint's listeners: connect_terminate's port and
		// main_internal's chains by destination.
		{[]string{"listeners", "--file", dumpFile}, []string{"0.0.0.0   15008", "Cluster: inbound-vip|9080|http|productpage.default.svc.cluster.local", "Cluster: connect_originate"}},
		{[]string{"listeners", "--file", dumpFile, "-o", "json"}, []string{`"name": "connect_terminate"`, `"name": "main_internal"`, `"name": "connect_originate"`}},
		{[]string{"clusters", "--file", dumpFile}, []string{"productpage.default.svc.cluster.local", "connect_originate"}},
		{[]string{"routes", "--file", dumpFile}, []string{"productpage.default.svc.cluster.local"}},
		{[]string{"endpoints", "--file", clustersFile}, []string{"envoy://connect_originate/10.244.0.10:9080", "HEALTHY", "inbound-vip|9080|http|productpage.default.svc.cluster.local"}},
		{[]string{"secret", "--file", dumpFile}, []string{"default", "ROOTCA", "VALID"}},
		{[]string{"bootstrap", "--file", dumpFile}, []string{"waypoint~" + waypointIP}},
		{[]string{"all", "--file", dumpFile}, []string{"connect_terminate", "productpage.default.svc.cluster.local"}},
	} {
		cmd := exec.CommandContext(ctx, istioctl, append([]string{"proxy-config"}, tc.args...)...)
		cmd.Env = append(os.Environ(), "HOME="+dir)
		out, err := cmd.CombinedOutput()
		if err != nil {
			t.Errorf("istioctl proxy-config %s: %v\n%s", strings.Join(tc.args, " "), err, out)
			continue
		}
		for _, w := range tc.want {
			if !strings.Contains(string(out), w) {
				t.Errorf("istioctl proxy-config %s does not show %q:\n%s", tc.args[0], w, out)
			}
		}
	}
}
