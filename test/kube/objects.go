package kube

import (
	"context"
	"fmt"
	"net/netip"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
)

// RunningPod creates pod and reports it as the kubelet of a node at
// hostIPs reports a started pod: running and ready at ips (the first is
// status.podIP). It returns the pod as stored.
func RunningPod(ctx context.Context, cs kubernetes.Interface, pod *corev1.Pod, hostIPs []netip.Addr, ips ...netip.Addr) (*corev1.Pod, error) {
	pods := cs.CoreV1().Pods(pod.Namespace)
	p, err := pods.Create(ctx, pod, metav1.CreateOptions{})
	if err != nil {
		return nil, fmt.Errorf("create pod %s/%s: %w", pod.Namespace, pod.Name, err)
	}
	now := metav1.Now()
	p.Status = corev1.PodStatus{
		Phase:     corev1.PodRunning,
		StartTime: &now,
		Conditions: []corev1.PodCondition{
			{Type: corev1.PodReady, Status: corev1.ConditionTrue, LastTransitionTime: now},
			{Type: corev1.ContainersReady, Status: corev1.ConditionTrue, LastTransitionTime: now},
		},
	}
	for _, ip := range ips {
		p.Status.PodIPs = append(p.Status.PodIPs, corev1.PodIP{IP: ip.String()})
	}
	if len(ips) > 0 {
		p.Status.PodIP = ips[0].String()
	}
	for _, ip := range hostIPs {
		p.Status.HostIPs = append(p.Status.HostIPs, corev1.HostIP{IP: ip.String()})
	}
	if len(hostIPs) > 0 {
		p.Status.HostIP = hostIPs[0].String()
	}
	if p, err = pods.UpdateStatus(ctx, p, metav1.UpdateOptions{}); err != nil {
		return nil, fmt.Errorf("pod %s/%s status: %w", pod.Namespace, pod.Name, err)
	}
	return p, nil
}

// CreateService creates svc and the EndpointSlice the EndpointSlice
// controller derives from it and its ready backends (pods as
// RunningPod returns them): one endpoint per pod at its status.podIP,
// the Service's ports at their numeric target ports. It returns the
// Service as stored (with its cluster IP).
func CreateService(ctx context.Context, cs kubernetes.Interface, svc *corev1.Service, backends []*corev1.Pod) (*corev1.Service, error) {
	s, err := cs.CoreV1().Services(svc.Namespace).Create(ctx, svc, metav1.CreateOptions{})
	if err != nil {
		return nil, fmt.Errorf("create service %s/%s: %w", svc.Namespace, svc.Name, err)
	}
	slice := &discoveryv1.EndpointSlice{
		ObjectMeta: metav1.ObjectMeta{
			Name: s.Name + "-abcde", Namespace: s.Namespace,
			Labels: map[string]string{
				discoveryv1.LabelServiceName: s.Name,
				discoveryv1.LabelManagedBy:   "endpointslice-controller.k8s.io",
			},
			OwnerReferences: []metav1.OwnerReference{{APIVersion: "v1", Kind: "Service", Name: s.Name, UID: s.UID}},
		},
		AddressType: discoveryv1.AddressTypeIPv4,
	}
	for _, p := range s.Spec.Ports {
		port, proto := p.TargetPort.IntVal, p.Protocol
		slice.Ports = append(slice.Ports, discoveryv1.EndpointPort{Name: &p.Name, Port: &port, Protocol: &proto, AppProtocol: p.AppProtocol})
	}
	ready := true
	for _, b := range backends {
		nodeName := b.Spec.NodeName
		slice.Endpoints = append(slice.Endpoints, discoveryv1.Endpoint{
			Addresses:  []string{b.Status.PodIP},
			Conditions: discoveryv1.EndpointConditions{Ready: &ready, Serving: &ready},
			NodeName:   &nodeName,
			TargetRef:  &corev1.ObjectReference{Kind: "Pod", Namespace: b.Namespace, Name: b.Name, UID: b.UID},
		})
	}
	if _, err := cs.DiscoveryV1().EndpointSlices(s.Namespace).Create(ctx, slice, metav1.CreateOptions{}); err != nil {
		return nil, fmt.Errorf("endpoints of service %s/%s: %w", svc.Namespace, svc.Name, err)
	}
	return s, nil
}
