package contract

import (
	"errors"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/amber-mesh/amber/waypoint/node"
)

// templateArgs are the container args istiod's waypoint template renders
// with the chart's default values (global.proxy.logLevel warning,
// componentLogLevel misc:error, global.logging.level default:info), after
// the kubelet expanded $(POD_NAMESPACE).
var templateArgs = []string{
	"proxy", "waypoint",
	"--domain", "default.svc.cluster.local",
	"--serviceCluster", "waypoint.default",
	"--proxyLogLevel", "warning",
	"--proxyComponentLogLevel", "misc:error",
	"--log_output_level", "default:info",
}

// proxyConfig is a PROXY_CONFIG with the mesh default ProxyConfig's
// fields set explicitly, as a ProxyConfig resource may set them (istiod
// renders `{}` with its default mesh config: TestIntegrationWaypointTemplate).
const proxyConfig = `{"configPath":"./etc/istio/proxy","binaryPath":"/usr/local/bin/envoy","serviceCluster":"istio-proxy","drainDuration":"45s","discoveryAddress":"istiod.istio-system.svc:15012","proxyAdminPort":15000,"controlPlaneAuthPolicy":"MUTUAL_TLS","statNameLength":189,"statusPort":15020,"terminationDrainDuration":"5s","tracing":{"zipkin":{"address":"zipkin.istio-system:9411"}},"proxyMetadata":{"ISTIO_META_DNS_CAPTURE":"true"}}`

// templateEnv is the template's env for the walkthrough's waypoint pod.
func templateEnv() []string {
	return []string{
		"ISTIO_META_SERVICE_ACCOUNT=waypoint",
		"ISTIO_META_NODE_NAME=node-1",
		"PILOT_CERT_PROVIDER=istiod",
		"CA_ADDR=istiod.istio-system.svc:15012",
		"POD_NAME=waypoint-7d5c9b8f6-x2x7q",
		"POD_NAMESPACE=default",
		"INSTANCE_IP=10.244.0.20",
		"SERVICE_ACCOUNT=waypoint",
		"HOST_IP=192.168.1.10",
		"ISTIO_CPU_LIMIT=2",
		"PROXY_CONFIG=" + proxyConfig,
		"GOMEMLIMIT=1073741824",
		"GOMAXPROCS=2",
		"ISTIO_META_CLUSTER_ID=Kubernetes",
		"ISTIO_META_INTERCEPTION_MODE=REDIRECT",
		"ISTIO_META_WORKLOAD_NAME=waypoint",
		"ISTIO_META_OWNER=kubernetes://apis/apps/v1/namespaces/default/deployments/waypoint",
		"ISTIO_META_MESH_ID=cluster.local",
		"TRUST_DOMAIN=cluster.local",
		"ISTIO_META_DNS_CAPTURE=true",
	}
}

// fileWriter returns a function writing a file at its path under root.
func fileWriter(t *testing.T, root string) func(path, content string) {
	return func(path, content string) {
		t.Helper()
		p := filepath.Join(root, path)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
	}
}

// podFiles writes the template's mounted files under a test root.
func podFiles(t *testing.T) string {
	t.Helper()
	root := t.TempDir()
	write := fileWriter(t, root)
	write(TokenFile, "token")
	write(RootCertFile, "-----BEGIN CERTIFICATE-----\n")
	// The kubelet's downward-API format: key="Go-quoted value", sorted.
	write(LabelsFile, strings.Join([]string{
		`gateway.istio.io/managed="istio.io-mesh-controller"`,
		`gateway.networking.k8s.io/gateway-class-name="istio-waypoint"`,
		`gateway.networking.k8s.io/gateway-name="waypoint"`,
		`istio.io/dataplane-mode="none"`,
		`pod-template-hash="7d5c9b8f6"`,
		`service.istio.io/canonical-name="waypoint"`,
		`service.istio.io/canonical-revision="latest"`,
		`sidecar.istio.io/inject="false"`,
	}, "\n"))
	write(AnnotationsFile, `istio.io/rev="default"`+"\n"+`kubernetes.io/config.seen="2026-08-27T12:00:00.000000000Z"`+"\n"+`note="a \"quoted\"\nvalue"`)
	return root
}

