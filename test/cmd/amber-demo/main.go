// Command amber-demo plays Istio ambient's getting-started walkthrough on
// one machine with amber in place of Istio's node components: a real
// Kubernetes node (test/cluster) with istiod, amber installed with its
// Helm chart, then Istio's Bookinfo, sleep and notsleep, `kubectl label
// namespace default istio.io/dataplane-mode=ambient`, mTLS between them,
// an L4 AuthorizationPolicy, and a look at the node with amberctl and
// bpftool (test/realnode.Walkthrough.Run); the ingress steps through
// Istio's istio-ingressgateway, installed with Istio's own chart and
// amber's image (Walkthrough.RunIngress); then the L7 half: `istioctl
// waypoint apply` with istiod running amber-waypoint, the L7 policy,
// istio_requests_total, reviews split 90/10 in both forms (counted from
// sleep and through the ingress gateway), clean-up
// (Walkthrough.RunL7). It prints each step with the
// command a user would type and what it showed, tears everything down,
// and exits non-zero when an expectation fails.
//
//	amber-demo [-keep]
//
// -keep leaves the node, istiod and amber running (`make cluster-down`
// removes them).
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/amber-mesh/amber/test/cluster"
	"github.com/amber-mesh/amber/test/realnode"
)

func main() {
	keep := flag.Bool("keep", false, "leave the node, istiod and amber running")
	flag.Parse()
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, *keep); err != nil {
		fmt.Fprintf(os.Stderr, "\n✗ demo failed: %v\n", err)
		os.Exit(1)
	}
}

func run(ctx context.Context, keep bool) (err error) {
	if os.Geteuid() != 0 {
		return errors.New("the demo runs a Kubernetes node (kubelet, containerd) and loads BPF programs: run it as root")
	}
	log := slog.New(slog.NewTextHandler(os.Stdout, &slog.HandlerOptions{ReplaceAttr: func(_ []string, a slog.Attr) slog.Attr {
		if a.Key == slog.TimeKey || a.Key == slog.LevelKey {
			return slog.Attr{}
		}
		return a
	}}))
	dir, err := cluster.DefaultDir()
	if err != nil {
		return err
	}
	// One node per machine: a test's or a benchmark's node goes first.
	unlock, err := cluster.LockHost(func() { fmt.Println("another node runs on this machine; waiting for it") })
	if err != nil {
		return err
	}
	defer unlock()
	t0 := time.Now()
	fmt.Println("━━ 0. A Kubernetes node on this machine, with istiod (first run: builds Kubernetes, istiod, CoreDNS, Helm; later runs: seconds)")
	fmt.Println("   $ make cluster-up")
	c, err := cluster.Start(ctx, cluster.Options{Dir: dir, Istiod: true, Logger: log})
	if err != nil {
		return err
	}
	var a *realnode.Amber
	ingress := false
	defer func() {
		if keep {
			fmt.Printf("\n   left running (-keep): export KUBECONFIG=%s; make cluster-down removes it all\n", c.Kubeconfig)
			return
		}
		fmt.Println("\n━━ Tear down")
		tctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
		defer cancel()
		if ingress {
			fmt.Printf("   $ helm uninstall %s -n %s\n", realnode.IngressRelease, realnode.Namespace)
			if uerr := a.UninstallIngress(tctx); uerr != nil {
				err = errors.Join(err, uerr)
			}
		}
		if a != nil {
			fmt.Printf("   $ helm uninstall %s -n %s\n", realnode.Release, realnode.Namespace)
			if uerr := a.Uninstall(tctx); uerr != nil {
				err = errors.Join(err, uerr)
			}
		}
		fmt.Println("   $ make cluster-down")
		err = errors.Join(err, cluster.Stop(tctx, dir))
		if err == nil {
			fmt.Printf("\n✓ demo complete in %v: everything above was observed, and has been torn down.\n", time.Since(t0).Round(time.Second))
		}
	}()
	fmt.Printf("   node %s Ready, istiod at %s; export KUBECONFIG=%s\n", c.NodeName, cluster.IstiodService, c.Kubeconfig)

	fmt.Println("\n━━ Install amber (agent + ztunnel DaemonSet) with its Helm chart, image imported into the node's containerd")
	fmt.Printf("   $ helm %s\n", strings.Join(realnode.HelmArgs(c, ""), " "))
	if a, err = realnode.Install(ctx, c, realnode.Options{Logger: log}); err != nil {
		return err
	}
	fmt.Printf("   $ kubectl -n %s get pods -o wide\n", realnode.Namespace)
	out, err := c.Kubectl(ctx, "-n", realnode.Namespace, "get", "pods", "-o", "wide")
	if err != nil {
		return err
	}
	fmt.Print(indent(string(out)))

	fmt.Println("\n━━ Install Istio's ingress gateway (istio-ingressgateway) with Istio's own chart, amber's image in place of Envoy's")
	chart, err := realnode.IngressChartDir(c)
	if err != nil {
		return err
	}
	fmt.Printf("   $ helm %s\n", strings.Join(realnode.IngressHelmArgs(chart), " "))
	ingress = true
	if err := a.InstallIngress(ctx); err != nil {
		return err
	}
	w := &realnode.Walkthrough{Target: realnode.HostTarget(c), Out: os.Stdout, IstioFiles: c.Istiod.BinDir}
	if err := w.Run(ctx); err != nil {
		return err
	}
	if err := w.RunIngress(ctx); err != nil {
		return err
	}
	return w.RunL7(ctx)
}

func indent(s string) string {
	var b strings.Builder
	for _, line := range strings.Split(strings.TrimRight(s, "\n"), "\n") {
		b.WriteString("     " + line + "\n")
	}
	return b.String()
}
