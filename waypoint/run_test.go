package waypoint_test

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/amber-mesh/amber/internal/testutil"
	"github.com/amber-mesh/amber/tunnel/ca"
	"github.com/amber-mesh/amber/waypoint"
	"github.com/amber-mesh/amber/waypoint/config"
	"github.com/amber-mesh/amber/waypoint/node"
)

// stepDataPath is the data path at Run's interface: it records what Run
// asks of it, in order. ServeHBONE serves ln (accepting and closing) until
// it is closed, or fails at once with fail.
type stepDataPath struct {
	fail error
	// onQuiesce, if set, runs in Quiesce.
	onQuiesce func()

	mu    sync.Mutex // guards the fields below
	steps []string
	ln    net.Listener
}

func (d *stepDataPath) step(s string) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.steps = append(d.steps, s)
}

func (d *stepDataPath) Steps() []string {
	d.mu.Lock()
	defer d.mu.Unlock()
	return slices.Clone(d.steps)
}

func (d *stepDataPath) Update(*config.Config) {}

func (d *stepDataPath) ServeHBONE(ln net.Listener) error {
	if d.fail != nil {
		return d.fail
	}
	d.mu.Lock()
	d.ln = ln
	d.mu.Unlock()
	d.step("serving")
	for {
		c, err := ln.Accept()
		if err != nil {
			d.step("served")
			return fmt.Errorf("step data path: %w", err)
		}
		c.Close()
	}
}

func (d *stepDataPath) Quiesce() {
	d.step("quiesce")
	if d.onQuiesce != nil {
		d.onQuiesce()
	}
}

func (d *stepDataPath) Drain(context.Context) error {
	d.step("drain")
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.ln != nil {
		d.ln.Close() // as proxy.Drain closes its listeners
	}
	return nil
}

func (d *stepDataPath) Close() error {
	d.step("close")
	return nil
}

// runConfig is a waypoint whose istiod is unreachable (it never becomes
// ready, which Run does not need to run) on loopback listeners.
func runConfig(t *testing.T, dp waypoint.DataPath) (waypoint.Config, string) {
	t.Helper()
	dir := t.TempDir()
	local, err := ca.OpenLocal(filepath.Join(dir, "ca"), "cluster.local")
	if err != nil {
		t.Fatal(err)
	}
	roots, token := filepath.Join(dir, "root-cert.pem"), filepath.Join(dir, "istio-token")
	if err := os.WriteFile(roots, local.RootPEM(), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(token, []byte("token"), 0o600); err != nil {
		t.Fatal(err)
	}
	// Nothing listens on the address istiod would have: the xDS client
	// and the certificate keep retrying until Run stops them.
	dead, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	dead.Close()
	var lns waypoint.Listeners
	for _, ln := range []*net.Listener{&lns.HBONE, &lns.Metrics, &lns.Readiness, &lns.Admin} {
		if *ln, err = net.Listen("tcp", "127.0.0.1:0"); err != nil {
			t.Fatal(err)
		}
	}
	return waypoint.Config{
		Node: node.Node{
			IP: netip.MustParseAddr("10.244.0.20"), PodName: "waypoint-0", Namespace: "default", ServiceAccount: "waypoint",
			Labels: map[string]string{node.GatewayNameLabel: "waypoint"},
		},
		XDSAddress:   dead.Addr().String(),
		RootCertFile: roots,
		TokenFile:    token,
		Listeners:    lns,
		DrainTimeout: 50 * time.Millisecond,
		NewDataPath:  func(waypoint.DataPathConfig) (waypoint.DataPath, error) { return dp, nil },
		Logger:       slog.New(slog.DiscardHandler),
	}, "http://" + lns.Metrics.Addr().String() + "/stats/prometheus"
}

// TestRunStops: on the end of its context Run fails readiness and
// quiesces the data path with the HBONE listener still accepting (the
// ztunnels dial the pod until istiod tells them it is going), then drains
// it, stops serving HBONE and closes the data path last, and returns nil;
// the status ports are closed.
func TestRunStops(t *testing.T) {
	dp := &stepDataPath{}
	cfg, metricsURL := runConfig(t, dp)
	readyURL := "http://" + cfg.Listeners.Readiness.Addr().String() + "/healthz/ready"
	var quiesced []string
	dp.onQuiesce = func() {
		if c, err := net.Dial("tcp", cfg.Listeners.HBONE.Addr().String()); err != nil {
			quiesced = append(quiesced, fmt.Sprintf("HBONE refused: %v", err))
		} else {
			c.Close()
		}
		if resp, err := http.Get(readyURL); err != nil || resp.StatusCode != http.StatusServiceUnavailable {
			quiesced = append(quiesced, fmt.Sprintf("readiness %v %v, want 503", resp, err))
		}
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- waypoint.Run(ctx, cfg) }()
	testutil.Eventually(t, "the metrics port", func() bool {
		resp, err := http.Get(metricsURL)
		if err != nil {
			return false
		}
		resp.Body.Close()
		return resp.StatusCode == http.StatusOK && slices.Contains(dp.Steps(), "serving")
	})
	cancel()
	if err := <-done; err != nil {
		t.Fatalf("Run: %v", err)
	}
	if got, want := dp.Steps(), []string{"serving", "quiesce", "drain", "served", "close"}; !slices.Equal(got, want) {
		t.Errorf("data path steps %v, want %v", got, want)
	}
	if len(quiesced) > 0 {
		t.Errorf("while quiescing: %q", quiesced)
	}
	if _, err := http.Get(metricsURL); err == nil {
		t.Error("the metrics port still serves after Run returned")
	}
}

// TestRunFails: a part that fails stops Run with its error, named; the
// data path is closed without a drain.
func TestRunFails(t *testing.T) {
	dp := &stepDataPath{fail: errors.New("listener gone")}
	cfg, _ := runConfig(t, dp)
	err := waypoint.Run(context.Background(), cfg)
	if err == nil || !strings.Contains(err.Error(), "hbone: listener gone") {
		t.Fatalf("Run = %v, want the HBONE task's failure", err)
	}
	if got, want := dp.Steps(), []string{"close"}; !slices.Equal(got, want) {
		t.Errorf("data path steps %v, want %v", got, want)
	}
}
