// Package cli holds what amber's commands share between flags and Run: the
// slog logger chosen by -log-format/-log-level, and running until SIGINT or
// SIGTERM.
package cli

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"syscall"
)

// Logger returns a logger writing to stderr in format ("text" or "json")
// at level ("debug", "info", "warn", "error").
func Logger(format, level string) (*slog.Logger, error) {
	var l slog.Level
	if err := l.UnmarshalText([]byte(level)); err != nil {
		return nil, fmt.Errorf("-log-level: %w", err)
	}
	opts := &slog.HandlerOptions{Level: l}
	switch format {
	case "text":
		return slog.New(slog.NewTextHandler(os.Stderr, opts)), nil
	case "json":
		return slog.New(slog.NewJSONHandler(os.Stderr, opts)), nil
	}
	return nil, fmt.Errorf("-log-format %q: want text or json", format)
}

// RunUntilSignal runs run with a context cancelled by SIGINT or SIGTERM; a
// run that ends because of the signal is a clean exit.
func RunUntilSignal(run func(context.Context) error) error {
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	err := run(ctx)
	if errors.Is(err, context.Canceled) {
		return nil
	}
	return err
}
