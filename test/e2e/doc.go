// Package e2e runs real amber-ztunnel processes on testbed nodes with the
// datapath loaded and checks what users observe: bytes echoed, packets on
// the wire, access logs and Prometheus metrics. The ztunnels run in local
// mode, and in istiod mode against a real istiod and kube-apiserver.
package e2e
