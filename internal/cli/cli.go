// Package cli holds what amber's commands share between flags and Run: the
// slog logger chosen by -log-format/-log-level, and running until SIGINT or
// SIGTERM.
//
// The logger writes to stderr in batches: a busy ztunnel logs a line per
// connection, and a write per line would cost it a syscall and wake the
// container runtime's log reader for every connection. Info and debug
// lines reach stderr within logDelay; a warning or error is written at
// once, with everything before it; RunUntilSignal writes what is left
// before it returns.
package cli

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"sync"
	"syscall"
	"time"
)

// Logger returns a logger writing to stderr in format ("text" or "json")
// at level ("debug", "info", "warn", "error").
func Logger(format, level string) (*slog.Logger, error) {
	var l slog.Level
	if err := l.UnmarshalText([]byte(level)); err != nil {
		return nil, fmt.Errorf("-log-level: %w", err)
	}
	return newLogger(stderr, format, l)
}

func newLogger(w *batchWriter, format string, level slog.Level) (*slog.Logger, error) {
	opts := &slog.HandlerOptions{Level: level}
	var h slog.Handler
	switch format {
	case "text":
		h = slog.NewTextHandler(w, opts)
	case "json":
		h = slog.NewJSONHandler(w, opts)
	default:
		return nil, fmt.Errorf("-log-format %q: want text or json", format)
	}
	return slog.New(urgentFlush{h, w}), nil
}

const (
	logDelay = 50 * time.Millisecond // longest an info line waits
	logBatch = 32 << 10              // a batch this large is written at once
)

var stderr = &batchWriter{w: os.Stderr, delay: logDelay, max: logBatch}

// batchWriter collects writes and passes them on in one write when the
// batch is large, when delay has passed since its first line, or on Flush.
type batchWriter struct {
	w     io.Writer
	delay time.Duration
	max   int

	mu    sync.Mutex // guards the fields below
	buf   []byte
	timer *time.Timer // armed while buf holds lines
}

func (b *batchWriter) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.buf = append(b.buf, p...)
	if len(b.buf) >= b.max {
		return len(p), b.flushLocked()
	}
	if b.timer == nil {
		b.timer = time.AfterFunc(b.delay, func() { b.Flush() })
	} else if len(b.buf) == len(p) {
		b.timer.Reset(b.delay)
	}
	return len(p), nil
}

// Flush writes what is collected.
func (b *batchWriter) Flush() error {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.flushLocked()
}

func (b *batchWriter) flushLocked() error {
	if len(b.buf) == 0 {
		return nil
	}
	if b.timer != nil {
		b.timer.Stop()
	}
	_, err := b.w.Write(b.buf)
	if cap(b.buf) > 4*b.max {
		b.buf = nil // a burst's buffer is not kept for the quiet that follows
	} else {
		b.buf = b.buf[:0]
	}
	return err
}

// urgentFlush writes a warning or an error, and everything logged before
// it, as soon as it is logged: a crash right after it loses nothing that
// explains it.
type urgentFlush struct {
	slog.Handler
	w *batchWriter
}

func (h urgentFlush) Handle(ctx context.Context, r slog.Record) error {
	err := h.Handler.Handle(ctx, r)
	if r.Level >= slog.LevelWarn {
		if ferr := h.w.Flush(); err == nil {
			err = ferr
		}
	}
	return err
}

func (h urgentFlush) WithAttrs(as []slog.Attr) slog.Handler {
	return urgentFlush{h.Handler.WithAttrs(as), h.w}
}

func (h urgentFlush) WithGroup(name string) slog.Handler {
	return urgentFlush{h.Handler.WithGroup(name), h.w}
}

// RunUntilSignal runs run with a context cancelled by SIGINT or SIGTERM; a
// run that ends because of the signal is a clean exit.
func RunUntilSignal(run func(context.Context) error) error {
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	defer stderr.Flush()
	err := run(ctx)
	if errors.Is(err, context.Canceled) {
		return nil
	}
	return err
}
