// Package istiod runs a real istiod (pilot-discovery built from the Go
// module proxy) against a test/kube control plane on loopback, for
// integration tests of amber's ztunnel against the control plane it
// replaces the Rust ztunnel for.
//
// # Use
//
//	func TestIntegrationSomething(t *testing.T) {
//		cp := kube.Start(t, kube.Options{})
//		d := istiod.Start(t, cp, istiod.Options{})
//		tok, err := d.Token(ctx, ztunnelPod) // istio-system/ztunnel, audience istio-ca
//		// dial d.Address with TLS: roots d.RootPEM, server name d.ServerName
//	}
//
// Start applies Istio's CRDs (crd-all.gen.yaml from the same istio.io/istio
// module as the binary) with kubectl, creates the istio-system namespace
// and the istio-system/ztunnel service account, and runs pilot-discovery
// with the control plane's admin kubeconfig, PILOT_ENABLE_AMBIENT=true and
// CA_TRUSTED_NODE_ACCOUNTS=istio-system/ztunnel (so the ztunnel may ask for
// certificates of pods on its node, as in Istio's ambient install), with
// the mesh configuration Istio's Helm chart renders by default
// (MeshConfig). Every
// listener is on 127.0.0.1 at a free port; Address is the TLS gRPC port
// that serves both xDS and the CA (istiod's 15012). istiod signs its
// serving certificate with its self-signed CA for istiod.istio-system.svc
// (ServerName), so clients dialling 127.0.0.1 must set the server name.
// Start returns once /ready answers on the HTTP port and istiod has
// published its root certificate in the istio-ca-root-cert ConfigMap
// (RootPEM) — about 2 s with a warm control plane. istiod runs in a
// temporary directory (it writes its DNS certificates under ./var there).
//
// The test's cleanup stops istiod (SIGTERM, then SIGKILL); a crash during
// the test fails it and the tail of istiod's log is logged on failure.
// istiod has Pdeathsig SIGKILL, so it dies with the test binary.
//
// Token mints service-account tokens for istio-system/ztunnel with audience
// istio-ca through the TokenRequest API (TokenFor: any service account, as
// a waypoint's projected token). istiod authorises impersonation
// (a certificate for another identity) only when the token is bound to a
// ztunnel Pod object and a pod with the requested service account has the
// same spec.nodeName; pass that pod to Token.
//
// # Binaries and their cache
//
// Binaries runs hack/istiod-bin.sh, which builds
// istio.io/istio/pilot/cmd/pilot-discovery from the tools module in
// tools/ (its own module: Istio pins its own k8s.io versions) and copies
// Istio's CRDs, the Gateway API CRDs Istio's integration tests use
// (Options.GatewayAPI applies them) and istiod's Helm chart (ChartDir)
// next to them:
//
//	.cache/istiod/<istio version>/bin/{pilot-discovery,crd-all.gen.yaml,gateway-api-crd.yaml,istio-discovery/}
//	.cache/istiod/<istio version>/stamp/pilot-discovery
//
// A cold build takes ≈ 3.5 min on the 2-core development machine; a warm
// call well under a second. AMBER_ISTIOD_BIN_DIR points Binaries at a
// directory holding both files instead. When they cannot be built the test
// skips, unless CI=true, where it fails; with -short it only uses the
// cache.
//
// Options.Injector also creates the injector ConfigMap the pinned
// istio-discovery chart renders (RenderConfigMaps; Helm from
// hack/helm.sh) before istiod starts, so that istiod's deployment
// controller renders waypoints as in a real install. Istioctl builds the pinned istioctl (hack/istiod-bin.sh
// istioctl) for tests that read amber's admin output with its parsers.
//
// Integration tests that use this package are named TestIntegration...;
// they need no root.
package istiod
