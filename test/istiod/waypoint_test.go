package istiod_test

import (
	"bytes"
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"maps"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	"github.com/pmezard/go-difflib/difflib"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/yaml"

	"github.com/amber-mesh/amber/internal/testutil"
	"github.com/amber-mesh/amber/test/istiod"
	"github.com/amber-mesh/amber/test/kube"
	"github.com/amber-mesh/amber/test/waypointgolden"
	"github.com/amber-mesh/amber/waypoint/node"
)

var updateGoldens = flag.Bool("update", false, "rewrite the waypoint goldens from istiod instead of comparing")

// waypointScenario is one golden: objects applied on top of the base mesh,
// and what in istiod's output shows they took effect.
type waypointScenario struct {
	name string
	// yaml is applied before and deleted after the capture. Empty: the
	// base mesh alone.
	yaml string
	// shows reports whether a capture reflects yaml; nil when the
	// objects do not change a waypoint's configuration (the barrier alone
	// then proves istiod considered them).
	shows func(files map[string][]byte) error
}

// contains returns a check that every needle occurs in the named file.
func contains(file string, needles ...string) func(map[string][]byte) error {
	return func(files map[string][]byte) error {
		for _, n := range needles {
			if !bytes.Contains(files[file], []byte(n)) {
				return fmt.Errorf("%s has no %q yet", file, n)
			}
		}
		return nil
	}
}

var waypointScenarios = []waypointScenario{
	{name: "base"},
	{
		name:  "authz-productpage-viewer",
		yaml:  istiod.ViewerPolicy("default", "productpage", "GET"),
		shows: contains("lds.json", "ns[default]-policy[productpage-viewer]-rule[0]"),
	},
	{
		// A DENY and an AUDIT beside the ALLOW: istiod's filter order, path
		// and header matchers, not-values and a when condition.
		name: "authz-deny-audit",
		yaml: istiod.ViewerPolicy("default", "productpage", "GET") + `---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: productpage-deny-admin
  namespace: default
spec:
  targetRefs:
  - kind: Service
    group: ""
    name: productpage
  action: DENY
  rules:
  - from:
    - source:
        notNamespaces: ["default"]
    - source:
        ipBlocks: ["10.244.9.0/24"]
    to:
    - operation:
        paths: ["/admin*", "/debug/pprof"]
        notMethods: ["OPTIONS"]
  - to:
    - operation:
        hosts: ["*.example.com"]
    when:
    - key: request.headers[x-debug]
      values: ["*"]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: productpage-audit
  namespace: default
spec:
  targetRefs:
  - kind: Service
    group: ""
    name: productpage
  action: AUDIT
  rules:
  - to:
    - operation:
        paths: ["/login"]
`,
		shows: contains("lds.json", "ns[default]-policy[productpage-deny-admin]-rule[1]", "ns[default]-policy[productpage-audit]-rule[0]"),
	},
	{
		// The walkthrough's traffic split in its current form (Gateway API,
		// GAMMA parentRef to the Service).
		name:  "httproute-reviews-90-10",
		yaml:  istiod.ReviewsRoute9010("default"),
		shows: contains("lds.json", "weighted_clusters", "inbound-vip|9080|http|reviews-v2.default.svc.cluster.local"),
	},
	{
		// The 2022 walkthrough's form: virtual-service-reviews-90-10.yaml and
		// destination-rule-reviews.yaml (subsets by label, RANDOM).
		name: "virtualservice-reviews-90-10",
		yaml: istiod.ReviewsVirtualService9010("default"),
		shows: func(files map[string][]byte) error {
			if err := contains("lds.json", "inbound-vip|9080|http/v2|reviews.default.svc.cluster.local")(files); err != nil {
				return err
			}
			return contains("eds.json", "inbound-vip|9080|http/v2|reviews.default.svc.cluster.local")(files)
		},
	},
	{
		// Istio's request-routing task: end-user jason goes to v2.
		name: "httproute-header-match",
		yaml: istiod.ReviewsRoute("default") + `  - matches:
    - headers:
      - name: end-user
        value: jason
    backendRefs:
    - name: reviews-v2
      port: 9080
  - backendRefs:
    - name: reviews-v1
      port: 9080
`,
		shows: contains("lds.json", "end-user", "inbound-vip|9080|http|reviews-v2.default.svc.cluster.local"),
	},
	{
		// Namespace-wide STRICT mTLS. A waypoint's HBONE listener requires
		// client certificates regardless, so istiod's output is the base's.
		name: "peerauthentication-strict",
		yaml: `apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata:
  name: default
  namespace: default
spec:
  mtls:
    mode: STRICT
`,
	},
	{
		// A mesh-wide DestinationRule of the kind operators keep in the
		// root namespace: its cluster fields reach every waypoint cluster.
		name: "destinationrule-meshwide",
		yaml: `apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: mesh-defaults
  namespace: istio-system
spec:
  host: "*.svc.cluster.local"
  trafficPolicy:
    loadBalancer:
      simple: LEAST_REQUEST
    connectionPool:
      tcp:
        maxConnections: 100
        connectTimeout: 5s
      http:
        http1MaxPendingRequests: 64
        http2MaxRequests: 128
        maxRequestsPerConnection: 1
        maxRetries: 3
        idleTimeout: 30s
    outlierDetection:
      consecutive5xxErrors: 5
      interval: 10s
      baseEjectionTime: 30s
    tls:
      mode: ISTIO_MUTUAL
`,
		shows: contains("cds.json", "LEAST_REQUEST", "max_requests_per_connection"),
	},
}

