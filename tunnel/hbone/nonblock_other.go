//go:build !unix

package hbone

import "syscall"

func rawConn(any) syscall.RawConn { return nil }

func tryWrite(syscall.RawConn, []byte) (int, error) { return 0, syscall.EINVAL }