func TestTemplateContract(t *testing.T) {
	root := podFiles(t)
	c, err := Load(templateArgs, templateEnv(), root)
	if err != nil {
		t.Fatal(err)
	}
	if err := c.Validate(); err != nil {
		t.Fatal(err)
	}
	cfg := c.Config
	n := cfg.Node
	if n.PodName != "waypoint-7d5c9b8f6-x2x7q" || n.Namespace != "default" || n.ServiceAccount != "waypoint" ||
		n.IP != netip.MustParseAddr("10.244.0.20") || n.NodeName != "node-1" || n.ClusterID != "Kubernetes" ||
		n.WorkloadName != "waypoint" || n.TrustDomain != "cluster.local" {
		t.Errorf("node %+v", n)
	}
	if err := n.Validate(); err != nil {
		t.Errorf("node: %v", err)
	}
	if _, ok := n.Labels["pod-template-hash"]; ok || n.Labels[node.GatewayNameLabel] != "waypoint" || len(n.Labels) != 7 {
		t.Errorf("labels %v", n.Labels)
	}
	if n.Annotations["note"] != "a \"quoted\"\nvalue" || n.Annotations["istio.io/rev"] != "default" {
		t.Errorf("annotations %v", n.Annotations)
	}
	if want := map[string]string{"DNS_CAPTURE": "true"}; !mapsEqual(n.Extra, want) {
		t.Errorf("extra metadata %v, want %v", n.Extra, want)
	}
	if cfg.XDSAddress != "istiod.istio-system.svc:15012" || cfg.CAAddress != "istiod.istio-system.svc:15012" ||
		cfg.TokenFile != filepath.Join(root, TokenFile) || cfg.RootCertFile != filepath.Join(root, RootCertFile) ||
		cfg.ServiceCluster != "waypoint.default" || cfg.TrustDomain != "cluster.local" || cfg.DrainTimeout != 5*time.Second ||
		cfg.Listen.Admin != "127.0.0.1:15000" || cfg.Listen.Metrics != "[::]:15020" {
		t.Errorf("config %+v", cfg)
	}
	if c.LogLevel != "info" || c.LogFormat != "text" {
		t.Errorf("logging %s %s", c.LogFormat, c.LogLevel)
	}
	if id := cfg.Identity().String(); id != "spiffe://cluster.local/ns/default/sa/waypoint" {
		t.Errorf("identity %s", id)
	}
	// Envoy's settings are each reported once.
	for _, want := range []string{"flag --proxyLogLevel=warning", "flag --proxyComponentLogLevel=misc:error", "PROXY_CONFIG tracing", "PROXY_CONFIG binaryPath", "PROXY_CONFIG drainDuration"} {
		if !slices.ContainsFunc(c.Ignored, func(s string) bool { return strings.HasPrefix(s, want) }) {
			t.Errorf("%q not reported as ignored: %q", want, c.Ignored)
		}
	}
	for _, s := range c.Ignored {
		if strings.Contains(s, "discoveryAddress") || strings.Contains(s, "--serviceCluster") {
			t.Errorf("a used setting reported as ignored: %s", s)
		}
	}
}

func mapsEqual(a, b map[string]string) bool {
	if len(a) != len(b) {
		return false
	}
	for k, v := range a {
		if b[k] != v {
			return false
		}
	}
	return true
}

// TestFlagForms: --x=v and --x v, one or two dashes, switches with and
// without a value, unknown flags ignored with their values.
func TestFlagForms(t *testing.T) {
	root := podFiles(t)
	c, err := Load([]string{"proxy", "waypoint", "--serviceCluster=a.b", "-log_as_json", "--log_output_level", "ads:debug,default:warning", "--unknownEnvoyThing", "42", "--outlierLogPath=/dev/stdout", "--profiling=false"}, templateEnv(), root)
	if err != nil {
		t.Fatal(err)
	}
	if c.Config.ServiceCluster != "a.b" || c.LogFormat != "json" || c.LogLevel != "warn" {
		t.Errorf("%+v", c)
	}
	if !slices.ContainsFunc(c.Ignored, func(s string) bool { return strings.HasPrefix(s, "flag --unknownEnvoyThing=42:") }) {
		t.Errorf("unknown flag not reported: %q", c.Ignored)
	}
	if c, err := Load([]string{"proxy", "waypoint", "--log_as_json=false"}, templateEnv(), root); err != nil || c.LogFormat != "text" {
		t.Errorf("--log_as_json=false: %v %+v", err, c)
	}
	if c, err := Load(nil, templateEnv(), root); err != nil || c.Validate() != nil {
		t.Errorf("no args: %v", err)
	}
}

