// Package waypointgolden holds the configuration a real istiod sends a
// waypoint, one directory per scenario, and reads and writes it: the
// goldens test/istiod regenerates from istiod and waypoint/config compiles.
//
// # Layout
//
//	testdata/<istio.io/istio module version>/<scenario>/
//	    lds.json  eds.json  cds.json  wds.json  [rds.json, routers only]
//
// Each file is a JSON array of one xDS type's resources (Listener, Cluster,
// ClusterLoadAssignment, istio.workload.Workload) as protojson with proto
// field names, sorted by resource name, indented by encoding/json so that
// the bytes are stable (protojson's own output deliberately is not).
// Nonces, resource versions and system versions are not stored: they are
// the stream's, not the configuration's. Order istiod derives from
// creation timestamps, which a test cannot fix, is normalised (Normalize).
package waypointgolden

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strings"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	endpointv3 "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	hcmv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/types/known/anypb"

	"github.com/amber-mesh/amber/xds/workloadapi"
)

// Type URLs of the four resource types a waypoint subscribes to. WDS is
// the Workload type (not Address): the one Envoy waypoints' workload
// discovery asks for (istio pilot/pkg/xds/workload.go appendAddress).
const (
	ListenerType = "type.googleapis.com/envoy.config.listener.v3.Listener"
	ClusterType  = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
	EndpointType = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
	WorkloadType = "type.googleapis.com/istio.workload.Workload"
	// RouteType is RDS, which only a router (ingress gateway) node
	// subscribes to: its listeners name their route configurations.
	RouteType = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
	// SecretType is SDS over ADS: the Kubernetes Secrets a router's TLS
	// listeners name (credentialName, certificateRefs).
	SecretType = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"
)

// Files names the file of each type in a scenario directory.
var Files = map[string]string{
	ListenerType: "lds.json",
	ClusterType:  "cds.json",
	EndpointType: "eds.json",
	WorkloadType: "wds.json",
	RouteType:    "rds.json",
	SecretType:   "sds.json",
}

// Snapshot is one scenario's configuration.
type Snapshot struct {
	Listeners []*listenerv3.Listener
	Clusters  []*clusterv3.Cluster
	Endpoints []*endpointv3.ClusterLoadAssignment
	Workloads []*workloadapi.Workload
	// Routes are a router's RDS; a waypoint's scenarios have none (and
	// no rds.json).
	Routes []*routev3.RouteConfiguration
	// Secrets are a router's SDS (only with TLS listeners; sds.json).
	Secrets []*tlsv3.Secret
}

// Dir is the goldens' root directory, testdata/ next to this file.
func Dir() string {
	_, file, _, ok := runtime.Caller(0)
	if !ok {
		panic("waypointgolden: no caller information")
	}
	return filepath.Join(filepath.Dir(file), "testdata")
}

// Versions lists the istiod versions with goldens, sorted.
func Versions() ([]string, error) { return subdirs(Dir()) }

// Scenarios lists the scenarios of an istiod version, sorted.
func Scenarios(version string) ([]string, error) { return subdirs(filepath.Join(Dir(), version)) }

func subdirs(dir string) ([]string, error) {
	entries, err := os.ReadDir(dir)
	if err != nil {
		return nil, fmt.Errorf("goldens: %w", err)
	}
	var out []string
	for _, e := range entries {
		if e.IsDir() {
			out = append(out, e.Name())
		}
	}
	return out, nil
}

// Latest reads one scenario of the newest istiod version with goldens.
func Latest(scenario string) (*Snapshot, error) {
	vs, err := Versions()
	if err != nil {
		return nil, err
	}
	if len(vs) == 0 {
		return nil, fmt.Errorf("goldens: none under %s", Dir())
	}
	return Load(vs[len(vs)-1], scenario)
}

// Load reads one scenario of one istiod version.
func Load(version, scenario string) (*Snapshot, error) {
	return Read(filepath.Join(Dir(), version, scenario))
}

