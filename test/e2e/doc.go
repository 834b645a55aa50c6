// Package e2e runs real amber-ztunnel processes on testbed nodes with the
// datapath loaded and checks what users observe: bytes echoed, packets on
// the wire, access logs and Prometheus metrics.
package e2e
