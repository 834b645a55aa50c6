package tcptest

import (
	"net"
	"sync"
	"testing"
)

// Serve accepts connections on ln until tb ends and calls handle for each
// in its own goroutine, closing the connection when handle returns. When
// tb ends it closes ln and every connection still open, and waits for the
// handlers, so no goroutine outlives the test. ln may be any listener: on
// loopback, in a test's network namespace, or TLS.
func Serve(tb testing.TB, ln net.Listener, handle func(net.Conn)) {
	tb.Helper()
	var (
		wg    sync.WaitGroup
		mu    sync.Mutex // guards the fields below
		conns = map[net.Conn]struct{}{}
		done  bool
	)
	tb.Cleanup(func() {
		ln.Close()
		mu.Lock()
		done = true
		for c := range conns {
			c.Close()
		}
		mu.Unlock()
		wg.Wait()
	})
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			if done {
				mu.Unlock()
				c.Close()
				return
			}
			conns[c] = struct{}{}
			wg.Add(1)
			mu.Unlock()
			go func() {
				defer wg.Done()
				defer func() {
					c.Close()
					mu.Lock()
					delete(conns, c)
					mu.Unlock()
				}()
				handle(c)
			}()
		}
	}()
}
