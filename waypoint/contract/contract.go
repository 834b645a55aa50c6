// Package contract reads what istiod's waypoint template gives its
// container (args, environment, mounted files; docs/waypoint.md, "The
// container contract") the way pilot-agent does, into a waypoint.Config.
// Settings only Envoy has are accepted and reported as ignored; settings
// that would change how the waypoint authenticates or whom it trusts are
// refused.
package contract

import (
	"cmp"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"

	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"
	meshconfig "istio.io/api/mesh/v1alpha1"
	"sigs.k8s.io/yaml"

	"github.com/amber-mesh/amber/waypoint"
	"github.com/amber-mesh/amber/waypoint/node"
)

// Files istiod's waypoint template mounts (volumes istio-token,
// istiod-ca-cert and istio-podinfo).
const (
	TokenFile       = "/var/run/secrets/tokens/istio-token"
	RootCertFile    = "/var/run/secrets/istio/root-cert.pem"
	LabelsFile      = "/etc/istio/pod/labels"
	AnnotationsFile = "/etc/istio/pod/annotations"
	// MeshConfigFile is where Istio's legacy gateway chart
	// (manifests/charts/gateways/istio-ingress) mounts the mesh config
	// ConfigMap; pilot-agent reads it by default (--meshConfig,
	// pilot/cmd/pilot-agent/app/cmd.go; ConstructProxyConfig in
	// pilot/cmd/pilot-agent/config/config.go takes its defaultConfig,
	// which PROXY_CONFIG then overrides).
	MeshConfigFile = "/etc/istio/config/mesh"
)

// DefaultDiscoveryAddress is the mesh default ProxyConfig's.
const DefaultDiscoveryAddress = "istiod.istio-system.svc:15012"

// metaPrefix is pilot-agent's: ISTIO_META_<KEY> becomes node metadata KEY.
const metaPrefix = "ISTIO_META_"

// ErrRefused is wrapped by every refusal of a setting.
var ErrRefused = errors.New("refused")

// Contract is what the container was given.
type Contract struct {
	// Config is the waypoint's configuration (without NewDataPath, Logger
	// and Ready, which the command sets).
	Config waypoint.Config
	// LogFormat is "json" with --log_as_json, else "text"; LogLevel is the
	// default scope's --log_output_level as a slog level name.
	LogFormat, LogLevel string
	// Ignored lists the settings accepted but without effect (Envoy's),
	// one line each, for the command to log.
	Ignored []string
}

// Load reads args (without the program name), environ (KEY=value, as
// os.Environ) and the template's files under root ("/" in production:
// the files' paths are joined to it).
func Load(args, environ []string, root string) (*Contract, error) {
	c := &Contract{LogFormat: "text", LogLevel: "info"}
	if err := c.flags(args); err != nil {
		return nil, err
	}
	env := map[string]string{}
	for _, kv := range environ {
		if k, v, ok := strings.Cut(kv, "="); ok {
			env[k] = v
		}
	}
	mesh, err := readMeshConfig(filepath.Join(root, MeshConfigFile))
	if err != nil {
		return nil, err
	}
	if err := c.environment(env, mesh); err != nil {
		return nil, err
	}
	if err := c.files(root); err != nil {
		return nil, err
	}
	slices.Sort(c.Ignored)
	return c, nil
}

// flag kinds.
const (
	flagValue = iota // takes a value
	flagBool         // a switch; takes =true/=false only in the = form
)

type flagSpec struct {
	kind int
	// set applies the value; nil means Envoy's or otherwise without
	// effect: accepted, reported as ignored.
	set func(c *Contract, v string) error
}

