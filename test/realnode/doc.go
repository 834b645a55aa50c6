// Package realnode installs amber on a test/cluster node the way users
// do — deploy/'s Helm chart, the image built by
// test/images imported into the node's containerd — and holds the tests
// that run the mesh there: the DaemonSet, its capture of CNI-created pod
// veths, istiod's workloads, policies and certificates, rollouts and
// uninstall.
//
// # Use
//
//	c := cluster.Up(t, cluster.Options{Istiod: true})
//	a := realnode.MustInstall(t, c, realnode.Options{})
//	// label a namespace istio.io/dataplane-mode=ambient, run pods ...
//	a.Uninstall(ctx) // helm uninstall; the node is clean afterwards
//
// The chart's values for this node: image localhost/amber/amber:test with
// imagePullPolicy Never, the node's own CNI directories (under the
// cluster's state directory), the node's interface as the only uplink (so
// the machine's real interfaces are never touched) and istiod at
// istiod.istio-system.svc:15012, found through cluster DNS.
//
// Tests here are privileged (they need the node): they skip when not root,
// unless CI=true, where they fail.
package realnode
