package cli

import (
	"bytes"
	"context"
	"log/slog"
	"strings"
	"sync"
	"testing"
	"testing/synctest"
	"time"
)

// lockedBuffer is the stderr stand-in: the flush timer writes from its
// own goroutine.
type lockedBuffer struct {
	mu     sync.Mutex
	b      bytes.Buffer
	writes int
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.writes++
	return l.b.Write(p)
}

func (l *lockedBuffer) snapshot() (string, int) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String(), l.writes
}

// In a synctest bubble: the batch delay passes in fake time.
func TestLoggerBatchesInfoLines(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		out := &lockedBuffer{}
		w := &batchWriter{w: out, delay: 100 * time.Millisecond, max: 1 << 20}
		log, err := newLogger(w, "text", slog.LevelInfo)
		if err != nil {
			t.Fatal(err)
		}
		for i := range 100 {
			log.Info("connection complete", "n", i)
		}
		log.Debug("below the level")
		time.Sleep(99 * time.Millisecond)
		synctest.Wait()
		if s, _ := out.snapshot(); s != "" {
			t.Fatalf("info lines written before the delay: %q", s)
		}
		time.Sleep(time.Millisecond)
		synctest.Wait()
		s, writes := out.snapshot()
		if n := strings.Count(s, "connection complete"); n != 100 {
			t.Fatalf("%d lines written once the delay passed, want 100: %q", n, s)
		}
		if writes != 1 {
			t.Errorf("100 lines took %d writes, want 1", writes)
		}
		if strings.Contains(s, "below the level") {
			t.Error("a debug line was written at info level")
		}
	})
}

func TestLoggerWritesWarningsAtOnce(t *testing.T) {
	out := &lockedBuffer{}
	w := &batchWriter{w: out, delay: time.Hour, max: 1 << 20}
	log, err := newLogger(w, "json", slog.LevelInfo)
	if err != nil {
		t.Fatal(err)
	}
	log = log.With("component", "test") // the flush survives With
	log.Info("before")
	log.Warn("certificate refresh failed")
	s, writes := out.snapshot()
	if !strings.Contains(s, `"msg":"before"`) || !strings.Contains(s, `"msg":"certificate refresh failed"`) || writes != 1 {
		t.Fatalf("after a warning: %d writes of %q, want both lines in one", writes, s)
	}
	log.Info("after")
	if err := w.Flush(); err != nil {
		t.Fatal(err)
	}
	if s, _ := out.snapshot(); !strings.Contains(s, `"msg":"after"`) {
		t.Fatalf("Flush did not write the pending line: %q", s)
	}
}

func TestLoggerWritesFullBatches(t *testing.T) {
	out := &lockedBuffer{}
	w := &batchWriter{w: out, delay: time.Hour, max: 1024}
	log, err := newLogger(w, "text", slog.LevelInfo)
	if err != nil {
		t.Fatal(err)
	}
	for range 100 {
		log.Info("connection complete", "src", "10.0.0.1:43210", "dst", "10.0.1.2:8080")
	}
	s, writes := out.snapshot()
	if writes < 5 || strings.Count(s, "\n") < 90 {
		t.Fatalf("100 lines over a 1 KiB batch: %d writes, %d lines written before any delay", writes, strings.Count(s, "\n"))
	}
}

func TestRunUntilSignalFlushes(t *testing.T) {
	out := &lockedBuffer{}
	saved := stderr
	stderr = &batchWriter{w: out, delay: time.Hour, max: 1 << 20}
	defer func() { stderr = saved }()
	log, err := Logger("text", "info")
	if err != nil {
		t.Fatal(err)
	}
	err = RunUntilSignal(func(context.Context) error {
		log.Info("last words")
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if s, _ := out.snapshot(); !strings.Contains(s, "last words") {
		t.Fatalf("RunUntilSignal returned with a line unwritten: %q", s)
	}
}

func TestLoggerRejectsBadFlags(t *testing.T) {
	if _, err := Logger("xml", "info"); err == nil {
		t.Error("-log-format xml accepted")
	}
	if _, err := Logger("text", "loud"); err == nil {
		t.Error("-log-level loud accepted")
	}
}
