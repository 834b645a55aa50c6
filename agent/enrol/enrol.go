// Package enrol decides, with Istio ambient's rules, whether a pod is
// enrolled in the mesh. It works on small copies of the Kubernetes objects
// so that the agent's reconciler and the CNI plugin share one decision
// without depending on client-go.
package enrol

import (
	"net/netip"
	"time"
)

// Labels and annotations, as Istio names them (istio.io/api label and
// annotation registries).
const (
	// DataplaneModeLabel enrols a namespace or a pod (value
	// DataplaneModeAmbient) or opts a pod out (value DataplaneModeNone).
	DataplaneModeLabel   = "istio.io/dataplane-mode"
	DataplaneModeAmbient = "ambient"
	DataplaneModeNone    = "none"

	// RedirectionAnnotation is set to RedirectionEnabled on a pod once its
	// traffic is captured; istiod marks such workloads HBONE-capable.
	RedirectionAnnotation = "ambient.istio.io/redirection"
	RedirectionEnabled    = "enabled"

	// SidecarStatusAnnotation is written by Istio's sidecar injector. A
	// pod with a sidecar is never captured by the node proxy as well.
	SidecarStatusAnnotation = "sidecar.istio.io/status"
)

// Namespace is what enrolment needs of a Kubernetes Namespace.
type Namespace struct {
	Name   string
	Labels map[string]string
}

// Phase is a pod's lifecycle phase as the API server reports it.
type Phase string

// Pod phases that matter here. A pod in a terminal phase has no sandbox:
// its last IP may already belong to another pod.
const (
	PhasePending   Phase = "Pending"
	PhaseRunning   Phase = "Running"
	PhaseSucceeded Phase = "Succeeded"
	PhaseFailed    Phase = "Failed"
)

// Pod is what the agent needs of a Kubernetes Pod.
type Pod struct {
	UID string
	// ResourceVersion orders two views of the same pod.
	ResourceVersion string
	Namespace       string
	Name            string
	NodeName        string
	Labels          map[string]string
	Annotations     map[string]string
	HostNetwork     bool
	Phase           Phase
	// IPs are status.podIPs (or status.podIP), in the API server's order.
	IPs []netip.Addr
	// Created is metadata.creationTimestamp: when two pods claim one
	// address on a node, the newer one holds it (IPAM hands an address
	// out again only after the older sandbox released it).
	Created time.Time
	// Deleting is set once metadata.deletionTimestamp is: the pod still
	// runs (and must stay captured) until its containers stop.
	Deleting bool
}

// Key is namespace/name, for logs and events.
func (p *Pod) Key() string { return p.Namespace + "/" + p.Name }

// Terminal reports whether the pod's sandbox is gone for good.
func (p *Pod) Terminal() bool { return p.Phase == PhaseSucceeded || p.Phase == PhaseFailed }

// Redirected reports whether the pod carries the enabled annotation.
func (p *Pod) Redirected() bool { return p.Annotations[RedirectionAnnotation] == RedirectionEnabled }

// Reason explains a Decision; the values appear in logs, events and the
// CNI plugin's answers.
type Reason string

// Reasons, in the order Decide tests them.
const (
	NotLabelled Reason = "NotLabelled"       // neither namespace nor pod asks for ambient
	HasSidecar  Reason = "HasSidecar"        // sidecar-injected pods keep their sidecar
	OptedOut    Reason = "OptedOut"          // pod label istio.io/dataplane-mode=none
	HostNetwork Reason = "HostNetwork"       // shares the node's namespace: nothing to capture
	Excluded    Reason = "ExcludedNamespace" // the installation never captures this namespace
	NamespaceOn Reason = "NamespaceLabel"
	PodOn       Reason = "PodLabel"
)

// Rules are the installation's additions to Istio's rules. The zero value
// adds nothing.
type Rules struct {
	// ExcludeNamespaces are never captured, whatever their labels (as
	// istio-cni's excludeNamespaces). Zero means none.
	ExcludeNamespaces []string
}

// Decide is the package-level Decide after the installation's exclusions.
func (r Rules) Decide(ns *Namespace, p *Pod) Decision {
	for _, x := range r.ExcludeNamespaces {
		if x == p.Namespace {
			return Decision{Reason: Excluded}
		}
	}
	return Decide(ns, p)
}

// Decision is the outcome of Decide.
type Decision struct {
	Enrolled bool
	Reason   Reason
}

// Decide applies Istio ambient's enrolment rules (istio/istio
// cni/pkg/util PodRedirectionEnabled): the namespace or the pod must carry
// istio.io/dataplane-mode=ambient; a pod with an injected sidecar, a pod
// labelled istio.io/dataplane-mode=none and a hostNetwork pod are never
// captured. A nil namespace means its labels are unknown; only the pod's
// own labels count then, so callers that must fail closed have to fetch
// the namespace first.
func Decide(ns *Namespace, p *Pod) Decision {
	var nsLabels map[string]string
	if ns != nil {
		nsLabels = ns.Labels
	}
	podMode := p.Labels[DataplaneModeLabel]
	reason := NamespaceOn
	switch {
	case podMode == DataplaneModeAmbient:
		reason = PodOn
	case nsLabels[DataplaneModeLabel] == DataplaneModeAmbient:
	default:
		return Decision{Reason: NotLabelled}
	}
	if _, ok := p.Annotations[SidecarStatusAnnotation]; ok {
		return Decision{Reason: HasSidecar}
	}
	if podMode == DataplaneModeNone {
		return Decision{Reason: OptedOut}
	}
	if p.HostNetwork {
		return Decision{Reason: HostNetwork}
	}
	return Decision{Enrolled: true, Reason: reason}
}
