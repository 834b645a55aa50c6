package kube

import (
	"net/netip"

	corev1 "k8s.io/api/core/v1"

	"github.com/amber-mesh/amber/agent/enrol"
)

// PodFromAPI converts a Pod to the agent's view of it. Unparsable
// addresses are skipped: the API server validates them, so one that does
// not parse is not an address a sandbox could hold.
func PodFromAPI(p *corev1.Pod) *enrol.Pod {
	out := &enrol.Pod{
		UID:             string(p.UID),
		ResourceVersion: p.ResourceVersion,
		Namespace:       p.Namespace,
		Name:            p.Name,
		NodeName:        p.Spec.NodeName,
		Labels:          p.Labels,
		Annotations:     p.Annotations,
		HostNetwork:     p.Spec.HostNetwork,
		Phase:           enrol.Phase(p.Status.Phase),
		Created:         p.CreationTimestamp.Time,
		Deleting:        p.DeletionTimestamp != nil,
	}
	ips := p.Status.PodIPs
	if len(ips) == 0 && p.Status.PodIP != "" {
		ips = []corev1.PodIP{{IP: p.Status.PodIP}}
	}
	for _, ip := range ips {
		if a, err := netip.ParseAddr(ip.IP); err == nil {
			out.IPs = append(out.IPs, a.Unmap())
		}
	}
	return out
}

// NamespaceFromAPI converts a Namespace.
func NamespaceFromAPI(ns *corev1.Namespace) *enrol.Namespace {
	return &enrol.Namespace{Name: ns.Name, Labels: ns.Labels}
}
