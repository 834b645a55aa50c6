package realnode

import (
	"bytes"
	"context"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"

	"github.com/amber-mesh/amber/test/cluster"
	"github.com/amber-mesh/amber/test/images"
)

// Names of the installation.
const (
	// Namespace is where amber is installed: istiod trusts the
	// istio-system/ztunnel service account to ask for workload
	// certificates (CA_TRUSTED_NODE_ACCOUNTS).
	Namespace = "istio-system"
	// DaemonSet is the chart's DaemonSet (and its pods' app label).
	DaemonSet = "ztunnel"
	// Release is the Helm release name.
	Release = "amber"
	// RunDir is the agent's host directory (plugin socket, API-access
	// file), the DaemonSet's /var/run/amber hostPath.
	RunDir = "/run/amber"
)

// Options configure Install. The zero value is usable.
type Options struct {
	// LogLevel is amber's log level. Zero means info.
	LogLevel string
	// Logger receives progress. Zero discards it.
	Logger *slog.Logger
	// ReadyTimeout bounds the wait for the DaemonSet. Zero means 3 min.
	ReadyTimeout time.Duration
}

// Amber is amber installed on a node.
type Amber struct {
	// Image is the image the DaemonSet runs.
	Image images.Image
	c     *cluster.Cluster
	opts  Options
	root  string
	helm  string
}

// Install builds amber's image (cached), imports it into the node's
// containerd, installs the Helm chart and waits until the
// DaemonSet is Ready on the node.
func Install(ctx context.Context, c *cluster.Cluster, opts Options) (*Amber, error) {
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	if opts.ReadyTimeout == 0 {
		opts.ReadyTimeout = 3 * time.Minute
	}
	root, err := cluster.RepoRoot()
	if err != nil {
		return nil, err
	}
	a := &Amber{c: c, opts: opts, root: root}
	t0 := time.Now()
	if a.Image, err = images.BuildAmber(ctx, root, filepath.Join(root, ".cache", "cluster", "images")); err != nil {
		return nil, fmt.Errorf("install amber: %w", err)
	}
	if err := c.ImportImages(ctx, a.Image); err != nil {
		return nil, fmt.Errorf("install amber: %w", err)
	}
	opts.Logger.Info("amber image imported", "image", a.Image.Ref, "took", time.Since(t0).Round(time.Millisecond))
	if _, err := a.Helm(ctx, HelmArgs(c, opts.LogLevel)...); err != nil {
		return nil, fmt.Errorf("install amber: %w", err)
	}
	if err := a.WaitReady(ctx); err != nil {
		return nil, fmt.Errorf("install amber: %w", err)
	}
	opts.Logger.Info("amber ready", "took", time.Since(t0).Round(time.Millisecond))
	return a, nil
}

// HelmArgs returns the `helm install` command line (after "helm") that
// installs the chart, from the repository root, on c with log level
// logLevel.
func HelmArgs(c *cluster.Cluster, logLevel string) []string {
	ref := images.Amber.Ref
	i := strings.LastIndex(ref, ":")
	repo, tag := ref[:i], ref[i+1:]
	if logLevel == "" {
		logLevel = "info"
	}
	return []string{"install", Release, filepath.Join("deploy", "helm", "amber"),
		"--namespace", Namespace, "--create-namespace",
		"--set", "image.repository=" + repo,
		"--set", "image.tag=" + tag,
		"--set", "image.pullPolicy=Never",
		"--set", "cni.binDir=" + c.CNIBinDir,
		"--set", "cni.confDir=" + c.CNIConfDir,
		"--set", "agent.uplinks={" + cluster.NodeLink + "}",
		"--set", "logging.format=text",
		"--set", "logging.level=" + logLevel,
	}
}

// Upgrade runs `helm upgrade` of the release with its values and the
// --set assignments in set (e.g. "waypoint.enabled=false").
func (a *Amber) Upgrade(ctx context.Context, set ...string) error {
	args := []string{"upgrade", Release, filepath.Join("deploy", "helm", "amber"), "--namespace", Namespace, "--reuse-values"}
	for _, s := range set {
		args = append(args, "--set", s)
	}
	_, err := a.Helm(ctx, args...)
	return err
}

