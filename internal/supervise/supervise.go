// Package supervise runs the long-lived parts of a binary as one unit:
// named tasks and the closers of the resources they use, started in
// order and stopped in reverse order, as Istio's ztunnel starts its
// components in app.rs and drains them on one signal in drain.rs.
//
// A binary's Run(ctx) builds a Group, registers each part as it sets it
// up, waits, and stops the Group:
//
//	func Run(ctx context.Context, cfg Config) (err error) {
//		g, ctx := supervise.New(ctx)
//		defer func() { err = errors.Join(err, g.Stop()) }()
//
//		srv, err := open(cfg) // a setup error returns; Stop undoes what was registered
//		if err != nil {
//			return err
//		}
//		g.Go("server", func(ctx context.Context) error { return srv.Serve(ctx) })
//		g.Defer("server", srv.Close) // after its task: Stop closes it, then waits for the task
//
//		return g.Wait() // until ctx is done (nil) or a task fails (its error)
//	}
//
// Rules:
//
//   - A task runs on its own goroutine with the Group's context. It
//     returns nil when it is done: a one-shot task (waiting for the first
//     configuration, say) ends without stopping anything. An error it
//     returns while the Group runs is a failure: the first one cancels
//     the Group's context, with the task's name in the error.
//   - Stop cancels the Group's context, so every task is told at once,
//     then walks the registrations from the last to the first: it calls
//     each closer and waits for each task. A resource is therefore
//     closed only after every task registered after it has returned, and
//     a task that ends only when its resource is closed (a server whose
//     Serve ignores contexts) is registered before its closer.
//   - Once the Group's context is done, a task that returns
//     context.Canceled, or the context's error or cause, has stopped as
//     asked. Anything else it returns, and every closer's error, is an
//     error of stopping: Stop joins them, each behind its name. A task
//     that ends on a closed resource reports its package's "closed"
//     sentinel as nil itself.
//   - Wait returning nil is the moment to drain: nothing is closed yet
//     (only the tasks that end with the context are ending), so Run can
//     hand its work over before it returns and the deferred Stop closes
//     everything. The ztunnel takes its listeners out of the datapath and
//     serves its open connections out there.
//   - Go and Defer are called by the goroutine that sets the Group up, not
//     from its tasks, and never after Stop; Stop must not be called from a
//     task (it would wait for itself).
package supervise

import (
	"context"
	"errors"
	"fmt"
	"sync"
)

// Group is a set of named tasks and closers; see the package
// documentation. The zero value is not usable: call New.
type Group struct {
	ctx    context.Context
	cancel context.CancelCauseFunc

	mu       sync.Mutex // guards the fields below
	members  []*member
	failure  error // the first task failure
	reported bool  // Wait returned failure
	stopping bool

	stopOnce sync.Once
}

// member is a registered task (done != nil) or closer (close != nil).
type member struct {
	name  string
	close func() error
	done  chan struct{} // closed when the task returned
	err   error         // the task's error of stopping; set before done closes
}

// New returns an empty Group and its context, a child of ctx that is
// cancelled when ctx is, when a task fails and when Stop begins.
func New(ctx context.Context) (*Group, context.Context) {
	ctx, cancel := context.WithCancelCause(ctx)
	return &Group{ctx: ctx, cancel: cancel}, ctx
}

// Go starts run on a goroutine of its own with the Group's context. Stop
// waits for it after the closers registered after it.
func (g *Group) Go(name string, run func(ctx context.Context) error) {
	m := &member{name: name, done: make(chan struct{})}
	g.add(m)
	go g.run(m, run)
}

// Defer registers close, which Stop calls after waiting for every task
// and calling every closer registered after it.
func (g *Group) Defer(name string, close func() error) {
	g.add(&member{name: name, close: close})
}

func (g *Group) add(m *member) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.stopping {
		panic("supervise: " + m.name + " registered after Stop")
	}
	g.members = append(g.members, m)
}

func (g *Group) run(m *member, run func(context.Context) error) {
	defer close(m.done)
	err := run(g.ctx)
	if err == nil || g.stoppedAsAsked(err) {
		return
	}
	err = fmt.Errorf("%s: %w", m.name, err)
	g.mu.Lock()
	first := g.failure == nil && g.ctx.Err() == nil
	if first {
		g.failure = err
	} else {
		m.err = err
	}
	g.mu.Unlock()
	if first {
		g.cancel(err)
	}
}

// stoppedAsAsked reports whether err is a task's answer to the end of the
// Group's context.
func (g *Group) stoppedAsAsked(err error) bool {
	if g.ctx.Err() == nil {
		return false
	}
	return errors.Is(err, context.Canceled) || errors.Is(err, g.ctx.Err()) || errors.Is(err, context.Cause(g.ctx))
}

// Wait blocks until the Group's context is done: the parent context
// ended (Wait returns nil) or a task failed (Wait returns its error, which
// Stop then leaves out). Wait does not stop anything.
func (g *Group) Wait() error {
	<-g.ctx.Done()
	g.mu.Lock()
	defer g.mu.Unlock()
	g.reported = g.failure != nil
	return g.failure
}

// Stop cancels the Group's context, then calls the closers and waits for
// the tasks, from the last registered to the first. It returns the
// failure that stopped the Group unless Wait returned it, and the errors
// of stopping, joined. Calls after the first do nothing and return nil,
// so a Run that stops its Group to look at the errors may also defer
// Stop for its early returns.
func (g *Group) Stop() error {
	var err error
	g.stopOnce.Do(func() {
		g.mu.Lock()
		g.stopping = true
		members := g.members
		g.mu.Unlock()
		g.cancel(nil)

		var errs []error
		for i := len(members) - 1; i >= 0; i-- {
			m := members[i]
			if m.close != nil {
				if err := m.close(); err != nil {
					errs = append(errs, fmt.Errorf("%s: %w", m.name, err))
				}
				continue
			}
			<-m.done
			errs = append(errs, m.err)
		}
		g.mu.Lock()
		if !g.reported {
			errs = append([]error{g.failure}, errs...)
		}
		g.mu.Unlock()
		err = errors.Join(errs...)
	})
	return err
}
