//go:build !unix

package hbone

import (
	"io"
	"net"
)

func readableFunc(io.Reader) func() { return nil }

func awaitInput(net.Conn) error { return nil }