// flags are pilot-agent's `proxy` flags (pilot/cmd/pilot-agent/app
// cmd.go) and its logging flags (pkg/log options.go).
var flags = map[string]flagSpec{
	"domain": {flagValue, func(*Contract, string) error { return nil }}, // the pod's DNS domain: istiod's business
	"serviceCluster": {flagValue, func(c *Contract, v string) error {
		c.Config.ServiceCluster = v
		return nil
	}},
	"log_output_level": {flagValue, func(c *Contract, v string) error {
		l, err := logLevel(v)
		c.LogLevel = l
		return err
	}},
	"log_as_json": {flagBool, func(c *Contract, v string) error {
		b, err := strconv.ParseBool(v)
		if err != nil {
			return fmt.Errorf("--log_as_json=%s: %w", v, err)
		}
		c.LogFormat = map[bool]string{true: "json", false: "text"}[b]
		return nil
	}},
	"log_target":             {flagValue, nil},
	"log_stacktrace_level":   {flagValue, nil},
	"log_caller":             {flagValue, nil},
	"proxyLogLevel":          {flagValue, nil},
	"proxyComponentLogLevel": {flagValue, nil},
	"concurrency":            {flagValue, nil},
	"outlierLogPath":         {flagValue, nil},
	"templateFile":           {flagValue, nil},
	"profiling":              {flagBool, nil},
	// What changes how the waypoint authenticates or what it trusts.
	"meshConfig": {flagValue, func(_ *Contract, v string) error {
		// Only pilot-agent's default, which Load reads.
		if v == "."+MeshConfigFile || v == MeshConfigFile {
			return nil
		}
		return fmt.Errorf("%w: amber-waypoint reads the mesh config at %s only", ErrRefused, MeshConfigFile)
	}},
	"stsPort":            {flagValue, refuseUnless("0", "the STS token exchange server is not implemented")},
	"tokenManagerPlugin": {flagValue, refuseUnless("", "token manager plugins are not implemented")},
}

func refuse(why string) func(*Contract, string) error {
	return func(*Contract, string) error { return fmt.Errorf("%w: %s", ErrRefused, why) }
}

func refuseUnless(ok, why string) func(*Contract, string) error {
	return func(_ *Contract, v string) error {
		if v == ok {
			return nil
		}
		return fmt.Errorf("%w: %s", ErrRefused, why)
	}
}

// flags parses `proxy waypoint --flag value --flag=value ...`: the
// subcommands pilot-agent takes, then pflag-style flags (one or two
// dashes). A flag amber-waypoint does not know is reported as ignored,
// with the next argument as its value unless that is a flag itself.
func (c *Contract) flags(args []string) error {
	var positional []string
	for i := 0; i < len(args); i++ {
		a := args[i]
		if !strings.HasPrefix(a, "-") || a == "-" {
			positional = append(positional, a)
			continue
		}
		if a == "--" {
			positional = append(positional, args[i+1:]...)
			break
		}
		name, value, hasValue := strings.Cut(strings.TrimLeft(a, "-"), "=")
		spec, known := flags[name]
		if !known {
			// Its value, if it has one, is the next argument unless that
			// is a flag; the subcommands come first, so none is taken
			// for a value before them.
			if !hasValue && i+1 < len(args) && !strings.HasPrefix(args[i+1], "-") && len(positional) >= 2 {
				value = args[i+1]
				i++
			}
			c.Ignored = append(c.Ignored, fmt.Sprintf("flag --%s=%s: unknown to amber-waypoint (an Envoy or pilot-agent setting it does not have)", name, value))
			continue
		}
		if !hasValue {
			switch spec.kind {
			case flagBool:
				value = "true"
			default:
				if i+1 >= len(args) {
					return fmt.Errorf("flag --%s needs a value", name)
				}
				value = args[i+1]
				i++
			}
		}
		if spec.set == nil {
			c.Ignored = append(c.Ignored, fmt.Sprintf("flag --%s=%s: Envoy's, no effect on amber-waypoint", name, value))
			continue
		}
		if err := spec.set(c, value); err != nil {
			return fmt.Errorf("flag --%s: %w", name, err)
		}
	}
	switch {
	case len(positional) == 0:
	case positional[0] != "proxy":
		return fmt.Errorf("command %q: amber-waypoint runs as `proxy waypoint` or `proxy router`", positional[0])
	case len(positional) < 2 || (positional[1] != node.Waypoint && positional[1] != node.Router):
		return fmt.Errorf("%w: proxy type %q: amber-waypoint is a waypoint or an ingress gateway (router) only", ErrRefused, strings.Join(positional[1:], " "))
	case len(positional) > 2:
		return fmt.Errorf("unexpected arguments %q", positional[2:])
	default:
		c.Config.Node.Type = positional[1]
	}
	return nil
}

