//go:build !unix

package hbone

import "io"

func readableFunc(io.Reader) func() { return nil }
