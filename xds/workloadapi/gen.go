// Package workloadapi holds the Go types of Istio's workload discovery API
// (protobuf package istio.workload), generated from amber's copy of the schema.
package workloadapi

// Generating needs protoc (Debian protobuf-compiler). Proto paths are relative
// to the module root so the file names registered with the protobuf runtime
// are amber's own. The second step replaces the protoc version that
// protoc-gen-go records in the header with "(unknown)": nothing else in the
// output depends on it, so any protoc produces identical files and CI can
// diff them.
//go:generate protoc -I ../.. --plugin=protoc-gen-go=./protoc-gen-go.sh --go_out=../.. --go_opt=module=github.com/amber-mesh/amber xds/workloadapi/workload.proto xds/workloadapi/security/authorization.proto
//go:generate sed -i -E "s#^(//[[:space:]]+protoc[[:space:]]+).*#\\1(unknown)#" workload.pb.go security/authorization.pb.go
