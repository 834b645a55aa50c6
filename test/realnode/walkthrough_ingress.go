package realnode

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"slices"
	"strings"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/amber-mesh/amber/test/images"
)

// GatewayCommand is the command amber's chart gives the Deployments istiod
// renders for Gateways of class istio; the classic gateway's chart sets
// none and runs the image's entrypoint, the same binary.
var GatewayCommand = WaypointCommand

// RunIngress plays the walkthrough's ingress steps after Run, in the same
// namespace, through the classic istio-ingressgateway (installed with
// Amber.InstallIngress): Istio's bookinfo-gateway.yaml, productpage
// through `http://istio-ingressgateway.istio-system/productpage` from sleep
// and notsleep, the 2022 L4 policy naming the gateway's service account
// (the gateway admitted over HBONE under its own identity, notsleep still
// refused), the same policy without that principal refusing the gateway,
// and the gateway's own istio_requests_total. RunL7 then also counts the
// 90/10 split through the gateway. The first expectation that fails is
// returned.
func (w *Walkthrough) RunIngress(ctx context.Context) error {
	t := w.Target
	if w.IstioFiles == "" {
		return errors.New("the ingress steps need Istio's samples (Walkthrough.IstioFiles)")
	}
	ns := w.namespace()
	nsArgs := func(args ...string) []string { return append([]string{"-n", ns}, args...) }
	exec := func(app string, args ...string) []string {
		return nsArgs(append([]string{"exec", "deploy/" + app, "--", "curl", "-timeout=10s"}, args...)...)
	}

	w.step("Expose Bookinfo through the ingress gateway: Istio's istio-ingressgateway, running amber-waypoint")
	if _, err := w.kubectl(ctx, "-n", Namespace, "get", "deployment", IngressGateway, "-o",
		`jsonpath={.spec.template.spec.containers[0].image} command={.spec.template.spec.containers[0].command} args={.spec.template.spec.containers[0].args}{"\n"}`); err != nil {
		return err
	}
	d, err := t.Client.AppsV1().Deployments(Namespace).Get(ctx, IngressGateway, metav1.GetOptions{})
	if err != nil {
		return err
	}
	if err := CheckIngressDeployment(d); err != nil {
		return err
	}
	if err := t.WaitRollout(ctx, Namespace, IngressGateway); err != nil {
		return fmt.Errorf("istio-ingressgateway: %w", err)
	}
	if _, err := w.kubectl(ctx, "-n", Namespace, "get", "pods", "-l", IngressSelector, "-o", "wide"); err != nil {
		return err
	}
	if _, err := w.kubectl(ctx, nsArgs("apply", "-f", filepath.Join(w.IstioFiles, BookinfoGatewaySample))...); err != nil {
		return err
	}

	w.step("The walkthrough's L4 policy: productpage admits sleep and the ingress gateway's identity")
	ingressID := "spiffe://" + IngressPrincipal
	if err := w.applyPolicy(ctx, "productpage-viewer-ingress-"+ns+".yaml", IngressPolicyYAML(ns, IngressPrincipal)); err != nil {
		return err
	}
	// istiod configures the gateway (Gateway, VirtualService, productpage's
	// endpoints as HBONE) and pushes the policy a moment after the apply.
	if err := Retry(ctx, 90*time.Second, func() error {
		out, err := t.Kubectl(ctx, exec(Sleep, IngressURL)...)
		if err != nil {
			return fmt.Errorf("%w\n%s", err, out)
		}
		return nil
	}); err != nil {
		return fmt.Errorf("productpage through the ingress gateway: %w", err)
	}
	for _, app := range []string{Sleep, NotSleep} {
		out, err := w.kubectlHead(ctx, 1, exec(app, IngressURL)...)
		if err != nil {
			return fmt.Errorf("%s through the ingress gateway: %w", app, err)
		}
		if pods, _ := ReviewsPods(out); len(pods) != 1 || pods[0] == "" {
			return fmt.Errorf("the page through the ingress gateway names no reviews pod:\n%s", out)
		}
	}
	direct := fmt.Sprintf("http://%s.%s:%d/", BookinfoProductpage, ns, images.BookinfoPort)
	if _, err := w.kubectlHead(ctx, 1, exec(NotSleep, direct)...); !ClientFailed(err) {
		return fmt.Errorf("notsleep not refused under the policy (%v)", err)
	}
	ppNode, err := w.nodeOf(ctx, ns, Productpage)
	if err != nil {
		return err
	}
	ppID := fmt.Sprintf("spiffe://cluster.local/ns/%s/sa/bookinfo-%s", ns, BookinfoProductpage)
	if err := w.showConnections(ctx, ppNode, map[string]string{"reporter": "destination", "connection_security_policy": "mutual_tls",
		"source_principal": ingressID, "destination_principal": ppID}); err != nil {
		return fmt.Errorf("the ingress gateway did not reach productpage over HBONE with its identity: %w", err)
	}

	w.step("Without the ingress gateway's principal, the policy refuses the gateway")
	if err := w.applyPolicy(ctx, "productpage-viewer-"+ns+".yaml", L4PolicyYAML(ns)); err != nil {
		return err
	}
	if err := Retry(ctx, 60*time.Second, func() error {
		if out, err := t.Kubectl(ctx, exec(Sleep, IngressURL)...); !ClientFailed(err) {
			return fmt.Errorf("the gateway not refused (%v)\n%s", err, out)
		}
		return nil
	}); err != nil {
		return err
	}
	if _, err := w.kubectlHead(ctx, 1, exec(Sleep, IngressURL)...); !ClientFailed(err) {
		return fmt.Errorf("the gateway not refused (%v)", err)
	}
	if err := w.showConnections(ctx, ppNode, map[string]string{"reporter": "destination", "source_principal": ingressID, "response_flags": "DENY"}); err != nil {
		return fmt.Errorf("no DENY of the ingress gateway at productpage: %w", err)
	}
	w.say("and with it again:")
	if err := w.applyPolicy(ctx, "productpage-viewer-ingress-"+ns+".yaml", IngressPolicyYAML(ns, IngressPrincipal)); err != nil {
		return err
	}
	if err := Retry(ctx, 60*time.Second, func() error {
		_, err := t.Kubectl(ctx, exec(Sleep, IngressURL)...)
		return err
	}); err != nil {
		return fmt.Errorf("the gateway still refused: %w", err)
	}
	if _, err := w.kubectlHead(ctx, 1, exec(Sleep, IngressURL)...); err != nil {
		return err
	}

	w.step("Read the ingress gateway's L7 metrics (istio_requests_total, reporter=source, on its 15020)")
	pod, err := t.RunningPodOf(ctx, Namespace, IngressSelector)
	if err != nil {
		return err
	}
	return w.gatewayRequests(ctx, Namespace, pod.Name, map[string]string{"reporter": "source", "response_code": "200",
		"source_workload": IngressGateway, "destination_service": fmt.Sprintf("%s.%s.svc.cluster.local", BookinfoProductpage, ns)})
}