// TestIntegrationWaypointGoldens regenerates, from a real istiod, the
// configuration it sends a waypoint for each scenario and compares it with
// the committed goldens (test/waypointgolden): an istiod bump shows here as
// a readable diff. -update rewrites them (go test ./test/istiod -run
// WaypointGoldens -update).
func TestIntegrationWaypointGoldens(t *testing.T) {
	bin := istiod.Binaries(t)
	version := istioVersion(t)
	checkClaimedVersion(t)
	cp := kube.Start(t, kube.Options{})
	d := istiod.Start(t, cp, istiod.Options{BinDir: bin, GatewayAPI: true})

	ctx, cancel := context.WithTimeout(context.Background(), 8*time.Minute)
	defer cancel()
	wp := setupWaypointMesh(t, ctx, cp)
	addr := waitGatewayAddress(t, ctx, cp)
	t.Logf("gateway %s/%s status addresses: %s", meshNS, waypointName, addr)
	_, err := cp.Client.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: fenceNS}}, metav1.CreateOptions{})
	must(t, err)

	token, err := d.TokenFor(ctx, meshNS, waypointName, wp)
	must(t, err)
	n, err := waypointNode().Proto()
	must(t, err)
	snap := func() (map[string][]byte, error) { return captureFiles(ctx, d, token, n, false) }

	dir := filepath.Join(waypointgolden.Dir(), version)
	var base map[string][]byte
	for i, sc := range waypointScenarios {
		ok := t.Run(sc.name, func(t *testing.T) {
			if sc.yaml != "" {
				applyYAML(t, ctx, cp, sc.name, sc.yaml)
			}
			ready := func(files map[string][]byte) error {
				if sc.name == "base" {
					return baseReady(files)
				}
				if sc.shows != nil {
					return sc.shows(files)
				}
				return nil
			}
			var files map[string][]byte
			testutil.EventuallyNil(t, "istiod's waypoint config showing "+sc.name, func() error {
				var err error
				if files, err = snap(); err != nil {
					return err
				}
				return ready(files)
			})
			barrier(t, ctx, cp, d, sc, i)
			first := stableCapture(t, sc.name, snap)
			if sc.name == "base" {
				base = first
			}
			compareGolden(t, filepath.Join(dir, sc.name), first)

			if sc.yaml != "" {
				deleteYAML(t, ctx, cp, sc.name, sc.yaml)
				waitGone(t, ctx, d, sc)
				testutil.EventuallyNil(t, "the base config after deleting "+sc.name, func() error {
					files, err := snap()
					if err != nil {
						return err
					}
					if d := diffFiles(base, files); d != "" {
						return fmt.Errorf("config after deleting %s is not the base's:\n%s", sc.name, d)
					}
					return nil
				})
			}
		})
		if !ok && i == 0 {
			t.Fatal("no base configuration; the other scenarios are compared against it")
		}
	}
	if !*updateGoldens {
		// A scenario directory nobody generates any more is stale.
		have, err := waypointgolden.Scenarios(version)
		must(t, err)
		for _, s := range have {
			if !slices.ContainsFunc(waypointScenarios, func(sc waypointScenario) bool { return sc.name == s }) &&
				!slices.ContainsFunc(routerScenarios, func(sc routerScenario) bool { return sc.name == s }) {
				t.Errorf("golden %s/%s has no scenario; remove it", version, s)
			}
		}
	}
}

