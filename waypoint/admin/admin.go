// Package admin serves the parts of Envoy's admin API that istioctl reads
// from a waypoint: /config_dump (envoy.admin.v3.ConfigDump, what
// `istioctl proxy-config listeners|routes|clusters|secret|bootstrap`
// parse) and /clusters (envoy.admin.v3.Clusters, what `istioctl
// proxy-config endpoints` parses), built from the resources amber-waypoint
// last received and what it made of them.
package admin

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"net/http"
	"strings"
	"time"

	adminv3 "github.com/envoyproxy/go-control-plane/envoy/admin/v3"
	bootstrapv3 "github.com/envoyproxy/go-control-plane/envoy/config/bootstrap/v3"
	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	endpointv3 "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	hcmv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/reflect/protoregistry"
	"google.golang.org/protobuf/types/known/anypb"
	"google.golang.org/protobuf/types/known/emptypb"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/amber-mesh/amber/waypoint/config"
	"github.com/amber-mesh/amber/waypoint/discovery"
	_ "github.com/amber-mesh/amber/waypoint/envoytypes" // render every Any istiod sends in full
)

// Secret names pilot-agent's SDS gives the workload certificate and the
// mesh roots (Envoy's config_dump lists them under these names).
const (
	SecretDefault = "default"
	SecretRoots   = "ROOTCA"
)

// redacted is what Envoy's config_dump shows instead of a private key.
const redacted = "[redacted]"

// Source is what the endpoints are built from.
type Source struct {
	// Set holds the listeners, clusters and endpoints. Required.
	Set *discovery.Set
	// Node is the xDS node, shown as the bootstrap's node. Nil shows none.
	Node *corev3.Node
	// Started is when the waypoint started (the bootstrap's
	// last_updated). Zero shows none.
	Started time.Time
	// Certificate returns the waypoint's certificate, or an error when it
	// has none (yet). Nil lists no secrets.
	Certificate func(context.Context) (*tls.Certificate, error)
	// RootPEM are the mesh roots, listed as ROOTCA. Nil lists none.
	RootPEM []byte
}

// Handler serves /config_dump and /clusters.
func Handler(src Source) http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /config_dump", src.serveConfigDump)
	mux.HandleFunc("GET /clusters", src.serveClusters)
	return mux
}

// marshal renders as Envoy's admin does: proto field names, every Any
// expanded. An Any of a type this binary does not link (something amber
// refused) is shown with its type URL only, as istioctl itself reads
// unknown types.
var marshal = protojson.MarshalOptions{UseProtoNames: true, Resolver: LenientResolver}

// LenientResolver resolves an Any of a type this binary does not link to
// an empty message, as istioctl's config dump reader does
// (istioctl/pkg/util/configdump wrapper.go): for protojson, to marshal
// and to read dumps.
var LenientResolver = lenient{protoregistry.GlobalTypes}

type lenient struct{ *protoregistry.Types }

func (r lenient) FindMessageByURL(url string) (protoreflect.MessageType, error) {
	if mt, err := r.Types.FindMessageByURL(url); err == nil {
		return mt, nil
	}
	return (&emptypb.Empty{}).ProtoReflect().Type(), nil
}

// serveConfigDump serves /config_dump with Envoy's query parameters
// include_eds (endpoints too) and mask (a field mask applied to each
// section, e.g. mask=dynamic_listeners,static_listeners as istioctl asks).
func (src Source) serveConfigDump(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	for k := range q {
		switch k {
		case "include_eds", "mask":
		default:
			http.Error(w, fmt.Sprintf("config_dump: parameter %q is not supported by amber-waypoint (include_eds and mask are)", k), http.StatusBadRequest)
			return
		}
	}
	var mask [][]string
	if q.Has("mask") {
		for _, p := range strings.Split(q.Get("mask"), ",") {
			if p = strings.TrimSpace(p); p == "" {
				http.Error(w, "config_dump: mask: empty path", http.StatusBadRequest)
				return
			}
			mask = append(mask, strings.Split(p, "."))
		}
	}
	ctx, cancel := context.WithTimeout(r.Context(), 2*time.Second)
	defer cancel()
	dump, err := src.ConfigDump(ctx, q.Has("include_eds"))
	if err == nil && mask != nil {
		err = applyMask(dump, mask)
	}
	if err != nil {
		http.Error(w, "config_dump: "+err.Error(), http.StatusInternalServerError)
		return
	}
	writeProto(w, dump)
}

