// Package accept is the accept loop every ztunnel listener runs: a failed
// accept (out of file descriptors, socket buffers or memory) backs off and
// is retried instead of ending the loop, and failures are counted by errno
// and logged once per burst.
package accept

import (
	"context"
	"errors"
	"log/slog"
	"maps"
	"net"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/amber-mesh/amber/internal/logkey"
)

// Backoff between failed accepts: doubled from minDelay up to maxDelay,
// as net/http's Server does. A descriptor freed by a closing connection
// is used again within maxDelay.
const (
	minDelay = 5 * time.Millisecond
	maxDelay = time.Second
)

// burstGap separates bursts of failures for logging. At its descriptor
// limit a listener fails even with nobody waiting (accept4 reserves the
// descriptor before it looks at the queue), so a ztunnel hovering at the
// limit alternates failures and successes; those are one burst.
const burstGap = 10 * time.Second

// Options configure Serve.
type Options struct {
	// Name names the listener in logs. Zero means its address.
	Name string
	// Logger gets one warning when accepts start failing and one line
	// when they work again. Nil discards them.
	Logger *slog.Logger
	// Stats, if set, counts the failures.
	Stats *Stats
}

// Stats counts failed accepts by errno ("EMFILE", "ENFILE", "ENOBUFS",
// "ENOMEM", ...; "other" for an error without one). Its methods are safe
// for concurrent use; the zero value is ready.
type Stats struct {
	mu      sync.Mutex // guards the field below
	byErrno map[string]uint64
}

func (s *Stats) add(errno string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.byErrno == nil {
		s.byErrno = make(map[string]uint64)
	}
	s.byErrno[errno]++
}

// Counts returns a copy of the counters.
func (s *Stats) Counts() map[string]uint64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	return maps.Clone(s.byErrno)
}

// Errno names the errno behind err, or "other".
func Errno(err error) string {
	var en syscall.Errno
	if errors.As(err, &en) {
		if name := unix.ErrnoName(en); name != "" {
			return name
		}
	}
	return "other"
}

// Serve accepts connections on ln and passes each to handle, which runs
// on Serve's goroutine and must not block. It returns when ln is closed
// (an error wrapping net.ErrClosed) or when ctx ends while it backs off
// (ctx's error).
//
// Any other accept error is a shortage that closing connections will
// relieve — EMFILE/ENFILE (descriptors), ENOBUFS/ENOMEM (kernel memory),
// ECONNABORTED (a client gone before accept) — and ending the loop would
// stop the listener for good: a ztunnel without its outbound listener is a
// node without TCP. The connection stays in the kernel's accept queue
// meanwhile and is accepted once the shortage ends. A timeout (a deadline
// set on ln) is retried at once and not counted.
func Serve(ctx context.Context, ln net.Listener, opts Options, handle func(net.Conn)) error {
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	name := opts.Name
	if name == "" {
		name = ln.Addr().String()
	}
	var (
		delay    time.Duration
		lastFail time.Time // of the last failed accept
		warned   bool      // a burst was logged and no accept worked since
		failures int       // since the burst was logged
		since    time.Time // when it started
	)
	for {
		c, err := ln.Accept()
		if err == nil {
			if warned {
				log.Info("accepting connections again", logkey.Listener, name,
					logkey.FailedAccepts, failures, logkey.For, time.Since(since).Round(time.Millisecond))
				warned = false
			}
			delay = 0
			handle(c)
			continue
		}
		if errors.Is(err, net.ErrClosed) {
			return err
		}
		var ne net.Error
		if errors.As(err, &ne) && ne.Timeout() {
			continue
		}
		errno := Errno(err)
		if opts.Stats != nil {
			opts.Stats.add(errno)
		}
		now := time.Now()
		if !warned && (lastFail.IsZero() || now.Sub(lastFail) >= burstGap) {
			// One line per burst: a ztunnel out of descriptors fails
			// every accept until connections close.
			log.Warn("accept failed; retrying with backoff until it works again", logkey.Listener, name, logkey.Errno, errno, logkey.Error, err)
			warned, failures, since = true, 0, now
		}
		lastFail = now
		failures++
		delay = min(max(2*delay, minDelay), maxDelay)
		t := time.NewTimer(delay)
		select {
		case <-t.C:
		case <-ctx.Done():
			t.Stop()
			return ctx.Err()
		}
	}
}
