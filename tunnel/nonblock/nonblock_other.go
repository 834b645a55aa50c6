//go:build !unix

package nonblock

import "syscall"

// RawConn is a socket's syscall.RawConn.
type RawConn = syscall.RawConn

// Raw returns nil: sockets are not supported here.
func Raw(any) RawConn { return nil }

func Write(RawConn, []byte) (int, error) { return 0, syscall.EINVAL }

func Read(RawConn, []byte) (int, error) { return 0, syscall.EINVAL }

func WaitReadable(RawConn) error { return syscall.EINVAL }

func WaitReadableOrWoken(RawConn) error { return syscall.EINVAL }

func ReadWait(RawConn, []byte) (int, error) { return 0, syscall.EINVAL }

func WriteAll(RawConn, []byte) (int, error) { return 0, syscall.EINVAL }