// writeProto writes m as indented JSON. protojson varies its white space
// on purpose; encoding/json's indentation makes the bytes stable, so that
// two dumps of one configuration can be diffed.
func writeProto(w http.ResponseWriter, m proto.Message) {
	b, err := marshal.Marshal(m)
	var out bytes.Buffer
	if err == nil {
		err = json.Indent(&out, b, "", "  ")
	}
	if err != nil {
		http.Error(w, err.Error(), http.StatusInternalServerError)
		return
	}
	w.Header().Set("Content-Type", "application/json")
	out.WriteByte('\n')
	w.Write(out.Bytes())
}

// ConfigDump builds the dump: bootstrap (the node), clusters, endpoints
// (with includeEDS), listeners, routes (the route configurations inline
// in the listeners' connection managers, which Envoy lists as static) and
// secrets, in Envoy's order. A resource the compiler refused a part of is
// listed as active (amber installed it with that part refusing traffic)
// with client_status NACKED and the problems in error_state.
func (src Source) ConfigDump(ctx context.Context, includeEDS bool) (*adminv3.ConfigDump, error) {
	snap := src.Set.Snapshot()
	problems := problemsOf(snap.Config)
	nack := func(typeURL, name string, at time.Time) (*adminv3.UpdateFailureState, adminv3.ClientResourceStatus) {
		if d := problems[typeURL+"\x00"+name]; d != "" {
			return &adminv3.UpdateFailureState{Details: d, LastUpdateAttempt: timestamppb.New(at)}, adminv3.ClientResourceStatus_NACKED
		}
		return nil, adminv3.ClientResourceStatus_ACKED
	}

	var sections []proto.Message
	bs := &adminv3.BootstrapConfigDump{Bootstrap: &bootstrapv3.Bootstrap{Node: src.Node}}
	if !src.Started.IsZero() {
		bs.LastUpdated = timestamppb.New(src.Started)
	}
	sections = append(sections, bs)

	cd := &adminv3.ClustersConfigDump{}
	for _, c := range snap.Clusters {
		a, err := anypb.New(c.Message)
		if err != nil {
			return nil, err
		}
		es, st := nack(config.ClusterType, c.Message.GetName(), c.Updated)
		cd.DynamicActiveClusters = append(cd.DynamicActiveClusters, &adminv3.ClustersConfigDump_DynamicCluster{
			VersionInfo: c.Version, Cluster: a, LastUpdated: timestamppb.New(c.Updated), ErrorState: es, ClientStatus: st,
		})
	}
	sections = append(sections, cd)

	if includeEDS {
		ed := &adminv3.EndpointsConfigDump{}
		for _, e := range snap.Endpoints {
			a, err := anypb.New(e.Message)
			if err != nil {
				return nil, err
			}
			es, st := nack(config.EndpointType, e.Message.GetClusterName(), e.Updated)
			ed.DynamicEndpointConfigs = append(ed.DynamicEndpointConfigs, &adminv3.EndpointsConfigDump_DynamicEndpointConfig{
				VersionInfo: e.Version, EndpointConfig: a, LastUpdated: timestamppb.New(e.Updated), ErrorState: es, ClientStatus: st,
			})
		}
		sections = append(sections, ed)
	}

	ld := &adminv3.ListenersConfigDump{}
	rd := &adminv3.RoutesConfigDump{}
	for _, l := range snap.Listeners {
		a, err := anypb.New(l.Message)
		if err != nil {
			return nil, err
		}
		es, st := nack(config.ListenerType, l.Message.GetName(), l.Updated)
		ld.DynamicListeners = append(ld.DynamicListeners, &adminv3.ListenersConfigDump_DynamicListener{
			Name:         l.Message.GetName(),
			ActiveState:  &adminv3.ListenersConfigDump_DynamicListenerState{VersionInfo: l.Version, Listener: a, LastUpdated: timestamppb.New(l.Updated)},
			ErrorState:   es,
			ClientStatus: st,
		})
		for _, rc := range inlineRoutes(l.Message) {
			ra, err := anypb.New(rc)
			if err != nil {
				return nil, err
			}
			rd.StaticRouteConfigs = append(rd.StaticRouteConfigs, &adminv3.RoutesConfigDump_StaticRouteConfig{RouteConfig: ra, LastUpdated: timestamppb.New(l.Updated)})
		}
	}
	for _, r := range snap.Routes {
		// A router's RDS.
		ra, err := anypb.New(r.Message)
		if err != nil {
			return nil, err
		}
		es, st := nack(config.RouteType, r.Message.GetName(), r.Updated)
		rd.DynamicRouteConfigs = append(rd.DynamicRouteConfigs, &adminv3.RoutesConfigDump_DynamicRouteConfig{
			VersionInfo: r.Version, RouteConfig: ra, LastUpdated: timestamppb.New(r.Updated), ErrorState: es, ClientStatus: st,
		})
	}
	sections = append(sections, ld, rd)

	sd, err := src.secrets(ctx)
	if err != nil {
		return nil, err
	}
	sections = append(sections, sd)

	dump := &adminv3.ConfigDump{}
	for _, s := range sections {
		a, err := anypb.New(s)
		if err != nil {
			return nil, err
		}
		dump.Configs = append(dump.Configs, a)
	}
	return dump, nil
}