// Read reads the scenario in dir.
func Read(dir string) (*Snapshot, error) {
	s := &Snapshot{}
	var err error
	if s.Listeners, err = readFile[*listenerv3.Listener](dir, ListenerType); err != nil {
		return nil, err
	}
	if s.Clusters, err = readFile[*clusterv3.Cluster](dir, ClusterType); err != nil {
		return nil, err
	}
	if s.Endpoints, err = readFile[*endpointv3.ClusterLoadAssignment](dir, EndpointType); err != nil {
		return nil, err
	}
	if s.Workloads, err = readFile[*workloadapi.Workload](dir, WorkloadType); err != nil {
		return nil, err
	}
	if _, err := os.Stat(filepath.Join(dir, Files[RouteType])); err == nil {
		if s.Routes, err = readFile[*routev3.RouteConfiguration](dir, RouteType); err != nil {
			return nil, err
		}
	}
	if _, err := os.Stat(filepath.Join(dir, Files[SecretType])); err == nil {
		if s.Secrets, err = readFile[*tlsv3.Secret](dir, SecretType); err != nil {
			return nil, err
		}
	}
	return s, nil
}

func readFile[M proto.Message](dir, typeURL string) ([]M, error) {
	path := filepath.Join(dir, Files[typeURL])
	raw, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("golden: %w", err)
	}
	var items []json.RawMessage
	if err := json.Unmarshal(raw, &items); err != nil {
		return nil, fmt.Errorf("golden %s: %w", path, err)
	}
	out := make([]M, len(items))
	for i, item := range items {
		m := newMessage[M]()
		if err := protojson.Unmarshal(item, m); err != nil {
			return nil, fmt.Errorf("golden %s: resource %d: %w", path, i, err)
		}
		out[i] = m
	}
	return out, nil
}

func newMessage[M proto.Message]() M {
	var zero M
	return zero.ProtoReflect().Type().New().Interface().(M)
}

// Render returns the files of s, by file name, in the golden format.
// Every message type inside an Any must be linked into the binary (this
// package imports those istiod is known to send); an unknown one is an
// error naming it.
func Render(s *Snapshot) (map[string][]byte, error) {
	out := map[string][]byte{}
	var errs []error
	add := func(typeURL string, msgs []proto.Message, name func(proto.Message) string) {
		b, err := renderList(msgs, name)
		if err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", Files[typeURL], err))
			return
		}
		out[Files[typeURL]] = b
	}
	add(ListenerType, messages(s.Listeners), func(m proto.Message) string { return m.(*listenerv3.Listener).GetName() })
	add(ClusterType, messages(s.Clusters), func(m proto.Message) string { return m.(*clusterv3.Cluster).GetName() })
	add(EndpointType, messages(s.Endpoints), func(m proto.Message) string {
		return m.(*endpointv3.ClusterLoadAssignment).GetClusterName()
	})
	add(WorkloadType, messages(s.Workloads), func(m proto.Message) string { return m.(*workloadapi.Workload).GetUid() })
	if len(s.Routes) > 0 {
		add(RouteType, messages(s.Routes), func(m proto.Message) string { return m.(*routev3.RouteConfiguration).GetName() })
	}
	if len(s.Secrets) > 0 {
		add(SecretType, messages(s.Secrets), func(m proto.Message) string { return m.(*tlsv3.Secret).GetName() })
	}
	if len(errs) > 0 {
		if missing := unresolved(s); len(missing) > 0 {
			errs = append(errs, fmt.Errorf("types to link into waypoint/envoytypes: %s", strings.Join(missing, ", ")))
		}
	}
	return out, errors.Join(errs...)
}

// unresolved lists every Any type URL in s that is not linked in.
func unresolved(s *Snapshot) []string {
	seen := map[string]bool{}
	var walk func(m protoreflect.Message)
	walk = func(m protoreflect.Message) {
		if a, ok := m.Interface().(*anypb.Any); ok {
			inner, err := a.UnmarshalNew()
			if err != nil {
				seen[a.GetTypeUrl()] = true
				return
			}
			walk(inner.ProtoReflect())
			return
		}
		m.Range(func(fd protoreflect.FieldDescriptor, v protoreflect.Value) bool {
			if fd.Kind() != protoreflect.MessageKind {
				return true
			}
			switch {
			case fd.IsList():
				for i := 0; i < v.List().Len(); i++ {
					walk(v.List().Get(i).Message())
				}
			case fd.IsMap():
				if fd.MapValue().Kind() == protoreflect.MessageKind {
					v.Map().Range(func(_ protoreflect.MapKey, mv protoreflect.Value) bool {
						walk(mv.Message())
						return true
					})
				}
			default:
				walk(v.Message())
			}
			return true
		})
	}
	for _, l := range s.Listeners {
		walk(l.ProtoReflect())
	}
	for _, c := range s.Clusters {
		walk(c.ProtoReflect())
	}
	for _, e := range s.Endpoints {
		walk(e.ProtoReflect())
	}
	for _, r := range s.Routes {
		walk(r.ProtoReflect())
	}
	out := make([]string, 0, len(seen))
	for u := range seen {
		out = append(out, u)
	}
	slices.Sort(out)
	return out
}