// RunGatewayAPI plays the ingress in its Gateway API form after
// RunIngress, with amber's chart's gateway.enabled=true: Istio's
// gateway-api/bookinfo-gateway.yaml (Gateway of class istio, HTTPRoute),
// the Service made ClusterIP as istio.io's ambient getting-started does,
// the Deployment istiod renders running amber-waypoint, productpage
// through it from sleep once the policy also names its service account,
// and its istio_requests_total. It removes the sample's objects and
// restores RunIngress's policy before it returns.
func (w *Walkthrough) RunGatewayAPI(ctx context.Context) (err error) {
	t := w.Target
	if w.IstioFiles == "" {
		return errors.New("the ingress steps need Istio's samples (Walkthrough.IstioFiles)")
	}
	ns := w.namespace()
	nsArgs := func(args ...string) []string { return append([]string{"-n", ns}, args...) }
	name := BookinfoGatewayAPI + "-istio"
	sample := filepath.Join(w.IstioFiles, BookinfoGatewayAPISample)

	w.step("The Gateway API form: a Gateway of class istio and an HTTPRoute; istiod deploys the gateway, running amber-waypoint")
	if _, err := w.kubectl(ctx, nsArgs("apply", "-f", sample)...); err != nil {
		return err
	}
	defer func() {
		cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 2*time.Minute)
		defer cancel()
		if _, derr := w.kubectl(cctx, nsArgs("delete", "--ignore-not-found", "-f", sample)...); derr != nil {
			err = errors.Join(err, derr)
		}
		err = errors.Join(err, t.Apply(cctx, "productpage-viewer-ingress-"+ns+".yaml", IngressPolicyYAML(ns, IngressPrincipal)))
	}()
	if _, err := w.kubectl(ctx, nsArgs("annotate", "gateway", BookinfoGatewayAPI, "networking.istio.io/service-type=ClusterIP")...); err != nil {
		return err
	}
	if err := Retry(ctx, 60*time.Second, func() error {
		d, err := t.Client.AppsV1().Deployments(ns).Get(ctx, name, metav1.GetOptions{})
		if err != nil {
			return err
		}
		return checkAmberContainer(d, GatewayCommand)
	}); err != nil {
		return fmt.Errorf("Deployment %s/%s from istiod: %w", ns, name, err)
	}
	if _, err := w.kubectl(ctx, nsArgs("get", "deployment", name, "-o",
		`jsonpath={.spec.template.spec.containers[0].image} command={.spec.template.spec.containers[0].command} args={.spec.template.spec.containers[0].args}{"\n"}`)...); err != nil {
		return err
	}
	if err := t.WaitRollout(ctx, ns, name); err != nil {
		return err
	}
	if err := Retry(ctx, 60*time.Second, func() error {
		st, err := t.Kubectl(ctx, nsArgs("get", "gateway", BookinfoGatewayAPI, "-o", `jsonpath={.status.conditions[?(@.type=="Programmed")].status}`)...)
		if err != nil || string(st) != "True" {
			return fmt.Errorf("gateway %s/%s is not Programmed: %q %v", ns, BookinfoGatewayAPI, st, err)
		}
		return nil
	}); err != nil {
		return err
	}
	if _, err := w.kubectl(ctx, nsArgs("get", "gateway", BookinfoGatewayAPI)...); err != nil {
		return err
	}

	principal := fmt.Sprintf("cluster.local/ns/%s/sa/%s", ns, name)
	if err := w.applyPolicy(ctx, "productpage-viewer-gateway-api-"+ns+".yaml", IngressPolicyYAML(ns, IngressPrincipal, principal)); err != nil {
		return err
	}
	url := fmt.Sprintf("http://%s.%s/productpage", name, ns)
	curl := nsArgs("exec", "deploy/"+Sleep, "--", "curl", "-timeout=10s", url)
	if err := Retry(ctx, 90*time.Second, func() error {
		out, err := t.Kubectl(ctx, curl...)
		if err != nil {
			return fmt.Errorf("%w\n%s", err, out)
		}
		return nil
	}); err != nil {
		return fmt.Errorf("productpage through the Gateway API gateway: %w", err)
	}
	out, err := w.kubectlHead(ctx, 1, curl...)
	if err != nil {
		return err
	}
	if pods, _ := ReviewsPods(out); len(pods) != 1 || pods[0] == "" {
		return fmt.Errorf("the page through the Gateway API gateway names no reviews pod:\n%s", out)
	}
	ppNode, err := w.nodeOf(ctx, ns, Productpage)
	if err != nil {
		return err
	}
	if err := w.showConnections(ctx, ppNode, map[string]string{"reporter": "destination", "connection_security_policy": "mutual_tls",
		"source_principal": "spiffe://" + principal}); err != nil {
		return fmt.Errorf("the Gateway API gateway did not reach productpage over HBONE with its identity: %w", err)
	}
	pod, err := t.RunningPodOf(ctx, ns, "gateway.networking.k8s.io/gateway-name="+BookinfoGatewayAPI)
	if err != nil {
		return err
	}
	return w.gatewayRequests(ctx, ns, pod.Name, map[string]string{"reporter": "source", "response_code": "200",
		"source_workload": name, "destination_service": fmt.Sprintf("%s.%s.svc.cluster.local", BookinfoProductpage, ns)})
}

