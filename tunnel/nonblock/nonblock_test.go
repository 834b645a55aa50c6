package nonblock_test

import (
	"bytes"
	"errors"
	"io"
	"net"
	"os"
	"testing"
	"time"

	"github.com/amber-mesh/amber/internal/tcptest"
	"github.com/amber-mesh/amber/tunnel/nonblock"
)

// Read and Write never wait: an empty socket is ErrWouldBlock, a full one
// takes 0 bytes; WaitReadable waits for input without reading it, up to
// the read deadline.
func TestNonblocking(t *testing.T) {
	a, b := tcptest.Pair(t)
	if nonblock.Raw(struct{}{}) != nil {
		t.Error("Raw of a non-socket is not nil")
	}
	ra, rb := nonblock.Raw(a), nonblock.Raw(b)
	buf := make([]byte, 64)
	if n, err := nonblock.Read(rb, buf); n != 0 || !errors.Is(err, nonblock.ErrWouldBlock) {
		t.Fatalf("read of an empty socket: %d, %v", n, err)
	}
	b.SetReadDeadline(time.Now().Add(20 * time.Millisecond))
	if err := nonblock.WaitReadable(rb); !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("wait on an empty socket: %v", err)
	}
	b.SetReadDeadline(time.Time{})
	if n, err := nonblock.Write(ra, []byte("hello")); n != 5 || err != nil {
		t.Fatalf("write: %d, %v", n, err)
	}
	if err := nonblock.WaitReadable(rb); err != nil {
		t.Fatalf("wait for input: %v", err)
	}
	if n, err := (nonblock.Reader{Raw: rb}).Read(buf); string(buf[:n]) != "hello" || err != nil {
		t.Fatalf("read %q, %v", buf[:n], err)
	}
	// Fill a's send buffer and b's receive buffer: Write takes 0, not an error.
	big := make([]byte, 1<<20)
	for {
		n, err := nonblock.Write(ra, big)
		if err != nil {
			t.Fatal(err)
		}
		if n == 0 {
			break
		}
	}
	a.CloseWrite()
	var total int
	for {
		n, err := nonblock.Read(rb, big)
		total += n
		if errors.Is(err, nonblock.ErrWouldBlock) {
			if err := nonblock.WaitReadable(rb); err != nil {
				t.Fatal(err)
			}
			continue
		}
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
	}
	if total == 0 {
		t.Error("read nothing of a full socket")
	}
}

// WaitReadableOrWoken ends for input that came before it and for input
// that comes while it waits, and otherwise at the read deadline.
func TestWaitReadableOrWoken(t *testing.T) {
	a, b := tcptest.Pair(t)
	ra, rb := nonblock.Raw(a), nonblock.Raw(b)
	buf := make([]byte, 8)
	b.SetReadDeadline(time.Now().Add(20 * time.Millisecond))
	if err := nonblock.WaitReadableOrWoken(rb); !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("wait on an empty socket: %v", err)
	}
	b.SetReadDeadline(time.Time{})
	// Input before the call: it is seen by the first look.
	if n, err := nonblock.Write(ra, []byte("x")); n != 1 || err != nil {
		t.Fatalf("write: %d, %v", n, err)
	}
	if err := nonblock.WaitReadableOrWoken(rb); err != nil {
		t.Fatalf("wait for input that came before it: %v", err)
	}
	if n, err := nonblock.Read(rb, buf); string(buf[:n]) != "x" || err != nil {
		t.Fatalf("read %q, %v", buf[:n], err)
	}
	// Input during the wait wakes it.
	done := make(chan error, 1)
	go func() { done <- nonblock.WaitReadableOrWoken(rb) }()
	if n, err := nonblock.Write(ra, []byte("y")); n != 1 || err != nil {
		t.Fatalf("write: %d, %v", n, err)
	}
	if err := <-done; err != nil {
		t.Fatalf("wait for input: %v", err)
	}
	if n, err := nonblock.Read(rb, buf); string(buf[:n]) != "y" || err != nil {
		t.Fatalf("read %q, %v", buf[:n], err)
	}
}

// Read, Write, ReadWait and WriteAll allocate nothing once warm: they run on every DATA frame
// and every idle socket's wake-up.
func TestNoAllocs(t *testing.T) {
	a, b := tcptest.Pair(t)
	ra, rb := nonblock.Raw(a), nonblock.Raw(b)
	buf := make([]byte, 8)
	msg := []byte("x")
	if n := testing.AllocsPerRun(100, func() {
		if _, err := nonblock.Write(ra, msg); err != nil {
			t.Fatal(err)
		}
		if _, err := nonblock.Read(rb, buf); err != nil && !errors.Is(err, nonblock.ErrWouldBlock) {
			t.Fatal(err)
		}
	}); n != 0 {
		t.Errorf("%v allocations per Write and Read", n)
	}
	if n := testing.AllocsPerRun(100, func() {
		if _, err := nonblock.WriteAll(ra, msg); err != nil {
			t.Fatal(err)
		}
		if _, err := nonblock.ReadWait(rb, buf); err != nil {
			t.Fatal(err)
		}
	}); n != 0 {
		t.Errorf("%v allocations per WriteAll and ReadWait", n)
	}
}

// ReadWait and WriteAll wait on the poller as net.Conn's Read and Write
// do: for input, for room, until the deadline; and report the socket's end
// and its closing as net.Conn does.
func TestReadWaitWriteAll(t *testing.T) {
	a, b := tcptest.Pair(t)
	ra, rb := nonblock.Raw(a), nonblock.Raw(b)
	buf := make([]byte, 64)

	got := make(chan string, 1)
	go func() {
		n, err := nonblock.ReadWait(rb, buf)
		if err != nil {
			got <- err.Error()
			return
		}
		got <- string(buf[:n])
	}()
	if _, err := nonblock.WriteAll(ra, []byte("hello")); err != nil {
		t.Fatal(err)
	}
	if s := <-got; s != "hello" {
		t.Fatalf("ReadWait got %q", s)
	}

	b.SetReadDeadline(time.Now().Add(-time.Second))
	if _, err := nonblock.ReadWait(rb, buf); !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("ReadWait past its deadline: %v", err)
	}
	b.SetReadDeadline(time.Time{})

	// More than the socket buffers hold: WriteAll waits for the reader.
	big := make([]byte, 16<<20)
	for i := range big {
		big[i] = byte(i)
	}
	sum := make(chan []byte, 1)
	go func() {
		var all []byte
		rbuf := make([]byte, 64<<10)
		for {
			n, err := nonblock.ReadWait(rb, rbuf)
			all = append(all, rbuf[:n]...)
			if err != nil {
				if err != io.EOF {
					t.Error(err)
				}
				sum <- all
				return
			}
		}
	}()
	if n, err := nonblock.WriteAll(ra, big); n != len(big) || err != nil {
		t.Fatalf("WriteAll: %d of %d, %v", n, len(big), err)
	}
	a.CloseWrite()
	if all := <-sum; !bytes.Equal(all, big) {
		t.Fatalf("read %d bytes, not the %d written", len(all), len(big))
	}

	b.Close()
	if _, err := nonblock.ReadWait(rb, buf); !errors.Is(err, net.ErrClosed) {
		t.Fatalf("ReadWait on a closed socket: %v", err)
	}
	a.Close()
	if _, err := nonblock.WriteAll(ra, buf); !errors.Is(err, net.ErrClosed) {
		t.Fatalf("WriteAll on a closed socket: %v", err)
	}
}
