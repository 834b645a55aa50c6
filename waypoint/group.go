package waypoint

import (
	"context"
	"errors"
	"fmt"
	"sync"
)

// group supervises Run's parts: goroutines that run until the group
// stops (one failing stops it, with its error as the cause), and closers
// called in reverse order of registration when it stops.
type group struct {
	ctx    context.Context
	cancel context.CancelCauseFunc
	wg     sync.WaitGroup

	mu      sync.Mutex // guards closers
	closers []namedCloser
}

type namedCloser struct {
	name  string
	close func() error
}

func newGroup(ctx context.Context) *group {
	g := &group{}
	g.ctx, g.cancel = context.WithCancelCause(ctx)
	return g
}

// Go runs fn; an error it returns before the group stops stops the group.
func (g *group) Go(name string, fn func(ctx context.Context) error) {
	g.wg.Go(func() {
		if err := fn(g.ctx); err != nil && g.ctx.Err() == nil {
			g.cancel(fmt.Errorf("%s: %w", name, err))
		}
	})
}

// OnStop registers close to run when the group stops, before the closers
// registered earlier.
func (g *group) OnStop(name string, close func() error) {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.closers = append(g.closers, namedCloser{name, close})
}

// Err is why the group stopped early: a part's failure, or nil when it
// was stopped from outside (the parent context) or is still running.
func (g *group) Err() error {
	cause := context.Cause(g.ctx)
	if cause == nil || errors.Is(cause, context.Canceled) || errors.Is(cause, context.DeadlineExceeded) {
		return nil
	}
	return cause
}

// Stop cancels the group, closes its parts in reverse order and waits for
// its goroutines; it returns the closers' errors joined.
func (g *group) Stop() error {
	g.cancel(nil)
	g.mu.Lock()
	closers := g.closers
	g.closers = nil
	g.mu.Unlock()
	var errs []error
	for i := len(closers) - 1; i >= 0; i-- {
		if err := closers[i].close(); err != nil {
			errs = append(errs, fmt.Errorf("close %s: %w", closers[i].name, err))
		}
	}
	g.wg.Wait()
	return errors.Join(errs...)
}