// CheckIngressDeployment checks the Deployment Istio's chart renders for
// the classic gateway with IngressHelmArgs: amber's image, no command
// (the image's entrypoint, amber-waypoint, runs), pilot-agent's `proxy
// router` arguments, the walkthrough's service account, the ambient
// profile's HBONE metadata, the unprivileged pod (no listener below
// 1024), istiod as CA, and the label that keeps ambient from capturing
// it.
func CheckIngressDeployment(d *appsv1.Deployment) error {
	if err := checkAmberContainer(d, nil); err != nil {
		return err
	}
	ctr := d.Spec.Template.Spec.Containers[0]
	if len(ctr.Args) < 2 || ctr.Args[0] != "proxy" || ctr.Args[1] != "router" {
		return fmt.Errorf("args %q, want the chart's proxy router …", ctr.Args)
	}
	if sa := d.Spec.Template.Spec.ServiceAccountName; sa != IngressServiceAccount {
		return fmt.Errorf("service account %q, want %s", sa, IngressServiceAccount)
	}
	env := map[string]string{}
	for _, e := range ctr.Env {
		env[e.Name] = e.Value
	}
	var errs []error
	for k, v := range map[string]string{"ISTIO_META_ENABLE_HBONE": "true", "ISTIO_META_UNPRIVILEGED_POD": "true",
		"PILOT_CERT_PROVIDER": "istiod", "CA_ADDR": "istiod.istio-system.svc:15012", "ISTIO_META_WORKLOAD_NAME": IngressGateway} {
		if env[k] != v {
			errs = append(errs, fmt.Errorf("env %s=%q, want %q", k, env[k], v))
		}
	}
	if l := d.Spec.Template.Labels; l["istio.io/dataplane-mode"] != "none" || l["istio"] != "ingressgateway" {
		errs = append(errs, fmt.Errorf("pod labels %v: want istio=ingressgateway and istio.io/dataplane-mode=none", l))
	}
	return errors.Join(errs...)
}

