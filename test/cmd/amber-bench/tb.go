package main

import (
	"errors"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"testing"
)

// benchTB lets a benchmark build its bed with the constructors the tests
// use (test/istiodbed, test/kube, test/istiod), which take a testing.TB,
// outside `go test`: Fatal and Skip end the setup through a panic that
// withTB recovers, and the cleanups run in reverse order when withTB
// returns, also on failure, so namespaces, pins and processes go away.
// Only the main goroutine may call Fatal (the constructors do).
type benchTB struct {
	// testing.TB is nil: its unexported method makes embedding the only
	// way to satisfy the interface; every method the constructors call is
	// defined below, and another one would panic.
	testing.TB
	name string
	dir  string

	mu       sync.Mutex // guards the fields below
	cleanups []func()
	errs     []error
	tmp      int
}

// failNow is the panic value of Fatal and Skip.
type failNow struct{}

// withTB runs f with a benchTB named name and returns the errors it
// reported, after running its cleanups.
func withTB(name string, f func(tb testing.TB) error) (err error) {
	// The constructors read testing.Short, which wants the testing flags
	// registered and parsed; this command's own come after its mode.
	testing.Init()
	if err := flag.CommandLine.Parse(nil); err != nil {
		return err
	}
	dir, err := os.MkdirTemp("", "amber-bench-"+name+"-")
	if err != nil {
		return err
	}
	tb := &benchTB{name: name, dir: dir}
	defer func() {
		if r := recover(); r != nil {
			if _, ok := r.(failNow); !ok {
				tb.runCleanups()
				panic(r)
			}
		}
		tb.runCleanups()
		tb.mu.Lock()
		err = errors.Join(append(tb.errs, err, os.RemoveAll(dir))...)
		tb.mu.Unlock()
	}()
	return f(tb)
}

func (tb *benchTB) runCleanups() {
	for {
		tb.mu.Lock()
		n := len(tb.cleanups)
		if n == 0 {
			tb.mu.Unlock()
			return
		}
		f := tb.cleanups[n-1]
		tb.cleanups = tb.cleanups[:n-1]
		tb.mu.Unlock()
		f()
	}
}

func (tb *benchTB) Helper()      {}
func (tb *benchTB) Name() string { return tb.name }

func (tb *benchTB) Cleanup(f func()) {
	tb.mu.Lock()
	defer tb.mu.Unlock()
	tb.cleanups = append(tb.cleanups, f)
}

func (tb *benchTB) TempDir() string {
	tb.mu.Lock()
	tb.tmp++
	d := filepath.Join(tb.dir, fmt.Sprint(tb.tmp))
	tb.mu.Unlock()
	if err := os.Mkdir(d, 0o700); err != nil {
		tb.Fatal(err)
	}
	return d
}

func (tb *benchTB) Log(args ...any)                 { fmt.Fprintln(os.Stderr, args...) }
func (tb *benchTB) Logf(format string, args ...any) { fmt.Fprintf(os.Stderr, format+"\n", args...) }

func (tb *benchTB) Error(args ...any) { tb.fail(errors.New(fmt.Sprint(args...))) }
func (tb *benchTB) Errorf(format string, args ...any) {
	tb.fail(fmt.Errorf(format, args...))
}

func (tb *benchTB) Fatal(args ...any) {
	tb.Error(args...)
	panic(failNow{})
}

func (tb *benchTB) Fatalf(format string, args ...any) {
	tb.Errorf(format, args...)
	panic(failNow{})
}

func (tb *benchTB) FailNow() {
	tb.fail(errors.New("failed"))
	panic(failNow{})
}

// A benchmark that cannot run is an error, not a skip.
func (tb *benchTB) Skip(args ...any) { tb.Fatal(append([]any{"cannot run: "}, args...)...) }
func (tb *benchTB) Skipf(format string, args ...any) {
	tb.Fatalf("cannot run: "+format, args...)
}

func (tb *benchTB) Failed() bool {
	tb.mu.Lock()
	defer tb.mu.Unlock()
	return len(tb.errs) > 0
}

func (tb *benchTB) fail(err error) {
	tb.mu.Lock()
	defer tb.mu.Unlock()
	tb.errs = append(tb.errs, err)
}
