#!/bin/sh
# protoc runs this as its Go plugin so that the protoc-gen-go version is the
# one pinned by go.mod's tool directive, not whatever is on PATH.
exec go tool protoc-gen-go "$@"