// logLevel reads --log_output_level: "<level>" or a list of
// "<scope>:<level>", of which the default scope's counts.
func logLevel(v string) (string, error) {
	level := ""
	for _, part := range strings.Split(v, ",") {
		scope, l, ok := strings.Cut(strings.TrimSpace(part), ":")
		switch {
		case !ok:
			level = scope
		case scope == "default":
			level = l
		}
	}
	switch level {
	case "":
		return "info", nil
	case "debug", "info", "error":
		return level, nil
	case "warn", "warning":
		return "warn", nil
	case "fatal", "none":
		return "error", nil
	}
	return "", fmt.Errorf("level %q: want debug, info, warn, error, fatal or none", level)
}

// meshFile is what amber reads of a mounted mesh config.
type meshFile struct {
	// DefaultConfig is its defaultConfig (a ProxyConfig) as JSON; nil
	// without.
	DefaultConfig []byte
	// TrustDomain is its trustDomain.
	TrustDomain string
}

// readMeshConfig reads the mesh config file (YAML) if there is one: the
// defaultConfig, which goes through the same checks as PROXY_CONFIG,
// and the trust domain. The rest of the mesh config is istiod's.
func readMeshConfig(path string) (*meshFile, error) {
	b, err := os.ReadFile(path)
	switch {
	case errors.Is(err, os.ErrNotExist):
		return &meshFile{}, nil
	case err != nil:
		return nil, err
	}
	var m struct {
		DefaultConfig json.RawMessage `json:"defaultConfig"`
		TrustDomain   string          `json:"trustDomain"`
	}
	if err := yaml.Unmarshal(b, &m); err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	mf := &meshFile{TrustDomain: m.TrustDomain}
	if len(m.DefaultConfig) > 0 && string(m.DefaultConfig) != "null" {
		mf.DefaultConfig = m.DefaultConfig
	}
	return mf, nil
}