// CheckIngressService checks the classic gateway's Service: port 80 to
// the pod's 8080, where istiod puts the listener of bookinfo-gateway.yaml's
// server (8080 today, 80 in 2022: both resolve to the targetPort), and the
// status port.
func CheckIngressService(svc *corev1.Service) error {
	ports := map[int32]intstr.IntOrString{}
	for _, p := range svc.Spec.Ports {
		ports[p.Port] = p.TargetPort
	}
	if ports[80] != intstr.FromInt32(8080) || ports[15021] != intstr.FromInt32(15021) {
		return fmt.Errorf("service %s ports %v, want 80 → 8080 and 15021", svc.Name, svc.Spec.Ports)
	}
	return nil
}

// checkAmberContainer checks that d's istio-proxy container runs amber's
// image with command (nil: none, the image's entrypoint).
func checkAmberContainer(d *appsv1.Deployment, command []string) error {
	cs := d.Spec.Template.Spec.Containers
	if len(cs) == 0 || cs[0].Name != "istio-proxy" {
		return fmt.Errorf("deployment %s/%s: no istio-proxy container first", d.Namespace, d.Name)
	}
	if cs[0].Image != images.Amber.Ref || !slices.Equal(cs[0].Command, command) {
		return fmt.Errorf("deployment %s/%s runs %s %q, want %s %q", d.Namespace, d.Name, cs[0].Image, cs[0].Command, images.Amber.Ref, command)
	}
	return nil
}

// applyPolicy prints and applies an AuthorizationPolicy as the file name.
func (w *Walkthrough) applyPolicy(ctx context.Context, name, yaml string) error {
	w.shell("kubectl apply -f " + filepath.Join(w.Target.Manifests, name))
	w.output(yaml)
	return w.Target.Apply(ctx, name, yaml)
}

// nodeOf returns the node of app's running pod in ns.
func (w *Walkthrough) nodeOf(ctx context.Context, ns, app string) (string, error) {
	p, err := w.Target.RunningPod(ctx, ns, app)
	if err != nil {
		return "", err
	}
	return p.Spec.NodeName, nil
}

// showConnections waits until node's ztunnel counts a connection matching
// match in istio_tcp_connections_opened_total, and prints the command and
// the matching samples.
func (w *Walkthrough) showConnections(ctx context.Context, node string, match map[string]string) error {
	cmds, err := w.Target.Nodes.Commands(ctx, node)
	if err != nil {
		return err
	}
	var ms []Metric
	if err := Retry(ctx, 30*time.Second, func() error {
		var err error
		if ms, err = w.Target.Nodes.Metrics(ctx, node, "istio_tcp_connections_opened_total"); err != nil {
			return err
		}
		if Sum(ms, match) == 0 {
			return fmt.Errorf("no istio_tcp_connections_opened_total with %v", match)
		}
		return nil
	}); err != nil {
		return err
	}
	w.shell(cmds.Metrics + " | grep istio_tcp_connections_opened_total | grep " + match["source_principal"])
	for _, m := range ms {
		if Sum([]Metric{m}, match) > 0 {
			w.output(fmt.Sprintf("reporter=%s connection_security_policy=%s source_principal=%s destination_principal=%s response_flags=%s  %v",
				m.Labels["reporter"], m.Labels["connection_security_policy"], m.Labels["source_principal"],
				m.Labels["destination_principal"], m.Labels["response_flags"], m.Value))
		}
	}
	return nil
}

// gatewayRequests reads istio_requests_total from the gateway pod's 15020
// through the API server's pod proxy, prints the samples matching want and
// fails when there are none.
func (w *Walkthrough) gatewayRequests(ctx context.Context, ns, pod string, want map[string]string) error {
	raw := "/api/v1/namespaces/" + ns + "/pods/" + pod + IngressStatsPath
	w.shell("kubectl get --raw " + raw + " | grep istio_requests_total")
	out, err := w.Target.Kubectl(ctx, "get", "--raw", raw)
	if err != nil {
		return err
	}
	ms, err := parseMetrics(strings.NewReader(string(out)), []string{"istio_requests_total"})
	if err != nil {
		return err
	}
	for _, m := range ms {
		if Sum([]Metric{m}, want) > 0 {
			w.output(fmt.Sprintf("reporter=%s source_workload=%s destination_service=%s destination_workload=%s response_code=%s  %v",
				m.Labels["reporter"], m.Labels["source_workload"], m.Labels["destination_service"],
				m.Labels["destination_workload"], m.Labels["response_code"], m.Value))
		}
	}
	if Sum(ms, want) == 0 {
		return fmt.Errorf("no istio_requests_total with %v on %s/%s", want, ns, pod)
	}
	return nil
}

func (w *Walkthrough) namespace() string {
	if w.Namespace == "" {
		return "default"
	}
	return w.Namespace
}
