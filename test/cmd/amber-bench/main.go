// Command amber-bench runs amber's benchmarks on a network-namespace
// testbed and prints each result as a ratio against a baseline measured
// in the same run.
//
//	amber-bench datapath   capture vs nftables TPROXY vs direct pod→pod
//	amber-bench tunnel     amber's HBONE tunnel vs plain, copying and AES-GCM proxy pairs,
//	                       HAProxy's mTLS pair and Istio's Go HBONE pair, vs direct
//	amber-bench waypoint   HTTP through amber-ztunnel + amber-waypoint vs a plain ReverseProxy, ztunnel only and direct
//	amber-bench agent      the node agent against a real API server: label → capture latency, CPU and RSS under pod churn
//	amber-bench realnode   on a real node (test/cluster): start and install times, capture under pod churn,
//	                       a DaemonSet restart, the waypoint's and the ingress gateway's footprint and added latency
package main

import (
	"context"
	"fmt"
	"os"
	"os/signal"
	"syscall"
)

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: amber-bench datapath|tunnel|waypoint|agent|realnode [flags]")
		os.Exit(2)
	}
	var err error
	switch os.Args[1] {
	case "datapath":
		err = datapath(os.Args[2:])
	case "tunnel":
		err = tunnel(os.Args[2:])
	case "waypoint":
		err = waypointBench(os.Args[2:])
	case "agent":
		err = agentBench(os.Args[2:])
	case "realnode":
		err = realnodeBench(os.Args[2:])
	case "rproxy": // internal: the waypoint benchmark's ReverseProxy in a waypoint pod
		err = rproxyMain(os.Args[2:])
	case "tproxy": // internal: the tunnel benchmark's per-node proxy process
		if len(os.Args) != 4 {
			err = fmt.Errorf("usage: amber-bench tproxy PIN_ROOT splice|aes-gcm")
			break
		}
		err = proxyMain(os.Args[2], os.Args[3])
	default:
		err = fmt.Errorf("unknown benchmark %q", os.Args[1])
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "amber-bench:", err)
		os.Exit(1)
	}
}

// scratch gives a benchmark run its context, which SIGINT or SIGTERM
// ends so that the run stops between two measurements through the same
// teardown as an error (no process, pin or namespace left), and a
// temporary directory; done undoes both.
func scratch() (ctx context.Context, tmp string, done func(), err error) {
	tmp, err = os.MkdirTemp("", "amber-bench-")
	if err != nil {
		return nil, "", nil, err
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	return ctx, tmp, func() { stop(); os.RemoveAll(tmp) }, nil
}