func messages[M proto.Message](in []M) []proto.Message {
	out := make([]proto.Message, len(in))
	for i, m := range in {
		out[i] = m
	}
	return out
}

func renderList(msgs []proto.Message, name func(proto.Message) string) ([]byte, error) {
	msgs = slices.Clone(msgs)
	slices.SortStableFunc(msgs, func(a, b proto.Message) int { return strings.Compare(name(a), name(b)) })
	opts := protojson.MarshalOptions{UseProtoNames: true}
	var buf bytes.Buffer
	buf.WriteString("[")
	for i, m := range msgs {
		b, err := opts.Marshal(m)
		if err != nil {
			return nil, fmt.Errorf("resource %q: %w", name(m), err)
		}
		if i > 0 {
			buf.WriteString(",")
		}
		buf.Write(b)
	}
	buf.WriteString("]")
	var out bytes.Buffer
	if err := json.Indent(&out, compact(buf.Bytes()), "", "  "); err != nil {
		return nil, err
	}
	out.WriteString("\n")
	return out.Bytes(), nil
}

func compact(b []byte) []byte {
	var out bytes.Buffer
	if err := json.Compact(&out, b); err != nil {
		return b
	}
	return out.Bytes()
}

// Resources returns s as delta-ADS responses carry it: per type URL, each
// resource with its name, the version "golden" and its body.
func Resources(s *Snapshot) (map[string][]*discoveryv3.Resource, error) {
	out := map[string][]*discoveryv3.Resource{}
	var errs []error
	add := func(typeURL, name string, m proto.Message) {
		a, err := anypb.New(m)
		if err != nil {
			errs = append(errs, fmt.Errorf("%s %q: %w", typeURL, name, err))
			return
		}
		out[typeURL] = append(out[typeURL], &discoveryv3.Resource{Name: name, Version: "golden", Resource: a})
	}
	for _, m := range s.Listeners {
		add(ListenerType, m.GetName(), m)
	}
	for _, m := range s.Clusters {
		add(ClusterType, m.GetName(), m)
	}
	for _, m := range s.Endpoints {
		add(EndpointType, m.GetClusterName(), m)
	}
	for _, m := range s.Workloads {
		add(WorkloadType, m.GetUid(), m)
	}
	for _, m := range s.Routes {
		add(RouteType, m.GetName(), m)
	}
	for _, m := range s.Secrets {
		add(SecretType, m.GetName(), m)
	}
	return out, errors.Join(errs...)
}

// WithHTTPFilter returns a copy of s whose listener holds filter first in
// the HTTP connection manager of its filter chain named chain: how tests
// make istiod's configuration carry something the compiler must refuse.
func WithHTTPFilter(s *Snapshot, listener, chain string, filter *hcmv3.HttpFilter) (*Snapshot, error) {
	out := *s
	out.Listeners = slices.Clone(s.Listeners)
	for i, l := range out.Listeners {
		if l.GetName() != listener {
			continue
		}
		l = proto.Clone(l).(*listenerv3.Listener)
		for _, fc := range l.GetFilterChains() {
			if fc.GetName() != chain || len(fc.GetFilters()) == 0 {
				continue
			}
			last := fc.GetFilters()[len(fc.GetFilters())-1]
			hcm := &hcmv3.HttpConnectionManager{}
			if err := last.GetTypedConfig().UnmarshalTo(hcm); err != nil {
				return nil, fmt.Errorf("chain %s: %w", chain, err)
			}
			hcm.HttpFilters = append([]*hcmv3.HttpFilter{filter}, hcm.HttpFilters...)
			a, err := anypb.New(hcm)
			if err != nil {
				return nil, err
			}
			last.ConfigType = &listenerv3.Filter_TypedConfig{TypedConfig: a}
			out.Listeners[i] = l
			return &out, nil
		}
	}
	return nil, fmt.Errorf("no chain %s in listener %s", chain, listener)
}

// Write writes s into dir (created if needed), replacing its files.
func Write(dir string, s *Snapshot) error {
	files, err := Render(s)
	if err != nil {
		return err
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	for name, b := range files {
		if err := os.WriteFile(filepath.Join(dir, name), b, 0o644); err != nil {
			return err
		}
	}
	return nil
}