// captureFiles captures the configuration istiod sends node n (captureAs)
// and renders it as golden files; testutil.Final marks what waiting
// cannot cure.
func captureFiles(ctx context.Context, d *istiod.Istiod, token string, n *corev3.Node, router bool) (map[string][]byte, error) {
	s, err := captureAs(ctx, d.Address, d.ServerName, d.RootPEM, token, n, router)
	if err != nil {
		return nil, err
	}
	if err := noUnknownFields(s); err != nil {
		return nil, testutil.Final(err)
	}
	if err := waypointgolden.Normalize(s); err != nil {
		return nil, testutil.Final(err)
	}
	files, err := waypointgolden.Render(s)
	if err != nil {
		return nil, testutil.Final(err)
	}
	return files, nil
}

// baseReady reports whether istiod has the whole base mesh in the
// waypoint's configuration: a chain per bookinfo service, their endpoints
// and every pod in WDS.
func baseReady(files map[string][]byte) error {
	for _, s := range meshServices {
		c := fmt.Sprintf("inbound-vip|9080|http|%s.default.svc.cluster.local", s.name)
		if err := contains("lds.json", c)(files); err != nil {
			return err
		}
		if err := contains("eds.json", c)(files); err != nil {
			return err
		}
	}
	for _, p := range meshPods {
		if err := contains("eds.json", `"`+p.ip+`:9080"`)(files); err != nil && p.name != "sleep" {
			return err
		}
		if err := contains("wds.json", "Kubernetes//Pod/default/"+p.name)(files); err != nil {
			return err
		}
	}
	return contains("wds.json", "Kubernetes//Pod/default/"+waypointPod)(files)
}

const fenceNS = "fence"

// barrier returns once istiod's push context was built after its config
// store held sc's Istio objects: the store must list them (/debug/configz),
// then a fence policy applied afterwards must be in the push context
// (/debug/pushcontext). A capture after that reflects the objects even when
// they change nothing (Gateway API objects, translated in their own
// controller, are covered by sc.shows instead).
func barrier(t *testing.T, ctx context.Context, cp *kube.ControlPlane, d *istiod.Istiod, sc waypointScenario, i int) {
	t.Helper()
	testutil.EventuallyNil(t, sc.name+"'s objects in istiod's store", func() error {
		return inStore(ctx, d, istioObjects(t, sc.yaml), true)
	})
	fence := fmt.Sprintf("fence-%d", i)
	applyYAML(t, ctx, cp, fence, fmt.Sprintf(`apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: %s
  namespace: %s
spec:
  selector:
    matchLabels:
      app: no-such-app
`, fence, fenceNS))
	testutil.EventuallyNil(t, "the fence policy in istiod's push context", func() error {
		body, err := istiod.DebugGet(ctx, d.HTTPAddr, "/debug/pushcontext")
		if err != nil {
			return err
		}
		if !bytes.Contains(body, []byte(`"`+fence+`"`)) {
			return fmt.Errorf("push context has no %s yet", fence)
		}
		return nil
	})
}