func (a *Amber) ensureHelm(ctx context.Context) error {
	if a.helm != "" {
		return nil
	}
	cmd := exec.CommandContext(ctx, "bash", filepath.Join(a.root, "hack", "helm.sh"))
	cmd.Dir = a.root
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("build helm: %w: %s", err, bytes.TrimSpace(out))
	}
	a.helm = filepath.Join(a.root, ".cache", "bin", "helm")
	return nil
}

// Helm runs helm against the node and returns its standard output.
func (a *Amber) Helm(ctx context.Context, args ...string) ([]byte, error) {
	if err := a.ensureHelm(ctx); err != nil {
		return nil, err
	}
	cmd := exec.CommandContext(ctx, a.helm, append([]string{"--kubeconfig", a.c.Kubeconfig}, args...)...)
	cmd.Dir = a.root
	cmd.Env = append(os.Environ(), "HELM_CACHE_HOME="+filepath.Join(a.c.Dir, "helm", "cache"),
		"HELM_CONFIG_HOME="+filepath.Join(a.c.Dir, "helm", "config"), "HELM_DATA_HOME="+filepath.Join(a.c.Dir, "helm", "data"))
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return out, fmt.Errorf("helm %s: %w: %s", strings.Join(args, " "), err, bytes.TrimSpace(stderr.Bytes()))
	}
	return out, nil
}

// WaitReady waits until the DaemonSet has an up-to-date, ready pod on
// every node it schedules to.
func (a *Amber) WaitReady(ctx context.Context) error {
	return WaitDaemonSet(ctx, a.c.Client, a.opts.ReadyTimeout)
}

// WaitDaemonSet waits, at most timeout, until amber's DaemonSet in the
// cluster of client has an up-to-date, ready pod on every node it
// schedules to.
func WaitDaemonSet(ctx context.Context, client kubernetes.Interface, timeout time.Duration) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	var last string
	for {
		ds, err := client.AppsV1().DaemonSets(Namespace).Get(ctx, DaemonSet, metav1.GetOptions{})
		if err == nil {
			if dsReady(ds) {
				return nil
			}
			last = fmt.Sprintf("desired %d, updated %d, ready %d, available %d (generation %d, observed %d)",
				ds.Status.DesiredNumberScheduled, ds.Status.UpdatedNumberScheduled, ds.Status.NumberReady,
				ds.Status.NumberAvailable, ds.Generation, ds.Status.ObservedGeneration)
		} else {
			last = err.Error()
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("daemonset %s/%s not ready: %s", Namespace, DaemonSet, last)
		case <-time.After(200 * time.Millisecond):
		}
	}
}

func dsReady(ds *appsv1.DaemonSet) bool {
	s := ds.Status
	return ds.Status.ObservedGeneration >= ds.Generation && s.DesiredNumberScheduled > 0 &&
		s.UpdatedNumberScheduled == s.DesiredNumberScheduled && s.NumberReady == s.DesiredNumberScheduled &&
		s.NumberAvailable == s.DesiredNumberScheduled
}

// Uninstall removes amber (`helm uninstall --wait`) and waits until its
// pods are gone.
func (a *Amber) Uninstall(ctx context.Context) error {
	if _, err := a.Helm(ctx, "uninstall", Release, "--namespace", Namespace, "--wait", "--timeout", "2m"); err != nil {
		return err
	}
	for {
		pods, err := a.c.Client.CoreV1().Pods(Namespace).List(ctx, metav1.ListOptions{LabelSelector: "app=" + DaemonSet})
		if err == nil && len(pods.Items) == 0 {
			// The kubelet made the hostPath (DirectoryOrCreate); the agent
			// empties it but cannot remove its own mount point. The node
			// is this machine: remove it, and say so if something is left
			// in it.
			if err := os.Remove(RunDir); err != nil && !os.IsNotExist(err) {
				return fmt.Errorf("uninstall: %w", err)
			}
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("uninstall: amber pods still present: %w", ctx.Err())
		case <-time.After(200 * time.Millisecond):
		}
	}
}
