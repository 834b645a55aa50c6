package realnode

import (
	"context"
	"fmt"
	"regexp"
	"slices"
	"strings"

	"github.com/amber-mesh/amber/test/images"
)

// Istio's Bookinfo sample in the shape Istio ships it
// (samples/bookinfo/platform/kube/bookinfo.yaml and bookinfo-versions.yaml
// of the pinned istio.io/istio module), from the local images: a Service,
// a service account bookinfo-<service> and versioned Deployments per
// service, reviews in three versions (v1 without stars, v2 black and v3
// red stars from ratings). Only the images differ, and reviews' version
// comes from its environment, which Istio bakes into three images.
const (
	// BookinfoProductpage is productpage's Service (and app label); its
	// Deployment is productpage-v1.
	BookinfoProductpage = "productpage"
	// BookinfoReviews is reviews' Service (and app label).
	BookinfoReviews = "reviews"
)

// BookinfoDeployments are Bookinfo's Deployments.
var BookinfoDeployments = []string{"details-v1", "ratings-v1", "reviews-v1", "reviews-v2", "reviews-v3", "productpage-v1"}

// bookinfoServices are Bookinfo's services with their versions and image.
var bookinfoServices = []struct {
	name     string
	versions []string
	image    images.Image
}{
	{"details", []string{"v1"}, images.Details},
	{"ratings", []string{"v1"}, images.Ratings},
	{"reviews", []string{"v1", "v2", "v3"}, images.Reviews},
	{"productpage", []string{"v1"}, images.Productpage},
}

// reviewsEnv is what Istio's reviews images set for each version
// (samples/bookinfo/src/reviews/Dockerfile build arguments).
var reviewsEnv = map[string][][2]string{
	"v1": {{"SERVICE_VERSION", "v1"}, {"ENABLE_RATINGS", "false"}},
	"v2": {{"SERVICE_VERSION", "v2"}, {"ENABLE_RATINGS", "true"}, {"STAR_COLOR", "black"}},
	"v3": {{"SERVICE_VERSION", "v3"}, {"ENABLE_RATINGS", "true"}, {"STAR_COLOR", "red"}},
}

// BookinfoYAML returns bookinfo.yaml's objects in namespace ns.
func BookinfoYAML(ns string) string {
	var b strings.Builder
	for _, s := range bookinfoServices {
		fmt.Fprintf(&b, `apiVersion: v1
kind: Service
metadata: {name: %[1]s, namespace: %[2]s, labels: {app: %[1]s, service: %[1]s}}
spec:
  ports: [{port: %[3]d, name: http}]
  selector: {app: %[1]s}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: bookinfo-%[1]s, namespace: %[2]s, labels: {account: %[1]s}}
---
`, s.name, ns, images.BookinfoPort)
		for _, v := range s.versions {
			var env [][2]string
			if s.name == BookinfoReviews {
				env = reviewsEnv[v]
			}
			b.WriteString(workload{Name: s.name + "-" + v, App: s.name, Version: v, ServiceAccount: "bookinfo-" + s.name,
				Image: s.image.Ref, Port: images.BookinfoPort, Env: env}.yaml(ns))
		}
	}
	return b.String()
}

// BookinfoVersionsYAML returns bookinfo-versions.yaml's Services in ns:
// one per version (reviews-v1, reviews-v2, ...), the backends of the
// walkthrough's Gateway API traffic split.
func BookinfoVersionsYAML(ns string) string {
	var b strings.Builder
	for _, s := range bookinfoServices {
		for _, v := range s.versions {
			fmt.Fprintf(&b, `apiVersion: v1
kind: Service
metadata: {name: %[1]s-%[2]s, namespace: %[3]s}
spec:
  ports: [{port: %[4]d, name: http}]
  selector: {app: %[1]s, version: %[2]s}
---
`, s.name, v, ns, images.BookinfoPort)
		}
	}
	return b.String()
}

// workload is one Deployment of a test application.
type workload struct {
	// Name is the Deployment's name.
	Name string
	// App and Version are the pods' app and version labels (the
	// Deployment's too); an empty Version sets none.
	App, Version string
	// ServiceAccount is the pods' account.
	ServiceAccount string
	// Image is a local image (imagePullPolicy Never), run with Args.
	Image string
	Args  []string
	// Port is the container port, 0 for none.
	Port int
	// Env is the container's environment.
	Env [][2]string
}

func (w workload) yaml(ns string) string {
	labels := "app: " + w.App
	if w.Version != "" {
		labels += ", version: " + w.Version
	}
	var extra strings.Builder
	if len(w.Args) > 0 {
		fmt.Fprintf(&extra, "          args: [%s]\n", quoteAll(w.Args))
	}
	if w.Port != 0 {
		fmt.Fprintf(&extra, "          ports: [{containerPort: %d}]\n", w.Port)
	}
	if len(w.Env) > 0 {
		extra.WriteString("          env:\n")
		for _, e := range w.Env {
			fmt.Fprintf(&extra, "            - {name: %s, value: %q}\n", e[0], e[1])
		}
	}
	return fmt.Sprintf(`apiVersion: apps/v1
kind: Deployment
metadata: {name: %[1]s, namespace: %[2]s, labels: {%[3]s}}
spec:
  replicas: 1
  selector: {matchLabels: {%[3]s}}
  template:
    metadata: {labels: {%[3]s}}
    spec:
      serviceAccountName: %[4]s
      terminationGracePeriodSeconds: 1
      containers:
        - name: %[5]s
          image: %[6]s
          imagePullPolicy: Never
%[7]s---
`, w.Name, ns, labels, w.ServiceAccount, w.App, w.Image, extra.String())
}

func quoteAll(ss []string) string {
	q := make([]string, len(ss))
	for i, s := range ss {
		q[i] = fmt.Sprintf("%q", s)
	}
	return strings.Join(q, ", ")
}

// servedBy finds the lines of productpage's page naming the reviews pod
// that answered: what the walkthrough's `grep reviews-v.-` prints.
var servedBy = regexp.MustCompile(`(?m)^\s*(reviews-(v\d)-\S+)\s*$`)

// ReviewsPods returns, for each productpage page in out (the output of
// `curl URL...`: pages one after another), the reviews pod that served it
// and its version, "" for a page without reviews (reviews failed).
func ReviewsPods(out string) (pods, versions []string) {
	for _, page := range strings.Split(out, "<!DOCTYPE html>")[1:] {
		m := servedBy.FindStringSubmatch(page)
		if m == nil {
			pods, versions = append(pods, ""), append(versions, "")
			continue
		}
		pods, versions = append(pods, m[1]), append(versions, m[2])
	}
	return pods, versions
}

// DeployBookinfo applies Bookinfo (with the reviews-v1/v2/v3 Services),
// sleep and notsleep to ns, waits for their rollouts and labels ns
// istio.io/dataplane-mode=ambient.
func (t *Target) DeployBookinfo(ctx context.Context, ns string) error {
	for name, m := range map[string]string{
		"bookinfo.yaml":          BookinfoYAML(ns),
		"bookinfo-versions.yaml": BookinfoVersionsYAML(ns),
		"sleep.yaml":             SleepYAML(ns),
	} {
		if err := t.Apply(ctx, name, m); err != nil {
			return err
		}
	}
	if err := t.WaitRollout(ctx, ns, append(slices.Clone(BookinfoDeployments), Sleep, NotSleep)...); err != nil {
		return err
	}
	_, err := t.Kubectl(ctx, "label", "namespace", ns, "istio.io/dataplane-mode=ambient")
	return err
}
