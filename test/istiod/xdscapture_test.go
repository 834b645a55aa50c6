package istiod_test

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"maps"
	"slices"
	"strings"
	"time"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	endpointv3 "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	hcmv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/protobuf/proto"

	"github.com/amber-mesh/amber/test/waypointgolden"
	"github.com/amber-mesh/amber/xds/workloadapi"
)

// capture opens one delta-ADS stream to istiod as the waypoint node and
// returns the complete configuration it is sent on connect, subscribing as
// an Envoy waypoint does: CDS, LDS and WDS as wildcards, then EDS for the
// EDS clusters CDS named. Every response is ACKed.
func capture(ctx context.Context, addr, serverName string, rootPEM []byte, token string, n *corev3.Node) (*waypointgolden.Snapshot, error) {
	return captureAs(ctx, addr, serverName, rootPEM, token, n, false)
}

// captureAs is capture for a waypoint, or with router for an Envoy
// gateway: CDS and LDS as wildcards, no WDS, RDS for the route
// configurations the listeners name, EDS for every EDS cluster.
func captureAs(ctx context.Context, addr, serverName string, rootPEM []byte, token string, n *corev3.Node, router bool) (*waypointgolden.Snapshot, error) {
	roots := x509.NewCertPool()
	if !roots.AppendCertsFromPEM(rootPEM) {
		return nil, fmt.Errorf("no root certificate in %q", rootPEM)
	}
	conn, err := grpc.NewClient(addr,
		grpc.WithTransportCredentials(credentials.NewTLS(&tls.Config{RootCAs: roots, ServerName: serverName, MinVersion: tls.VersionTLS12})),
		grpc.WithPerRPCCredentials(bearer(token)))
	if err != nil {
		return nil, err
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(ctx, 20*time.Second)
	defer cancel()
	stream, err := discoveryv3.NewAggregatedDiscoveryServiceClient(conn).DeltaAggregatedResources(ctx, grpc.MaxCallRecvMsgSize(64<<20))
	if err != nil {
		return nil, fmt.Errorf("open delta ADS: %w", err)
	}
	wildcards := []string{waypointgolden.ClusterType, waypointgolden.ListenerType, waypointgolden.WorkloadType}
	if router {
		wildcards = wildcards[:2]
	}
	for _, typeURL := range wildcards {
		if err := stream.Send(&discoveryv3.DeltaDiscoveryRequest{Node: n, TypeUrl: typeURL}); err != nil {
			return nil, fmt.Errorf("subscribe %s: %w", typeURL, err)
		}
	}

	got := map[string]map[string][]byte{} // type → name → marshalled resource
	answered := map[string]bool{}
	var edsNames, rdsNames, sdsNames []string
	edsPending, rdsPending, sdsPending := true, router, false
	answered[waypointgolden.WorkloadType] = router
	for !(answered[waypointgolden.ClusterType] && answered[waypointgolden.ListenerType] &&
		answered[waypointgolden.WorkloadType] && !edsPending && !rdsPending && !sdsPending) {
		resp, err := stream.Recv()
		if err != nil {
			return nil, fmt.Errorf("receive (have %v): %w", slices.Sorted(maps.Keys(answered)), err)
		}
		t := resp.GetTypeUrl()
		if got[t] == nil {
			got[t] = map[string][]byte{}
		}
		for _, name := range resp.GetRemovedResources() {
			delete(got[t], name)
		}
		for _, r := range resp.GetResources() {
			if r.GetResource().GetTypeUrl() != t {
				return nil, fmt.Errorf("%s response holds %q of type %s", t, r.GetName(), r.GetResource().GetTypeUrl())
			}
			got[t][r.GetName()] = r.GetResource().GetValue()
		}
		answered[t] = true
		if err := stream.Send(&discoveryv3.DeltaDiscoveryRequest{TypeUrl: t, ResponseNonce: resp.GetNonce()}); err != nil {
			return nil, fmt.Errorf("ack %s: %w", t, err)
		}
		if t == waypointgolden.RouteType || t == waypointgolden.ClusterType {
			names, err := edsClusters(got[waypointgolden.ClusterType])
			if err != nil {
				return nil, err
			}
			if router {
				// amber's gateway asks for the endpoints of the clusters
				// its routes name only (CDS holds every Service).
				refs, err := routeClusters(got[waypointgolden.RouteType])
				if err != nil {
					return nil, err
				}
				names = slices.DeleteFunc(names, func(n string) bool { return !slices.Contains(refs, n) })
			}
			if !slices.Equal(names, edsNames) {
				// Envoy asks for the endpoints of exactly its EDS clusters.
				sub, unsub := diff(names, edsNames)
				edsNames = names
				edsPending = len(sub) > 0
				if err := stream.Send(&discoveryv3.DeltaDiscoveryRequest{
					TypeUrl: waypointgolden.EndpointType, ResourceNamesSubscribe: sub, ResourceNamesUnsubscribe: unsub,
				}); err != nil {
					return nil, fmt.Errorf("subscribe endpoints: %w", err)
				}
			} else if len(names) == 0 && (!router || answered[waypointgolden.RouteType] || len(rdsNames) == 0) {
				edsPending = false
			}
		}
		switch t {
		case waypointgolden.EndpointType:
			edsPending = false
			for _, n := range edsNames {
				if _, ok := got[t][n]; !ok {
					edsPending = true
				}
			}
		case waypointgolden.ListenerType:
			if !router {
				break
			}
			secrets, err := sdsSecrets(got[t])
			if err != nil {
				return nil, err
			}
			if !slices.Equal(secrets, sdsNames) {
				sub, unsub := diff(secrets, sdsNames)
				sdsNames = secrets
				sdsPending = len(sub) > 0
				if err := stream.Send(&discoveryv3.DeltaDiscoveryRequest{
					TypeUrl: waypointgolden.SecretType, ResourceNamesSubscribe: sub, ResourceNamesUnsubscribe: unsub,
				}); err != nil {
					return nil, fmt.Errorf("subscribe secrets: %w", err)
				}
			}
			names, err := rdsRoutes(got[t])
			if err != nil {
				return nil, err
			}
			if !slices.Equal(names, rdsNames) {
				sub, unsub := diff(names, rdsNames)
				rdsNames = names
				rdsPending = len(sub) > 0
				if err := stream.Send(&discoveryv3.DeltaDiscoveryRequest{
					TypeUrl: waypointgolden.RouteType, ResourceNamesSubscribe: sub, ResourceNamesUnsubscribe: unsub,
				}); err != nil {
					return nil, fmt.Errorf("subscribe routes: %w", err)
				}
			} else if len(names) == 0 {
				rdsPending = false
			}
		case waypointgolden.SecretType:
			sdsPending = false
			for _, n := range sdsNames {
				if _, ok := got[t][n]; !ok {
					sdsPending = true
				}
			}
		case waypointgolden.RouteType:
			rdsPending = false
			for _, n := range rdsNames {
				if _, ok := got[t][n]; !ok {
					rdsPending = true
				}
			}
		}
	}
	return decodeSnapshot(got)
}

// edsClusters names the clusters whose endpoints come from EDS.
func edsClusters(raw map[string][]byte) ([]string, error) {
	var names []string
	for name, b := range raw {
		c := &clusterv3.Cluster{}
		if err := proto.Unmarshal(b, c); err != nil {
			return nil, fmt.Errorf("cluster %q: %w", name, err)
		}
		if c.GetType() == clusterv3.Cluster_EDS {
			if sn := c.GetEdsClusterConfig().GetServiceName(); sn != "" {
				name = sn
			}
			names = append(names, name)
		}
	}
	slices.Sort(names)
	return names, nil
}

// routeClusters names the clusters the route configurations route to.
func routeClusters(raw map[string][]byte) ([]string, error) {
	var names []string
	for name, b := range raw {
		rc := &routev3.RouteConfiguration{}
		if err := proto.Unmarshal(b, rc); err != nil {
			return nil, fmt.Errorf("route configuration %q: %w", name, err)
		}
		for _, vh := range rc.GetVirtualHosts() {
			for _, r := range vh.GetRoutes() {
				if c := r.GetRoute().GetCluster(); c != "" {
					names = append(names, c)
				}
				for _, wc := range r.GetRoute().GetWeightedClusters().GetClusters() {
					names = append(names, wc.GetName())
				}
			}
		}
	}
	slices.Sort(names)
	return slices.Compact(names), nil
}

// sdsSecrets names the secrets the listeners' TLS contexts take from SDS
// over ADS (kubernetes:// and kubernetes-gateway:// names; "default" and
// "ROOTCA" are pilot-agent's, not istiod's).
func sdsSecrets(raw map[string][]byte) ([]string, error) {
	var names []string
	for name, b := range raw {
		l := &listenerv3.Listener{}
		if err := proto.Unmarshal(b, l); err != nil {
			return nil, fmt.Errorf("listener %q: %w", name, err)
		}
		for _, fc := range l.GetFilterChains() {
			d := &tlsv3.DownstreamTlsContext{}
			if ts := fc.GetTransportSocket(); ts == nil || !ts.GetTypedConfig().MessageIs(d) || ts.GetTypedConfig().UnmarshalTo(d) != nil {
				continue
			}
			for _, sc := range d.GetCommonTlsContext().GetTlsCertificateSdsSecretConfigs() {
				if n := sc.GetName(); strings.HasPrefix(n, "kubernetes") && !slices.Contains(names, n) {
					names = append(names, n)
				}
			}
		}
	}
	slices.Sort(names)
	return names, nil
}

// rdsRoutes names the route configurations the listeners' HTTP
// connection managers take from RDS.
func rdsRoutes(raw map[string][]byte) ([]string, error) {
	var names []string
	for name, b := range raw {
		l := &listenerv3.Listener{}
		if err := proto.Unmarshal(b, l); err != nil {
			return nil, fmt.Errorf("listener %q: %w", name, err)
		}
		for _, fc := range l.GetFilterChains() {
			for _, f := range fc.GetFilters() {
				h := &hcmv3.HttpConnectionManager{}
				if f.GetTypedConfig().MessageIs(h) {
					if err := f.GetTypedConfig().UnmarshalTo(h); err != nil {
						return nil, fmt.Errorf("listener %q: %w", name, err)
					}
					if rn := h.GetRds().GetRouteConfigName(); rn != "" && !slices.Contains(names, rn) {
						names = append(names, rn)
					}
				}
			}
		}
	}
	slices.Sort(names)
	return names, nil
}

func diff(now, before []string) (added, removed []string) {
	for _, n := range now {
		if !slices.Contains(before, n) {
			added = append(added, n)
		}
	}
	for _, n := range before {
		if !slices.Contains(now, n) {
			removed = append(removed, n)
		}
	}
	return added, removed
}

func decodeSnapshot(got map[string]map[string][]byte) (*waypointgolden.Snapshot, error) {
	s := &waypointgolden.Snapshot{}
	var err error
	if s.Listeners, err = decodeAll[*listenerv3.Listener](got[waypointgolden.ListenerType]); err != nil {
		return nil, err
	}
	if s.Clusters, err = decodeAll[*clusterv3.Cluster](got[waypointgolden.ClusterType]); err != nil {
		return nil, err
	}
	if s.Endpoints, err = decodeAll[*endpointv3.ClusterLoadAssignment](got[waypointgolden.EndpointType]); err != nil {
		return nil, err
	}
	if s.Workloads, err = decodeAll[*workloadapi.Workload](got[waypointgolden.WorkloadType]); err != nil {
		return nil, err
	}
	if s.Routes, err = decodeAll[*routev3.RouteConfiguration](got[waypointgolden.RouteType]); err != nil {
		return nil, err
	}
	if s.Secrets, err = decodeAll[*tlsv3.Secret](got[waypointgolden.SecretType]); err != nil {
		return nil, err
	}
	return s, nil
}

func decodeAll[M proto.Message](raw map[string][]byte) ([]M, error) {
	var out []M
	for _, name := range slices.Sorted(maps.Keys(raw)) {
		var zero M
		m := zero.ProtoReflect().Type().New().Interface().(M)
		if err := proto.Unmarshal(raw[name], m); err != nil {
			return nil, fmt.Errorf("%T %q: %w", m, name, err)
		}
		out = append(out, m)
	}
	return out, nil
}
