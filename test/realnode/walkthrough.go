package realnode

import (
	"context"
	"fmt"
	"io"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/amber-mesh/amber/test/images"
)

// Walkthrough plays Istio ambient's getting-started on a node where amber
// is installed: deploy Bookinfo, sleep and notsleep in ns, label the
// namespace, reach productpage from both clients through the mesh with
// mTLS (and Bookinfo's own calls behind it), apply the L4 policy that
// admits only sleep, and show the node with amberctl and its membership
// map. Each step prints the command a user would type and what it showed;
// the first expectation that fails is returned.
//
// It runs on any Target: the local node (HostTarget, `make demo`) or a
// cluster reached through its API server (NewKubeTarget, `make
// test-kind`). On a cluster of many nodes each observation is made on the
// node of the pod it concerns: capture on the pod's, the mTLS and DENY
// metrics on productpage's (the destination reports them).
type Walkthrough struct {
	// Target is the cluster, with amber installed.
	Target *Target
	Out    io.Writer
	// Namespace is where the workloads go. Zero means "default", as in
	// Istio's walkthrough.
	Namespace string
	// IstioFiles is the directory holding the pinned Istio's ingress
	// samples (cluster.Istiod.BinDir). Set, RunIngress can run, RunL7
	// counts the split through the ingress gateway too and its clean-up
	// removes the sample's Gateway. Zero: no ingress steps.
	IstioFiles string

	n int
}

func (w *Walkthrough) step(title string) {
	w.n++
	fmt.Fprintf(w.Out, "\n━━ %d. %s\n", w.n, title)
}

func (w *Walkthrough) say(format string, args ...any) {
	fmt.Fprintf(w.Out, "   "+format+"\n", args...)
}

func (w *Walkthrough) shell(cmd string) { fmt.Fprintf(w.Out, "   $ %s\n", cmd) }

func (w *Walkthrough) output(s string) {
	for _, line := range strings.Split(strings.TrimRight(s, "\n"), "\n") {
		fmt.Fprintf(w.Out, "     %s\n", line)
	}
}

// kubectl runs and prints a kubectl command the user would type.
func (w *Walkthrough) kubectl(ctx context.Context, args ...string) (string, error) {
	w.shell("kubectl " + strings.Join(args, " "))
	out, err := w.Target.Kubectl(ctx, args...)
	w.output(string(out))
	return string(out), err
}

// kubectlHead runs and prints a kubectl command the user would type with
// `| head -n n` after it: the first n lines of its output. The whole
// output is returned.
func (w *Walkthrough) kubectlHead(ctx context.Context, n int, args ...string) (string, error) {
	w.shell(fmt.Sprintf("kubectl %s | head -n%d", strings.Join(args, " "), n))
	out, err := w.Target.Kubectl(ctx, args...)
	lines := strings.SplitAfter(string(out), "\n")
	w.output(strings.Join(lines[:min(n, len(lines))], ""))
	if err != nil {
		w.output(err.Error())
	}
	return string(out), err
}

// kubectlGrep runs and prints a kubectl command the user would type with
// `| grep pattern` after it: the lines of its output that match. The
// whole output is returned.
func (w *Walkthrough) kubectlGrep(ctx context.Context, pattern string, args ...string) (string, error) {
	w.shell(fmt.Sprintf("kubectl %s | grep %s", strings.Join(args, " "), pattern))
	out, err := w.Target.Kubectl(ctx, args...)
	re := regexp.MustCompile(pattern)
	var match []string
	for _, l := range strings.Split(string(out), "\n") {
		if re.MatchString(l) {
			match = append(match, strings.TrimSpace(l))
		}
	}
	w.output(strings.Join(match, "\n"))
	return string(out), err
}

