package proxy

import (
	"io"
	"sync"
	"sync/atomic"
	"time"
)

// This file is the waypoint's only byte copier (TCP chains and HTTP
// upgrades). It is deliberately small and standalone so that it can be
// replaced by tunnel/relay (socket ⇄ HBONE copying with half-close and
// idle parking, being extracted from tunnel/proxy) without touching the
// rest of the package: relay's signature is the seam.

// halfCloser is a connection that can end its sending side alone
// (*net.TCPConn, *hbone.Stream).
type halfCloser interface {
	CloseWrite() error
}

// side is one end of a relay: where to read from (which may hold bytes
// already buffered), where to write to, and how to close it.
type side struct {
	r io.Reader
	w io.Writer
	c io.Closer
}

// relayStats counts the bytes a relay moved: up from the client to the
// upstream, down back.
type relayStats struct {
	up, down atomic.Int64
}

// relay copies client⇄upstream until both directions ended: each
// direction's end (EOF) is passed on as a half-close when the writer can
// (otherwise the connection closes), an error closes both. idle > 0 closes
// both after that long without a byte in either direction (tcp_proxy's
// idle_timeout). It returns the first error that ended a direction, nil
// when both ended cleanly.
func relay(client, upstream side, idle time.Duration, st *relayStats) error {
	var last atomic.Int64
	last.Store(time.Now().UnixNano())
	var once sync.Once
	var firstErr error
	closeBoth := func(err error) {
		once.Do(func() {
			firstErr = err
			client.c.Close()
			upstream.c.Close()
		})
	}
	var stop chan struct{}
	if idle > 0 {
		stop = make(chan struct{})
		go relayIdleWatch(&last, idle, stop, func() { closeBoth(errIdleTimeout) })
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		relayCopy(upstream, client, &st.up, &last, closeBoth)
	}()
	relayCopy(client, upstream, &st.down, &last, closeBoth)
	<-done
	if stop != nil {
		close(stop)
	}
	closeBoth(nil)
	return firstErr
}

// relayCopy copies from src to dst, then half-closes dst.
func relayCopy(dst, src side, n *atomic.Int64, last *atomic.Int64, closeBoth func(error)) {
	buf := make([]byte, 32<<10)
	for {
		m, err := src.r.Read(buf)
		if m > 0 {
			last.Store(time.Now().UnixNano())
			if _, werr := dst.w.Write(buf[:m]); werr != nil {
				closeBoth(werr)
				return
			}
			n.Add(int64(m))
		}
		if err == io.EOF {
			if hc, ok := dst.c.(halfCloser); ok {
				if hc.CloseWrite() == nil {
					return
				}
			}
			closeBoth(nil)
			return
		}
		if err != nil {
			closeBoth(err)
			return
		}
	}
}

// relayIdleWatch calls expire once nothing moved for idle.
func relayIdleWatch(last *atomic.Int64, idle time.Duration, stop chan struct{}, expire func()) {
	t := time.NewTimer(idle)
	defer t.Stop()
	for {
		select {
		case <-stop:
			return
		case <-t.C:
			since := time.Since(time.Unix(0, last.Load()))
			if since >= idle {
				expire()
				return
			}
			t.Reset(idle - since)
		}
	}
}