// TestRefused: what would change whom the waypoint trusts or how it
// authenticates is refused, as are other proxy types; a bad value is an
// error naming it.
func TestRefused(t *testing.T) {
	root := podFiles(t)
	env := func(kv ...string) []string {
		e := templateEnv()
		for _, x := range kv {
			k, _, _ := strings.Cut(x, "=")
			e = slices.DeleteFunc(e, func(y string) bool { return strings.HasPrefix(y, k+"=") })
			e = append(e, x)
		}
		return e
	}
	for name, tc := range map[string]struct {
		args    []string
		env     []string
		refused bool
		msg     string
	}{
		"sidecar":               {args: []string{"proxy", "sidecar"}, refused: true, msg: "router) only"},
		"other command":         {args: []string{"request", "GET", "/"}, msg: "proxy waypoint"},
		"mesh config file":      {args: append(slices.Clone(templateArgs), "--meshConfig", "/etc/mesh"), refused: true, msg: MeshConfigFile},
		"sts":                   {args: append(slices.Clone(templateArgs), "--stsPort=15463"), refused: true},
		"token plugin":          {args: append(slices.Clone(templateArgs), "--tokenManagerPlugin", "GoogleTokenExchange"), refused: true},
		"log level":             {args: []string{"--log_output_level=default:loud"}, msg: "loud"},
		"missing value":         {args: []string{"proxy", "waypoint", "--serviceCluster"}, msg: "needs a value"},
		"cert provider":         {env: env("PILOT_CERT_PROVIDER=kubernetes"), refused: true, msg: "PILOT_CERT_PROVIDER"},
		"xds root":              {env: env("XDS_ROOT_CA=/etc/certs/root.pem"), refused: true},
		"extra roots":           {env: env(`PROXY_CONFIG={"caCertificatesPem":["x"]}`), refused: true, msg: "caCertificatesPem"},
		"key provider":          {env: env(`PROXY_CONFIG={"privateKeyProvider":{"cryptomb":{}}}`), refused: true},
		"unknown proxy config":  {env: env(`PROXY_CONFIG={"warpDrive":true}`), msg: "warpDrive"},
		"another account":       {env: env("ISTIO_META_SERVICE_ACCOUNT=admin"), refused: true, msg: "admin"},
		"bad ip":                {env: env("INSTANCE_IP=10.0.0"), msg: "INSTANCE_IP"},
		"cert provider by meta": {env: env(`PROXY_CONFIG={"proxyMetadata":{"PILOT_CERT_PROVIDER":"custom"}}`, "PILOT_CERT_PROVIDER"), refused: true},
	} {
		t.Run(name, func(t *testing.T) {
			args := tc.args
			if args == nil {
				args = templateArgs
			}
			e := tc.env
			if e == nil {
				e = templateEnv()
			}
			_, err := Load(args, e, root)
			if err == nil {
				t.Fatal("accepted")
			}
			if tc.refused != errors.Is(err, ErrRefused) {
				t.Errorf("%v: refused=%v", err, errors.Is(err, ErrRefused))
			}
			if !strings.Contains(err.Error(), tc.msg) {
				t.Errorf("%v does not mention %q", err, tc.msg)
			}
		})
	}
}

// TestMissing: what the waypoint cannot run without is named.
func TestMissing(t *testing.T) {
	root := podFiles(t)
	without := func(k string) []string {
		return slices.DeleteFunc(templateEnv(), func(s string) bool {
			return strings.HasPrefix(s, k+"=") || strings.HasPrefix(s, "ISTIO_META_"+k+"=")
		})
	}
	for _, k := range []string{"POD_NAME", "INSTANCE_IP", "SERVICE_ACCOUNT"} {
		c, err := Load(templateArgs, without(k), root)
		if err != nil {
			t.Fatal(err)
		}
		if err := c.Validate(); err == nil || !strings.Contains(err.Error(), k) {
			t.Errorf("without %s: %v", k, err)
		}
	}
	if err := os.Remove(filepath.Join(root, TokenFile)); err != nil {
		t.Fatal(err)
	}
	if _, err := Load(templateArgs, templateEnv(), root); !errors.Is(err, os.ErrNotExist) || !strings.Contains(err.Error(), "istio-token") {
		t.Errorf("without the token: %v", err)
	}
}
