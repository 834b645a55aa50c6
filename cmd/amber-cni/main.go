// Command amber-cni is amber's chained CNI plugin; the kubelet's runtime
// executes it after the interface plugin for every pod sandbox.
package main

import "github.com/amber-mesh/amber/agent/cniplugin"

func main() { cniplugin.Main() }
