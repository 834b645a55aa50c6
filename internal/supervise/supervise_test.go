package supervise

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"testing"
	"testing/synctest"
	"time"
)

// events records what the members did, in order.
type events struct {
	mu   sync.Mutex
	list []string
}

func (e *events) add(s string) {
	e.mu.Lock()
	e.list = append(e.list, s)
	e.mu.Unlock()
}

func (e *events) get() []string {
	e.mu.Lock()
	defer e.mu.Unlock()
	return slices.Clone(e.list)
}

// waitTask blocks until its context is done, records name, and returns
// the context's error: a well-behaved component.
func waitTask(ev *events, name string) func(context.Context) error {
	return func(ctx context.Context) error {
		<-ctx.Done()
		ev.add(name + " returned")
		return ctx.Err()
	}
}

func closer(ev *events, name string, err error) func() error {
	return func() error {
		ev.add(name + " closed")
		return err
	}
}

func TestFirstFailureStopsTheRest(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		boom := errors.New("boom")
		var ev events
		g, ctx := New(t.Context())
		g.Go("steady", waitTask(&ev, "steady"))
		fail := make(chan struct{})
		g.Go("flaky", func(context.Context) error {
			<-fail
			return boom
		})
		g.Go("late", func(ctx context.Context) error {
			<-ctx.Done()
			return errors.New("late failure") // while stopping: not the failure
		})

		synctest.Wait()
		if ctx.Err() != nil {
			t.Fatal("group stopped before any task failed")
		}
		close(fail)
		err := g.Wait()
		if !errors.Is(err, boom) || err.Error() != "flaky: boom" {
			t.Fatalf("Wait = %v, want flaky: boom", err)
		}
		if !errors.Is(context.Cause(ctx), boom) {
			t.Errorf("context cause = %v, want the failure", context.Cause(ctx))
		}
		err = g.Stop()
		if errors.Is(err, boom) {
			t.Errorf("Stop repeated the failure Wait returned: %v", err)
		}
		if err == nil || err.Error() != "late: late failure" {
			t.Errorf("Stop = %v, want the error of stopping late", err)
		}
		if got := ev.get(); !slices.Equal(got, []string{"steady returned"}) {
			t.Errorf("events %q", got)
		}
	})
}

// Stop closes and waits from the last registration to the first: a
// resource is closed only after the tasks registered after it returned.
func TestStopOrder(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		var ev events
		g, _ := New(t.Context())
		g.Defer("store", closer(&ev, "store", nil))
		g.Go("client", func(ctx context.Context) error {
			<-ctx.Done()
			// Slow to stop: the store must stay open until it returns.
			time.Sleep(time.Second)
			ev.add("client returned")
			return nil
		})
		g.Defer("client", closer(&ev, "client", nil))
		served := make(chan struct{})
		g.Go("server", func(context.Context) error {
			<-served // ends only when closed, whatever its context says
			ev.add("server returned")
			return nil
		})
		g.Defer("server", func() error {
			ev.add("server closed")
			close(served)
			return nil
		})

		if err := g.Stop(); err != nil {
			t.Fatal(err)
		}
		want := []string{"server closed", "server returned", "client closed", "client returned", "store closed"}
		if got := ev.get(); !slices.Equal(got, want) {
			t.Errorf("stop order\n got %q\nwant %q", got, want)
		}
	})
}

func TestCloseErrorsJoinedWithNames(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		e1, e2 := errors.New("flush failed"), errors.New("unpin failed")
		var ev events
		g, _ := New(t.Context())
		g.Defer("datapath", closer(&ev, "datapath", e1))
		g.Defer("log", closer(&ev, "log", nil))
		g.Defer("pins", closer(&ev, "pins", e2))
		err := g.Stop()
		if !errors.Is(err, e1) || !errors.Is(err, e2) {
			t.Fatalf("Stop = %v, want both errors", err)
		}
		if want := "pins: unpin failed\ndatapath: flush failed"; err.Error() != want {
			t.Errorf("Stop = %q, want %q", err, want)
		}
		if got := ev.get(); !slices.Equal(got, []string{"pins closed", "log closed", "datapath closed"}) {
			t.Errorf("every closer runs, in reverse: %q", got)
		}
	})
}