// Run plays the walkthrough.
func (w *Walkthrough) Run(ctx context.Context) error {
	t := w.Target
	ns := w.Namespace
	if ns == "" {
		ns = "default"
	}
	nsArgs := func(args ...string) []string {
		if ns == "default" {
			return args
		}
		return append([]string{"-n", ns}, args...)
	}
	if _, err := t.Client.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}, metav1.CreateOptions{}); err != nil && !strings.Contains(err.Error(), "already exists") {
		return err
	}

	w.step("Deploy Bookinfo, sleep and notsleep (each service with its own service account)")
	for _, m := range []struct{ file, yaml string }{
		{"bookinfo-" + ns + ".yaml", BookinfoYAML(ns)},
		{"sleep-" + ns + ".yaml", SleepYAML(ns)},
	} {
		w.shell("kubectl apply -f " + filepath.Join(t.Manifests, m.file))
		if err := t.Apply(ctx, m.file, m.yaml); err != nil {
			return err
		}
	}
	if err := t.WaitRollout(ctx, ns, append(slices.Clone(BookinfoDeployments), Sleep, NotSleep)...); err != nil {
		return err
	}
	if _, err := w.kubectl(ctx, nsArgs("get", "pods", "-o", "wide")...); err != nil {
		return err
	}
	host := BookinfoProductpage
	if ns != "default" {
		host += "." + ns
	}
	url := fmt.Sprintf("http://%s:%d/", host, images.BookinfoPort)
	// The Service's endpoints reach kube-proxy a moment after the pods
	// are Ready.
	if err := Retry(ctx, 30*time.Second, func() error {
		_, err := t.Kubectl(ctx, nsArgs("exec", "deploy/"+Sleep, "--", "curl", "-timeout=2s", url)...)
		return err
	}); err != nil {
		return fmt.Errorf("productpage unreachable before the mesh: %w", err)
	}

	w.step("Add the namespace to the ambient mesh")
	if _, err := w.kubectl(ctx, "label", "namespace", ns, "istio.io/dataplane-mode=ambient"); err != nil {
		return err
	}
	// Node of each app's pod: the node whose datapath captures it and
	// whose ztunnel serves it.
	nodes := map[string]string{}
	for _, app := range []string{Productpage, Sleep, NotSleep} {
		p, err := t.RunningPod(ctx, ns, app)
		if err != nil {
			return err
		}
		nodes[app] = p.Spec.NodeName
		if err := Retry(ctx, 30*time.Second, func() error {
			if ok, err := t.Captured(ctx, p.Spec.NodeName, p.Status.PodIP); err != nil || !ok {
				return fmt.Errorf("%s (%s) not captured: %v", p.Name, p.Status.PodIP, err)
			}
			return nil
		}); err != nil {
			return err
		}
		w.say("%-12s %-15s captured by the datapath (amber_pods map)", app, p.Status.PodIP)
	}
	ppNode := nodes[Productpage]

	w.step("Reach productpage from sleep and notsleep, through the mesh")
	sleepID := fmt.Sprintf("spiffe://cluster.local/ns/%s/sa/%s", ns, Sleep)
	ppID := fmt.Sprintf("spiffe://cluster.local/ns/%s/sa/bookinfo-%s", ns, BookinfoProductpage)
	for _, app := range []string{Sleep, NotSleep} {
		// Until istiod has seen the agent's annotation it describes the
		// pods without HBONE; the ztunnel then passes traffic through.
		client := fmt.Sprintf("spiffe://cluster.local/ns/%s/sa/%s", ns, app)
		if err := Retry(ctx, 60*time.Second, func() error {
			if _, err := t.Kubectl(ctx, nsArgs("exec", "deploy/"+app, "--", "curl", "-timeout=5s", url)...); err != nil {
				return err
			}
			ms, err := t.Nodes.Metrics(ctx, ppNode, "istio_tcp_connections_opened_total")
			if err != nil {
				return err
			}
			if Sum(ms, map[string]string{"reporter": "destination", "connection_security_policy": "mutual_tls",
				"source_principal": client, "destination_principal": ppID}) == 0 {
				return fmt.Errorf("no mutual_tls connection from %s yet", client)
			}
			return nil
		}); err != nil {
			return err
		}
		if _, err := w.kubectlHead(ctx, 1, nsArgs("exec", "deploy/"+app, "--", "curl", "-timeout=5s", url)...); err != nil {
			return err
		}
	}
	// The page calls details and reviews, reviews v2 and v3 call
	// ratings: every hop is in the mesh too.
	out, err := w.kubectlGrep(ctx, "reviews-v.-", nsArgs("exec", "deploy/"+Sleep, "--", "curl", "-timeout=10s", url+"productpage")...)
	if err != nil {
		return err
	}
	if pods, _ := ReviewsPods(out); len(pods) != 1 || pods[0] == "" {
		return fmt.Errorf("productpage's page names no reviews pod:\n%s", out)
	}
	cmds, err := t.Nodes.Commands(ctx, ppNode)
	if err != nil {
		return err
	}
	w.shell(cmds.Metrics + " | grep istio_tcp_connections_opened_total")
	ms, err := t.Nodes.Metrics(ctx, ppNode, "istio_tcp_connections_opened_total")
	if err != nil {
		return err
	}
	for _, m := range ms {
		if m.Labels["reporter"] == "destination" && m.Labels["destination_principal"] == ppID {
			w.output(fmt.Sprintf("reporter=destination connection_security_policy=%s source_principal=%s destination_principal=%s  %v",
				m.Labels["connection_security_policy"], m.Labels["source_principal"], m.Labels["destination_principal"], m.Value))
		}
	}

	w.step("Apply an L4 policy: only sleep's identity may reach productpage")
	policy := filepath.Join(t.Manifests, "productpage-viewer-"+ns+".yaml")
	w.shell("kubectl apply -f " + policy)
	w.output(L4PolicyYAML(ns))
	if err := t.Apply(ctx, filepath.Base(policy), L4PolicyYAML(ns)); err != nil {
		return err
	}
	since := time.Now().Add(-time.Second)
	notID := fmt.Sprintf("spiffe://cluster.local/ns/%s/sa/%s", ns, NotSleep)
	if err := Retry(ctx, 60*time.Second, func() error {
		if _, err := t.Kubectl(ctx, nsArgs("exec", "deploy/"+NotSleep, "--", "curl", "-timeout=5s", url)...); !ClientFailed(err) {
			return fmt.Errorf("notsleep not refused (%v)", err)
		}
		return nil
	}); err != nil {
		return fmt.Errorf("policy not enforced: %w", err)
	}
	if _, err := w.kubectlHead(ctx, 1, nsArgs("exec", "deploy/"+Sleep, "--", "curl", "-timeout=5s", url)...); err != nil {
		return fmt.Errorf("sleep refused under the policy: %w", err)
	}
	if _, err := w.kubectlHead(ctx, 1, nsArgs("exec", "deploy/"+NotSleep, "--", "curl", "-timeout=5s", url)...); !ClientFailed(err) {
		return fmt.Errorf("notsleep not refused under the policy (%v)", err)
	}
	// Either end may log the refusal: read every node's ztunnel.
	w.say("notsleep is refused. The ztunnel's access log says why:")
	all, err := t.Nodes.Commands(ctx, "")
	if err != nil {
		return err
	}
	w.shell(fmt.Sprintf("%s | grep %s", all.Logs, notID))
	logs, err := t.Nodes.ZtunnelLogs(ctx, "", since)
	if err != nil {
		return err
	}
	line, denied := FindLogLine(logs, func(r LogRecord) bool {
		_, failed := r["error"]
		return r["src.identity"] == notID && failed
	})
	if !denied {
		return fmt.Errorf("no denial of %s in the ztunnel's access log", notID)
	}
	w.output(line)
	ms, err = t.Nodes.Metrics(ctx, ppNode, "istio_tcp_connections_opened_total")
	if err != nil {
		return err
	}
	n := Sum(ms, map[string]string{"reporter": "destination", "source_principal": notID, "response_flags": "DENY"})
	if n == 0 {
		return fmt.Errorf("no DENY connection from %s in the metrics", notID)
	}
	w.say("istio_tcp_connections_opened_total{source_principal=%q,response_flags=\"DENY\"} = %v", notID, n)
	_ = sleepID

	w.step("Look at the node: amberctl and the membership map")
	w.shell(cmds.Amberctl)
	out, err = t.Nodes.Amberctl(ctx, ppNode)
	w.output(out)
	if err != nil {
		return err
	}
	w.shell(cmds.Membership)
	out, err = t.Nodes.MembershipDump(ctx, ppNode)
	w.output(out)
	return err
}

// Retry calls f every 250 ms until it succeeds or d passes, and returns
// its last error.
func Retry(ctx context.Context, d time.Duration, f func() error) error {
	ctx, cancel := context.WithTimeout(ctx, d)
	defer cancel()
	for {
		err := f()
		if err == nil {
			return nil
		}
		select {
		case <-ctx.Done():
			return err
		case <-time.After(250 * time.Millisecond):
		}
	}
}

// ClientFailed reports whether err, from `kubectl exec … -- curl URL`, is
// the client's own failure (curl exited 1: refused, reset, timed out)
// rather than success or a failure of kubectl or the API server.
func ClientFailed(err error) bool {
	return err != nil && strings.Contains(err.Error(), "command terminated with exit code 1")
}
