// Package kube runs a real Kubernetes control plane — etcd and
// kube-apiserver built from the Go module proxy — on loopback for
// integration tests.
//
// # Use
//
//	func TestIntegrationSomething(t *testing.T) {
//		cp := kube.Start(t, kube.Options{})
//		ns, err := cp.Client.CoreV1().Namespaces().Create(ctx, ..., metav1.CreateOptions{})
//		...
//		cp.StopAPIServer()   // clients now get connection refused
//		cp.StartAPIServer(t) // same port, certificates and etcd data
//	}
//
// Start picks free ports on 127.0.0.1, generates a throw-away CA, serving
// certificate, service-account key pair and admin client certificate
// (crypto/x509) in t.TempDir(), starts etcd and then kube-apiserver, and
// returns when /readyz answers ok (≈ 3 s on an idle machine). Nothing
// listens beyond loopback. The API server runs with
// --authorization-mode=Node,RBAC, --endpoint-reconciler-type=none (it
// advertises 127.0.0.1) and, unless Options.ServiceAccountAdmission is
// set, without the ServiceAccount admission plugin, so that pods can be
// created without a controller-manager. Objects are stored but nothing
// acts on them: there is no scheduler, controller or kubelet. Pods that
// have a nodeName never finish a graceful delete without a kubelet; delete
// them with a grace period of 0.
//
// StopAPIServer takes ≈ 2 s when watches are open (the API server closes
// them gracefully). After StartAPIServer a watch resumed from a resource
// version older than the restart gets 410 Expired — the new API server's
// watch cache starts at etcd's current revision — so relist, as informers
// do.
//
// The test's cleanup stops the API server, then etcd, and removes every
// file, also when the test fails (then the tails of etcd.log and
// kube-apiserver.log are logged); a process that crashed during the test
// fails it. Both processes have Pdeathsig SIGKILL, so they die with the
// test binary even when it is killed (its temporary directory then stays
// behind, as with any t.TempDir).
//
// ControlPlane.PKI and ControlPlane.UserConfig give later components
// (kubelet, controller-manager, scheduler, istiod) their certificates and
// kubeconfigs; ControlPlane.Kubectl runs kubectl as admin.
//
// # Binaries and their cache
//
// Binaries (called by Start) runs hack/kube-bins.sh, which builds etcd,
// kube-apiserver and kubectl — and on request kubelet, kube-scheduler,
// kube-controller-manager and kube-proxy — from the tools modules in
// tools/k8s and tools/etcd into
//
//	.cache/kube/<kubernetes version>/bin/<name>
//	.cache/kube/<kubernetes version>/stamp/<name>  hash of the tools module's go.mod + go.sum
//
// at the repository root (git-ignored; KUBE_CACHE_DIR moves it). A binary
// whose stamp matches is reused: a warm call takes ≈ 0.2 s. `make
// kube-bins` (KUBE_BINS=all for every binary) builds ahead of time, which
// is what CI should do before `go test`: a cold build outlasts go test's
// default 10-minute timeout (Binaries gives up 30 s before the test's
// deadline and stops the build).
//
// Cold builds measured on the 2-core development machine, one binary at a
// time in this order, each reusing the Go build cache of the ones before:
// etcd 60 s; kube-apiserver 343 s with 2.3 GB peak memory; kubectl 41 s;
// kubelet 204 s; kube-scheduler 15 s; kube-controller-manager 74 s;
// kube-proxy 12 s — about 12.5 min for all seven. With the Go build cache
// warm (say after a tools go.mod change that leaves the code alone) all
// seven relink in ≈ 50 s. AMBER_KUBE_BIN_DIR points Binaries at a
// directory of prebuilt binaries instead.
//
// When the binaries cannot be built the test skips, unless CI=true, where
// it fails. With -short, Binaries only uses the cache and never builds; it
// skips when the cache is cold.
//
// Integration tests that use this package are named TestIntegration...;
// they need no root.
package kube