// waitGone waits until istiod's config store no longer lists sc's Istio
// objects.
func waitGone(t *testing.T, ctx context.Context, d *istiod.Istiod, sc waypointScenario) {
	t.Helper()
	testutil.EventuallyNil(t, sc.name+"'s objects gone from istiod's store", func() error {
		return inStore(ctx, d, istioObjects(t, sc.yaml), false)
	})
}

type objectRef struct{ kind, namespace, name string }

// istioObjects lists the objects of manifest in Istio's API groups.
func istioObjects(t *testing.T, manifest string) []objectRef {
	var out []objectRef
	for _, doc := range strings.Split(manifest, "\n---\n") {
		var o struct {
			APIVersion string `json:"apiVersion"`
			Kind       string `json:"kind"`
			Metadata   struct {
				Name, Namespace string
			} `json:"metadata"`
		}
		if strings.TrimSpace(doc) == "" {
			continue
		}
		if err := yaml.Unmarshal([]byte(doc), &o); err != nil {
			t.Fatalf("scenario yaml: %v", err)
		}
		if strings.Contains(o.APIVersion, "istio.io/") {
			out = append(out, objectRef{o.Kind, o.Metadata.Namespace, o.Metadata.Name})
		}
	}
	return out
}

func inStore(ctx context.Context, d *istiod.Istiod, want []objectRef, present bool) error {
	if len(want) == 0 {
		return nil
	}
	body, err := istiod.DebugGet(ctx, d.HTTPAddr, "/debug/configz")
	if err != nil {
		return err
	}
	var configs []struct {
		Kind     string `json:"kind"`
		Metadata struct {
			Name      string `json:"name"`
			Namespace string `json:"namespace"`
		} `json:"metadata"`
	}
	if err := json.Unmarshal(body, &configs); err != nil {
		return fmt.Errorf("/debug/configz: %w", err)
	}
	have := map[objectRef]bool{}
	for _, c := range configs {
		have[objectRef{c.Kind, c.Metadata.Namespace, c.Metadata.Name}] = true
	}
	for _, w := range want {
		if have[w] != present {
			return fmt.Errorf("istiod's config store: %s %s/%s present=%v, want %v", w.kind, w.namespace, w.name, have[w], present)
		}
	}
	return nil
}

// stableCapture captures name's configuration twice, from two streams,
// and returns the first: what differs between them is not configuration
// but something Normalize must learn about, and fails the test.
func stableCapture(t *testing.T, name string, snap func() (map[string][]byte, error)) map[string][]byte {
	t.Helper()
	first, err := snap()
	must(t, err)
	second, err := snap()
	must(t, err)
	if d := diffFiles(first, second); d != "" {
		t.Fatalf("two captures of %s differ; normalise the field in waypointgolden.Normalize:\n%s", name, d)
	}
	return first
}

// compareGolden compares files with the golden directory, or writes them
// there with -update.
func compareGolden(t *testing.T, dir string, files map[string][]byte) {
	t.Helper()
	if *updateGoldens {
		must(t, os.MkdirAll(dir, 0o755))
		for name, b := range files {
			must(t, os.WriteFile(filepath.Join(dir, name), b, 0o644))
		}
		t.Logf("wrote %s", dir)
		return
	}
	want := map[string][]byte{}
	for name := range files {
		b, err := os.ReadFile(filepath.Join(dir, name))
		if err != nil {
			t.Errorf("golden %s: %v (run with -update to create it)", dir, err)
			continue
		}
		want[name] = b
	}
	if d := diffFiles(want, files); d != "" {
		t.Errorf("istiod's waypoint configuration differs from %s (-golden +istiod); if the change is expected, rerun with -update and review what waypoint/config must learn:\n%s", dir, d)
	}
}