// A task that answers the end of the context with the context's error,
// its cause or context.Canceled has stopped as asked.
func TestParentEndIsNoFailure(t *testing.T) {
	for _, tc := range []struct {
		name   string
		parent func(context.Context) (context.Context, func())
	}{
		{"cancel", func(ctx context.Context) (context.Context, func()) {
			ctx, cancel := context.WithCancel(ctx)
			return ctx, cancel
		}},
		{"cause", func(ctx context.Context) (context.Context, func()) {
			ctx, cancel := context.WithCancelCause(ctx)
			return ctx, func() { cancel(errors.New("SIGTERM")) }
		}},
		{"deadline", func(ctx context.Context) (context.Context, func()) {
			ctx, cancel := context.WithTimeout(ctx, time.Minute)
			return ctx, func() { time.Sleep(time.Minute); cancel() }
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				parent, end := tc.parent(t.Context())
				g, _ := New(parent)
				g.Go("err", func(ctx context.Context) error { <-ctx.Done(); return ctx.Err() })
				g.Go("cause", func(ctx context.Context) error { <-ctx.Done(); return context.Cause(ctx) })
				g.Go("wrapped", func(ctx context.Context) error {
					<-ctx.Done()
					return fmt.Errorf("watch: %w", context.Canceled)
				})
				end()
				if err := g.Wait(); err != nil {
					t.Errorf("Wait = %v", err)
				}
				if err := g.Stop(); err != nil {
					t.Errorf("Stop = %v", err)
				}
			})
		})
	}
}

// A task that is done returns nil and stops nothing.
func TestOneShotTask(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		var ev events
		g, ctx := New(t.Context())
		g.Go("ready", func(context.Context) error { ev.add("ready"); return nil })
		g.Go("serve", waitTask(&ev, "serve"))
		synctest.Wait()
		if ctx.Err() != nil {
			t.Fatal("a task that returned nil stopped the group")
		}
		if err := g.Stop(); err != nil {
			t.Fatal(err)
		}
		if got := ev.get(); !slices.Equal(got, []string{"ready", "serve returned"}) {
			t.Errorf("events %q", got)
		}
	})
}

// Wait blocks while the tasks run; a setup that returns early without
// calling Wait still gets the failure from Stop.
func TestWaitBlocksAndStopReportsAnUnwaitedFailure(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		boom := errors.New("boom")
		g, _ := New(t.Context())
		fail := make(chan struct{})
		g.Go("task", func(context.Context) error { <-fail; return boom })
		returned := make(chan error, 1)
		go func() { returned <- g.Wait() }()
		synctest.Wait()
		select {
		case err := <-returned:
			t.Fatalf("Wait returned %v while every task ran", err)
		default:
		}
		close(fail)
		if err := <-returned; !errors.Is(err, boom) {
			t.Fatalf("Wait = %v", err)
		}

		g2, _ := New(t.Context())
		g2.Go("task", func(context.Context) error { return boom })
		synctest.Wait()
		if err := g2.Stop(); err == nil || err.Error() != "task: boom" {
			t.Errorf("Stop without Wait = %v, want the failure", err)
		}
	})
}

func TestStopOnce(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		calls := 0
		g, _ := New(t.Context())
		g.Defer("x", func() error { calls++; return errors.New("x failed") })
		first, second := g.Stop(), g.Stop()
		if calls != 1 || first == nil || second != nil {
			t.Errorf("closer called %d times; Stop returned %v, then %v", calls, first, second)
		}
		defer func() {
			if r := recover(); r == nil || !strings.Contains(fmt.Sprint(r), "late") {
				t.Errorf("Go after Stop: recovered %v, want a panic naming the task", r)
			}
		}()
		g.Go("late", func(context.Context) error { return nil })
	})
}