// environment reads the variables the template sets, over the mounted
// mesh config's defaultConfig.
func (c *Contract) environment(env map[string]string, mesh *meshFile) error {
	cfg := &c.Config
	n := &cfg.Node

	// PROXY_CONFIG first: its proxyMetadata are variables too, below the
	// environment's own (pilot-agent's order). It overrides the mesh
	// config file's defaultConfig field by field (mesh.ApplyProxyConfig).
	pc, err := c.proxyConfig(mesh.DefaultConfig, env["PROXY_CONFIG"])
	if err != nil {
		return err
	}
	lookup := func(k string) string {
		if v, ok := env[k]; ok {
			return v
		}
		return pc.GetProxyMetadata()[k]
	}

	n.PodName, n.Namespace = lookup("POD_NAME"), lookup("POD_NAMESPACE")
	n.ServiceAccount = cmp.Or(lookup("SERVICE_ACCOUNT"), lookup(metaPrefix+"SERVICE_ACCOUNT"))
	if ip := lookup("INSTANCE_IP"); ip != "" {
		a, err := netip.ParseAddr(ip)
		if err != nil {
			return fmt.Errorf("INSTANCE_IP: %w", err)
		}
		n.IP = a
	}
	if sa := lookup(metaPrefix + "SERVICE_ACCOUNT"); sa != "" && sa != n.ServiceAccount {
		return fmt.Errorf("%w: ISTIO_META_SERVICE_ACCOUNT %q differs from SERVICE_ACCOUNT %q", ErrRefused, sa, n.ServiceAccount)
	}
	cfg.TrustDomain = cmp.Or(lookup("TRUST_DOMAIN"), mesh.TrustDomain)
	n.TrustDomain = cmp.Or(lookup(metaPrefix+"MESH_ID"), pc.GetMeshId(), cfg.TrustDomain)
	n.ClusterID = lookup(metaPrefix + "CLUSTER_ID")
	n.NodeName = lookup(metaPrefix + "NODE_NAME")
	n.WorkloadName = lookup(metaPrefix + "WORKLOAD_NAME")
	if v := lookup(metaPrefix + "INTERCEPTION_MODE"); v != "" && v != "REDIRECT" {
		c.Ignored = append(c.Ignored, "ISTIO_META_INTERCEPTION_MODE="+v+": a waypoint intercepts nothing")
	}
	// The other ISTIO_META_* pass through, from PROXY_CONFIG's
	// proxyMetadata and the environment (pilot-agent's GetNodeMetaData).
	own := map[string]bool{"SERVICE_ACCOUNT": true, "MESH_ID": true, "CLUSTER_ID": true, "NODE_NAME": true, "WORKLOAD_NAME": true, "INTERCEPTION_MODE": true, "OWNER": true}
	keys := map[string]bool{}
	for k := range pc.GetProxyMetadata() {
		keys[k] = true
	}
	for k := range env {
		keys[k] = true
	}
	for k := range keys {
		key, ok := strings.CutPrefix(k, metaPrefix)
		if !ok || own[key] || key == "" {
			continue
		}
		if n.Extra == nil {
			n.Extra = map[string]string{}
		}
		n.Extra[key] = lookup(k)
	}

	cfg.CAAddress = lookup("CA_ADDR")
	switch p := lookup("PILOT_CERT_PROVIDER"); p {
	case "", "istiod":
	default:
		// Which roots verify istiod: amber verifies it against the
		// mesh roots istiod publishes (istiod's own provider).
		return fmt.Errorf("%w: PILOT_CERT_PROVIDER=%s: only istiod", ErrRefused, p)
	}
	if v := lookup("XDS_ROOT_CA"); v != "" {
		return fmt.Errorf("%w: XDS_ROOT_CA: istiod is verified against the mesh roots only", ErrRefused)
	}
	if v := lookup("CA_ROOT_CA"); v != "" {
		return fmt.Errorf("%w: CA_ROOT_CA: the CA is verified against the mesh roots only", ErrRefused)
	}
	return nil
}

// proxyConfig reads PROXY_CONFIG (ProxyConfig as JSON, what istiod's
// template renders from the mesh's defaultConfig): what amber uses is
// applied, Envoy's is reported as ignored, what would change the
// waypoint's trust is refused, and a field unknown to this build's
// ProxyConfig is an error naming it.
func (c *Contract) proxyConfig(meshDefault []byte, raw string) (*meshconfig.ProxyConfig, error) {
	pc := &meshconfig.ProxyConfig{}
	if len(meshDefault) > 0 {
		if err := protojson.Unmarshal(meshDefault, pc); err != nil {
			return nil, fmt.Errorf("%s defaultConfig: %w", MeshConfigFile, err)
		}
	}
	if strings.TrimSpace(raw) != "" {
		over := &meshconfig.ProxyConfig{}
		if err := protojson.Unmarshal([]byte(raw), over); err != nil {
			return nil, fmt.Errorf("PROXY_CONFIG: %w", err)
		}
		proto.Merge(pc, over)
	}
	cfg := &c.Config
	cfg.XDSAddress = cmp.Or(pc.GetDiscoveryAddress(), DefaultDiscoveryAddress)
	var err error
	pc.ProtoReflect().Range(func(fd protoreflect.FieldDescriptor, v protoreflect.Value) bool {
		switch name := fd.Name(); name {
		case "discovery_address", "proxy_metadata", "mesh_id":
			// Used above and by the caller.
		case "termination_drain_duration":
			cfg.DrainTimeout = pc.GetTerminationDrainDuration().AsDuration()
			if cfg.DrainTimeout == 0 {
				cfg.DrainTimeout = -1 // pilot-agent's zero: no drain; the Config's: the default
			}
		case "proxy_admin_port":
			// istioctl's --proxy-admin-port follows it; loopback only.
			cfg.Listen.Admin = net.JoinHostPort("127.0.0.1", strconv.Itoa(int(pc.GetProxyAdminPort())))
		case "status_port":
			cfg.Listen.Metrics = net.JoinHostPort("::", strconv.Itoa(int(pc.GetStatusPort())))
		case "control_plane_auth_policy":
			// NONE (plaintext to istiod) is the enum's zero and so
			// indistinguishable from unset; amber reaches istiod over
			// TLS verified against the mesh roots whatever it says.
		case "ca_certificates_pem":
			err = fmt.Errorf("%w: PROXY_CONFIG caCertificatesPem: amber-waypoint trusts the mesh roots only", ErrRefused)
		case "private_key_provider":
			err = fmt.Errorf("%w: PROXY_CONFIG privateKeyProvider: keys are generated and held in process", ErrRefused)
		default:
			c.Ignored = append(c.Ignored, fmt.Sprintf("PROXY_CONFIG %s: Envoy's, no effect on amber-waypoint", fd.JSONName()))
		}
		return err == nil
	})
	return pc, err
}

