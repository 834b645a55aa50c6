// Package config compiles the configuration istiod sends a waypoint
// (LDS, CDS, EDS) into an immutable, validated model for amber-waypoint's
// data path, against a strict allow-list: every field the compiler does
// not understand is a Problem naming its path, and what it configured
// fails closed (docs/waypoint.md).
package config

import (
	"crypto/tls"
	"errors"
	"fmt"
	"slices"
	"strings"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	endpointv3 "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
)

// Type URLs of the resources Compile takes, for Problem.TypeURL.
const (
	ListenerType = "type.googleapis.com/envoy.config.listener.v3.Listener"
	ClusterType  = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
	EndpointType = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
	// RouteType is RDS: a router's listeners take their routes from it.
	RouteType = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
	// SecretType is SDS over ADS: the Kubernetes Secrets of a router's
	// TLS listeners.
	SecretType = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"
)

// Names istiod gives a waypoint's fixed resources
// (pilot/pkg/networking/core/waypoint.go).
const (
	ConnectTerminate = "connect_terminate"
	MainInternal     = "main_internal"
	ConnectOriginate = "connect_originate"
	Encap            = "encap"
	// InnerConnectOriginate and OuterConnectOriginate are double HBONE's.
	InnerConnectOriginate = "inner_connect_originate"
	OuterConnectOriginate = "outer_connect_originate"
)

// Resources is the waypoint's configuration as received: every resource
// of each type (a state of the world, not a delta).
type Resources struct {
	Listeners []*listenerv3.Listener
	Clusters  []*clusterv3.Cluster
	Endpoints []*endpointv3.ClusterLoadAssignment
	// Routes are RDS (routers only).
	Routes []*routev3.RouteConfiguration
	// Secrets are SDS (routers with TLS listeners only).
	Secrets []*tlsv3.Secret
	// Router compiles an ingress gateway's configuration (node type
	// router: socket listeners, RDS, outbound clusters) instead of a
	// waypoint's.
	Router bool
}

// Config is one compiled configuration, immutable once Compile returns.
// It is complete even when Problems is not empty: what the problems touch
// refuses traffic (a Chain or Cluster with Err set, or a nil Terminate or
// Dispatch, which refuses everything).
type Config struct {
	// Terminate is connect_terminate: the HBONE listener on 15008. Nil
	// when it is missing or failed.
	Terminate *Terminate
	// Dispatch is main_internal: from the CONNECT's original destination
	// to a filter chain. Nil when it is missing or failed.
	Dispatch *Dispatch
	// Originate is connect_originate (listener and cluster): HBONE to the
	// chosen endpoint. Nil when missing or failed.
	Originate *Originate
	// Router is true for an ingress gateway's configuration: Gateways
	// instead of Terminate and Dispatch.
	Router bool
	// Gateways are a router's socket listeners by name (0.0.0.0_8080);
	// each has a Chain, whose Err says why it refuses requests.
	Gateways map[string]*Gateway
	// Clusters are the upstream service clusters (inbound-vip|… and
	// outbound|…) by name, with their endpoints.
	Clusters map[string]*Cluster
	// Problems lists what was refused, each naming its resource and field.
	Problems []*Problem
	// Degraded lists the telemetry-only settings accepted but not honoured.
	Degraded []Degradation
}

// Problem is one refused part of the configuration; its text goes into
// the NACK of its type.
type Problem struct {
	TypeURL  string
	Resource string
	Err      error
}

func (p *Problem) Error() string {
	return fmt.Sprintf("%s %s: %v", kindOf(p.TypeURL), p.Resource, p.Err)
}

func (p *Problem) Unwrap() error { return p.Err }

func kindOf(typeURL string) string {
	switch typeURL {
	case ListenerType:
		return "listener"
	case ClusterType:
		return "cluster"
	case EndpointType:
		return "endpoints"
	case RouteType:
		return "route configuration"
	case SecretType:
		return "secret"
	}
	return typeURL
}

// Err joins the problems of one type URL ("" for all), nil when there are
// none: the NACK's error_detail for that type.
func (c *Config) Err(typeURL string) error {
	var errs []error
	for _, p := range c.Problems {
		if typeURL == "" || p.TypeURL == typeURL {
			errs = append(errs, p)
		}
	}
	return errors.Join(errs...)
}

// Compile compiles r. It never fails as a whole: see Config.
func Compile(r Resources) *Config {
	c := &Config{Clusters: map[string]*Cluster{}, Router: r.Router}
	b := &builder{cfg: c, router: r.Router}
	if r.Router {
		c.Gateways = map[string]*Gateway{}
		b.routerListeners(r.Listeners, r.Routes, r.Secrets)
	} else {
		b.listeners(r.Listeners)
	}
	b.clusters(r.Clusters)
	b.endpoints(r.Endpoints)
	b.link()
	slices.SortFunc(c.Problems, func(a, b *Problem) int {
		if x := strings.Compare(a.TypeURL, b.TypeURL); x != 0 {
			return x
		}
		return strings.Compare(a.Resource, b.Resource)
	})
	return c
}

// validatable is a generated message with protoc-gen-validate rules.
type validatable interface {
	protoMessage
	ValidateAll() error
}

// builder collects problems while compiling.
type builder struct {
	cfg                 *Config
	router              bool
	secrets             func(name string) (*tls.Certificate, error)
	originate           *Originate
	originateListenerOK bool
}

func (b *builder) problem(typeURL, resource string, err error) {
	b.cfg.Problems = append(b.cfg.Problems, &Problem{TypeURL: typeURL, Resource: resource, Err: err})
}

// checkResource runs proto validation and the allow-list over one
// resource; false means it must not be compiled.
func (b *builder) checkResource(typeURL, name string, m validatable) bool {
	if err := m.ValidateAll(); err != nil {
		b.problem(typeURL, name, fmt.Errorf("invalid: %w", err))
		return false
	}
	var ch checker
	ch.check("", m)
	for _, d := range ch.degraded {
		b.cfg.Degraded = append(b.cfg.Degraded, Degradation{Path: kindOf(typeURL) + " " + name + ": " + d.Path, Reason: d.Reason})
	}
	for _, err := range ch.problems {
		b.problem(typeURL, name, err)
	}
	return len(ch.problems) == 0
}
