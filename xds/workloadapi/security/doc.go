// Package security holds the Go types of Istio's ztunnel authorization
// resource (protobuf package istio.security), generated from amber's copy of
// the schema by go generate in the parent package.
package security
