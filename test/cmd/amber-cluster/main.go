// Command amber-cluster runs a real Kubernetes node on this machine (see
// package test/cluster): amber-cluster [-dir DIR] up|down|status|images.
package main

import (
	"context"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"
	"time"

	"github.com/amber-mesh/amber/test/cluster"
	"github.com/amber-mesh/amber/test/images"
)

func main() {
	dir := flag.String("dir", "", "state directory (default <repo>/.cache/cluster/node)")
	node := flag.String("node", "", "node name (default "+cluster.DefaultNodeName+")")
	withIstiod := flag.Bool("istiod", true, "also run istiod (up)")
	flag.Usage = func() {
		fmt.Fprintf(os.Stderr, "usage: amber-cluster [-dir DIR] [-node NAME] up|down|status|images\n")
		flag.PrintDefaults()
	}
	flag.Parse()
	if flag.NArg() != 1 {
		flag.Usage()
		os.Exit(2)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	log := slog.New(slog.NewTextHandler(os.Stderr, nil))
	if err := run(ctx, log, flag.Arg(0), *dir, *node, *withIstiod); err != nil {
		fmt.Fprintf(os.Stderr, "amber-cluster %s: %v\n", flag.Arg(0), err)
		os.Exit(1)
	}
}

func run(ctx context.Context, log *slog.Logger, verb, dir, node string, withIstiod bool) error {
	if dir == "" {
		var err error
		if dir, err = cluster.DefaultDir(); err != nil {
			return err
		}
	}
	switch verb {
	case "up":
		c, err := cluster.Start(ctx, cluster.Options{Dir: dir, NodeName: node, Logger: log, Istiod: withIstiod})
		if err != nil {
			return err
		}
		fmt.Printf("node %s is Ready\n  export KUBECONFIG=%s\n  kubectl: %s\n", c.NodeName, c.Kubeconfig, filepath.Join(c.BinDir, "kubectl"))
		if c.Istiod != nil {
			fmt.Printf("  istiod at %s (%s), log %s\n", cluster.IstiodService, c.Istiod.Address, c.Istiod.Log)
		}
		for _, img := range c.Images {
			fmt.Printf("  image %s (imagePullPolicy: Never)\n", img.Ref)
		}
		return nil
	case "down":
		t0 := time.Now()
		if err := cluster.Stop(ctx, dir); err != nil {
			return err
		}
		log.Info("cluster down", "took", time.Since(t0).Round(time.Millisecond))
		return nil
	case "status":
		c, err := cluster.Open(dir)
		if err != nil {
			return err
		}
		st := c.Status(ctx)
		fmt.Print(st)
		if !st.Healthy() {
			return fmt.Errorf("%s: not healthy", dir)
		}
		return nil
	case "images":
		root, err := os.Getwd()
		if err != nil {
			return err
		}
		imgs, err := images.Build(ctx, root, filepath.Join(root, ".cache", "cluster", "images"))
		if err != nil {
			return err
		}
		amber, err := images.BuildAmber(ctx, root, filepath.Join(root, ".cache", "cluster", "images"))
		if err != nil {
			return err
		}
		for _, img := range append(imgs, amber) {
			fmt.Printf("%s %s\n", img.Ref, img.Archive)
		}
		return nil
	}
	return fmt.Errorf("unknown command %q (up, down, status, images)", verb)
}