// problemsOf joins the compiler's problems per resource.
func problemsOf(c *config.Config) map[string]string {
	out := map[string]string{}
	if c == nil {
		return out
	}
	for _, p := range c.Problems {
		k := p.TypeURL + "\x00" + p.Resource
		if out[k] != "" {
			out[k] += "; "
		}
		out[k] += p.Err.Error()
	}
	return out
}

// inlineRoutes are the route configurations inline in l's HTTP connection
// managers, in filter chain order. Envoy lists each as a static route
// configuration, which is how `istioctl proxy-config routes` shows a
// waypoint's routes (istiod sends waypoints no RDS).
func inlineRoutes(l *listenerv3.Listener) []proto.Message {
	var out []proto.Message
	for _, fc := range l.GetFilterChains() {
		for _, f := range fc.GetFilters() {
			hcm := &hcmv3.HttpConnectionManager{}
			if f.GetTypedConfig().MessageIs(hcm) && f.GetTypedConfig().UnmarshalTo(hcm) == nil && hcm.GetRouteConfig() != nil {
				out = append(out, hcm.GetRouteConfig())
			}
		}
	}
	return out
}

// secrets lists the waypoint's certificate (private key redacted, as
// Envoy does) and the mesh roots, under the names pilot-agent's SDS uses.
func (src Source) secrets(ctx context.Context) (*adminv3.SecretsConfigDump, error) {
	sd := &adminv3.SecretsConfigDump{}
	if src.Certificate != nil {
		if c, err := src.Certificate(ctx); err == nil {
			var chain []byte
			for _, der := range c.Certificate {
				chain = append(chain, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})...)
			}
			s, err := anypb.New(&tlsv3.Secret{Name: SecretDefault, Type: &tlsv3.Secret_TlsCertificate{TlsCertificate: &tlsv3.TlsCertificate{
				CertificateChain: &corev3.DataSource{Specifier: &corev3.DataSource_InlineBytes{InlineBytes: chain}},
				PrivateKey:       &corev3.DataSource{Specifier: &corev3.DataSource_InlineString{InlineString: redacted}},
			}}})
			if err != nil {
				return nil, err
			}
			var at *timestamppb.Timestamp
			if c.Leaf != nil {
				at = timestamppb.New(c.Leaf.NotBefore)
			}
			sd.DynamicActiveSecrets = append(sd.DynamicActiveSecrets, &adminv3.SecretsConfigDump_DynamicSecret{Name: SecretDefault, LastUpdated: at, Secret: s})
		}
	}
	if len(src.RootPEM) > 0 {
		s, err := anypb.New(&tlsv3.Secret{Name: SecretRoots, Type: &tlsv3.Secret_ValidationContext{ValidationContext: &tlsv3.CertificateValidationContext{
			TrustedCa: &corev3.DataSource{Specifier: &corev3.DataSource_InlineBytes{InlineBytes: src.RootPEM}},
		}}})
		if err != nil {
			return nil, err
		}
		sd.DynamicActiveSecrets = append(sd.DynamicActiveSecrets, &adminv3.SecretsConfigDump_DynamicSecret{Name: SecretRoots, Secret: s})
	}
	return sd, nil
}

// applyMask trims each section of dump to the field mask paths, as
// Envoy's config_dump?mask= does (FieldMaskUtil::TrimMessage on each
// section; a section none of whose fields is named becomes empty).
func applyMask(dump *adminv3.ConfigDump, paths [][]string) error {
	for i, a := range dump.Configs {
		m, err := a.UnmarshalNew()
		if err != nil {
			return err
		}
		trim(m.ProtoReflect(), paths)
		if dump.Configs[i], err = anypb.New(m); err != nil {
			return err
		}
	}
	return nil
}

// trim clears every field of m no path names; a field named with a longer
// path keeps only what the rest of the path names, in each element of a
// repeated field.
func trim(m protoreflect.Message, paths [][]string) {
	m.Range(func(fd protoreflect.FieldDescriptor, v protoreflect.Value) bool {
		var sub [][]string
		whole := false
		for _, p := range paths {
			if p[0] != string(fd.Name()) {
				continue
			}
			if len(p) == 1 {
				whole = true
				break
			}
			sub = append(sub, p[1:])
		}
		switch {
		case whole:
		case len(sub) == 0 || fd.Message() == nil || fd.IsMap():
			m.Clear(fd)
		case fd.IsList():
			for i := 0; i < v.List().Len(); i++ {
				trim(v.List().Get(i).Message(), sub)
			}
		default:
			trim(v.Message(), sub)
		}
		return true
	})
}

