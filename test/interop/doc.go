// Package interop checks that amber's HBONE (tunnel/hbone) is
// wire-compatible with Istio's own Go implementation (istio.io/istio
// pkg/hbone), both ways, with SPIFFE mutual TLS from a local CA.
//
// Istio's side runs as a separate binary, hbone-interop (built from
// test/istiod/tools/hbone-interop by hack/istiod-bin.sh into
// .cache/istiod/<istio version>/bin/), because istio.io/istio pins its own
// dependency versions, which must not enter amber's module:
//
//   - TestIntegrationIstioHBONEClient: Istio's dialer → amber's hbone.Server
//     → a loopback echo target.
//   - TestIntegrationIstioHBONEServer: amber's hbone.Pool → Istio's
//     hbone.NewServer → loopback targets.
//
// Each also checks that a peer whose certificate comes from another CA is
// refused. Everything listens on 127.0.0.1 and needs no root. The binary
// is built when missing (seconds once pilot-discovery was built, minutes
// on a cold Go cache); when it cannot be had the tests skip, unless
// CI=true, where they fail. With -short they only use the cache.
// AMBER_ISTIOD_BIN_DIR points them at a directory holding a prebuilt
// hbone-interop instead.
package interop
