package relay

import (
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"syscall"
	"testing"

	"golang.org/x/net/http2"

	"github.com/amber-mesh/amber/tunnel/hbone"
)

func TestPeerEnded(t *testing.T) {
	sysErr := func(op string, errno syscall.Errno) error {
		return &net.OpError{Op: op, Net: "tcp", Err: os.NewSyscallError(op, errno)}
	}
	for _, tc := range []struct {
		err  error
		want bool
	}{
		{sysErr("read", syscall.ECONNRESET), true},
		{sysErr("write", syscall.EPIPE), true},
		{sysErr("shutdown", syscall.ENOTCONN), true},
		{io.ErrUnexpectedEOF, true},
		{&hbone.StreamError{Code: http2.ErrCodeCancel, Remote: true}, true},
		{fmt.Errorf("copy: %w", &hbone.StreamError{Code: http2.ErrCodeNo, Remote: true}), true},
		// Failures stay failures.
		{&hbone.StreamError{Code: http2.ErrCodeCancel}, false},
		{&hbone.StreamError{Code: http2.ErrCodeInternal, Remote: true}, false},
		{&hbone.GoAwayError{Code: http2.ErrCodeProtocol, Remote: true}, false},
		{hbone.ErrKeepaliveTimeout, false},
		{sysErr("read", syscall.ETIMEDOUT), false},
		{errors.New("destination workload removed"), false},
	} {
		if got := peerEnded(tc.err); got != tc.want {
			t.Errorf("peerEnded(%v) = %v, want %v", tc.err, got, tc.want)
		}
	}
}