// serveClusters serves /clusters: every cluster with its hosts (from EDS,
// or the cluster's own load assignment), as JSON with ?format=json
// (envoy.admin.v3.Clusters) and in Envoy's text lines otherwise.
func (src Source) serveClusters(w http.ResponseWriter, r *http.Request) {
	cs := src.Clusters()
	if r.URL.Query().Get("format") == "json" {
		writeProto(w, cs)
		return
	}
	w.Header().Set("Content-Type", "text/plain; charset=UTF-8")
	var b strings.Builder
	for _, c := range cs.GetClusterStatuses() {
		fmt.Fprintf(&b, "%s::observability_name::%s\n", c.GetName(), c.GetName())
		fmt.Fprintf(&b, "%s::added_via_api::%t\n", c.GetName(), c.GetAddedViaApi())
		for _, h := range c.GetHostStatuses() {
			addr := hostAddress(h.GetAddress())
			health := "healthy"
			switch h.GetHealthStatus().GetEdsHealthStatus() {
			case corev3.HealthStatus_UNHEALTHY:
				health = "/failed_eds_health"
			case corev3.HealthStatus_DEGRADED:
				health = "/degraded_eds_health"
			}
			fmt.Fprintf(&b, "%s::%s::health_flags::%s\n", c.GetName(), addr, health)
			fmt.Fprintf(&b, "%s::%s::weight::%d\n", c.GetName(), addr, h.GetWeight())
		}
	}
	w.Write([]byte(b.String()))
}

// edsHealth is the EDS health Envoy reports for a host: unknown counts as
// healthy, draining and timeout as unhealthy (source/server/admin
// clusters_handler.cc reads the host's FAILED_EDS_HEALTH and
// DEGRADED_EDS_HEALTH flags).
func edsHealth(s corev3.HealthStatus) corev3.HealthStatus {
	switch s {
	case corev3.HealthStatus_UNKNOWN, corev3.HealthStatus_HEALTHY:
		return corev3.HealthStatus_HEALTHY
	case corev3.HealthStatus_DEGRADED:
		return corev3.HealthStatus_DEGRADED
	}
	return corev3.HealthStatus_UNHEALTHY
}

func hostAddress(a *corev3.Address) string {
	switch {
	case a.GetSocketAddress() != nil:
		sa := a.GetSocketAddress()
		return fmt.Sprintf("%s:%d", sa.GetAddress(), sa.GetPortValue())
	case a.GetEnvoyInternalAddress() != nil:
		ia := a.GetEnvoyInternalAddress()
		return "envoy://" + ia.GetServerListenerName() + "/" + ia.GetEndpointId()
	}
	return "unknown"
}

// Clusters is /clusters' content: each cluster and its hosts.
func (src Source) Clusters() *adminv3.Clusters {
	snap := src.Set.Snapshot()
	eds := map[string]*endpointv3.ClusterLoadAssignment{}
	for _, e := range snap.Endpoints {
		eds[e.Message.GetClusterName()] = e.Message
	}
	out := &adminv3.Clusters{}
	for _, c := range snap.Clusters {
		la := c.Message.GetLoadAssignment()
		if c.Message.GetType() == clusterv3.Cluster_EDS {
			name := c.Message.GetName()
			if sn := c.Message.GetEdsClusterConfig().GetServiceName(); sn != "" {
				name = sn
			}
			la = eds[name]
		}
		st := &adminv3.ClusterStatus{Name: c.Message.GetName(), AddedViaApi: true}
		for _, lle := range la.GetEndpoints() {
			for _, le := range lle.GetLbEndpoints() {
				weight := uint32(1)
				if w := le.GetLoadBalancingWeight(); w != nil {
					weight = w.GetValue()
				}
				st.HostStatuses = append(st.HostStatuses, &adminv3.HostStatus{
					Address:      le.GetEndpoint().GetAddress(),
					HealthStatus: &adminv3.HostHealthStatus{EdsHealthStatus: edsHealth(le.GetHealthStatus())},
					Weight:       weight,
					Hostname:     le.GetEndpoint().GetHostname(),
					Priority:     lle.GetPriority(),
					Locality:     lle.GetLocality(),
				})
			}
		}
		out.ClusterStatuses = append(out.ClusterStatuses, st)
	}
	return out
}