// files checks the token and roots are readable (the waypoint reads them
// again for every use) and reads the downward-API labels and annotations.
func (c *Contract) files(root string) error {
	cfg := &c.Config
	cfg.TokenFile = filepath.Join(root, TokenFile)
	cfg.RootCertFile = filepath.Join(root, RootCertFile)
	for _, f := range []string{cfg.TokenFile, cfg.RootCertFile} {
		if _, err := os.Stat(f); err != nil {
			return err
		}
	}
	labels, err := readDownwardAPI(filepath.Join(root, LabelsFile))
	if err != nil {
		return err
	}
	// pilot-agent drops the Deployment's pod-template-hash.
	delete(labels, "pod-template-hash")
	cfg.Node.Labels = labels
	annotations, err := readDownwardAPI(filepath.Join(root, AnnotationsFile))
	switch {
	case errors.Is(err, os.ErrNotExist):
	case err != nil:
		return err
	default:
		cfg.Node.Annotations = annotations
	}
	return nil
}

// readDownwardAPI parses a downward-API file: key="quoted value" lines
// (pkg/bootstrap ParseDownwardAPI).
func readDownwardAPI(path string) (map[string]string, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	out := map[string]string{}
	for i, line := range strings.Split(string(b), "\n") {
		if strings.TrimSpace(line) == "" {
			continue
		}
		k, q, ok := strings.Cut(line, "=")
		if !ok {
			return nil, fmt.Errorf("%s:%d: no '='", path, i+1)
		}
		v, err := strconv.Unquote(q)
		if err != nil {
			return nil, fmt.Errorf("%s:%d: value %s: %w", path, i+1, q, err)
		}
		out[k] = v
	}
	return out, nil
}

// LogIgnored writes one line per ignored setting.
func (c *Contract) LogIgnored(log *slog.Logger) {
	for _, s := range c.Ignored {
		log.Info("setting ignored", "setting", s)
	}
}

// Validate checks the contract gave everything the waypoint needs, with
// the variable or file to set.
func (c *Contract) Validate() error {
	n := c.Config.Node
	switch {
	case n.PodName == "" || n.Namespace == "":
		return errors.New("POD_NAME and POD_NAMESPACE are required")
	case !n.IP.IsValid():
		return errors.New("INSTANCE_IP is required")
	case n.ServiceAccount == "":
		return errors.New("SERVICE_ACCOUNT is required")
	case n.Labels[node.GatewayNameLabel] == "" && !n.IsRouter():
		return fmt.Errorf("%s has no %s label: not a waypoint pod", LabelsFile, node.GatewayNameLabel)
	}
	return nil
}