// diffFiles is a unified diff of each file that differs, or "".
func diffFiles(a, b map[string][]byte) string {
	var out strings.Builder
	names := slices.Sorted(maps.Keys(a))
	for n := range b {
		if _, ok := a[n]; !ok {
			names = append(names, n)
		}
	}
	for _, n := range names {
		if bytes.Equal(a[n], b[n]) {
			continue
		}
		d, err := difflib.GetUnifiedDiffString(difflib.UnifiedDiff{
			A: difflib.SplitLines(string(a[n])), B: difflib.SplitLines(string(b[n])),
			FromFile: "golden/" + n, ToFile: "istiod/" + n, Context: 3,
		})
		if err != nil {
			d = err.Error()
		}
		out.WriteString(d)
	}
	return out.String()
}

// noUnknownFields fails on fields our copies of the protos do not know:
// the goldens would silently drop them.
func noUnknownFields(s *waypointgolden.Snapshot) error {
	var msgs []proto.Message
	for _, m := range s.Listeners {
		msgs = append(msgs, m)
	}
	for _, m := range s.Clusters {
		msgs = append(msgs, m)
	}
	for _, m := range s.Endpoints {
		msgs = append(msgs, m)
	}
	for _, m := range s.Workloads {
		msgs = append(msgs, m)
	}
	for _, m := range msgs {
		if path := unknownField(m.ProtoReflect(), ""); path != "" {
			return fmt.Errorf("%T has fields unknown to our protos at %s; update the proto copies", m, path)
		}
	}
	return nil
}

func unknownField(m protoreflect.Message, path string) string {
	if len(m.GetUnknown()) > 0 {
		return path + "(unknown)"
	}
	found := ""
	m.Range(func(fd protoreflect.FieldDescriptor, v protoreflect.Value) bool {
		if fd.Kind() != protoreflect.MessageKind && fd.Kind() != protoreflect.GroupKind {
			return true
		}
		p := path + "." + string(fd.Name())
		switch {
		case fd.IsList():
			for i := 0; i < v.List().Len() && found == ""; i++ {
				found = unknownField(v.List().Get(i).Message(), fmt.Sprintf("%s[%d]", p, i))
			}
		case fd.IsMap():
			if fd.MapValue().Kind() == protoreflect.MessageKind {
				v.Map().Range(func(k protoreflect.MapKey, mv protoreflect.Value) bool {
					found = unknownField(mv.Message(), fmt.Sprintf("%s[%v]", p, k))
					return found == ""
				})
			}
		default:
			found = unknownField(v.Message(), p)
		}
		return found == ""
	})
	return found
}

// istioVersion is the istio.io/istio version of the tools module that
// built istiod, the goldens' directory name.
func istioVersion(t *testing.T) string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("tools", "go.mod"))
	must(t, err)
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(strings.TrimPrefix(strings.TrimSpace(line), "require "))
		if len(f) >= 2 && f[0] == "istio.io/istio" {
			return f[1]
		}
	}
	t.Fatal("no istio.io/istio requirement in tools/go.mod")
	return ""
}

// checkClaimedVersion fails when the ISTIO_VERSION amber-waypoint claims
// is not the built istiod's (its VERSION file plus Istio's "-dev").
func checkClaimedVersion(t *testing.T) {
	t.Helper()
	cmd := exec.Command("go", "list", "-m", "-f", "{{.Dir}}", "istio.io/istio")
	cmd.Dir = "tools"
	cmd.Env = append(os.Environ(), "GOWORK=off", "GOFLAGS=-mod=readonly")
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("go list istio.io/istio: %v", err)
	}
	v, err := os.ReadFile(filepath.Join(strings.TrimSpace(string(out)), "VERSION"))
	must(t, err)
	if want := strings.TrimSpace(string(v)) + "-dev"; node.IstioVersion != want {
		t.Errorf("node.IstioVersion = %q, but the istiod under test is %s: bump it with the goldens", node.IstioVersion, want)
	}
}
