package supervise_test

import (
	"context"
	"errors"
	"fmt"

	"github.com/amber-mesh/amber/internal/supervise"
)

// A binary's Run: a resource, a server using it whose Serve ends only when
// it is closed, and a watcher that ends with its context. A failure of
// any task, or the end of ctx, stops all three: the server is closed and
// waited for, then the watcher is waited for, then the resource is
// closed.
func Example() {
	run := func(ctx context.Context, failWatch bool) (err error) {
		g, ctx := supervise.New(ctx)
		defer func() { err = errors.Join(err, g.Stop()) }()

		g.Defer("store", func() error { fmt.Println("store closed"); return nil })
		g.Go("watcher", func(ctx context.Context) error {
			if failWatch {
				return errors.New("stream reset")
			}
			<-ctx.Done()
			return ctx.Err() // stopped as asked: not an error
		})
		closed := make(chan struct{})
		g.Go("server", func(context.Context) error {
			<-closed
			fmt.Println("server returned")
			return nil
		})
		g.Defer("server", func() error { close(closed); return nil })

		return g.Wait()
	}

	ctx, cancel := context.WithCancel(context.Background())
	cancel() // SIGTERM
	fmt.Println("run:", run(ctx, false))
	fmt.Println("run:", run(context.Background(), true))
	// Output:
	// server returned
	// store closed
	// run: <nil>
	// server returned
	// store closed
	// run: watcher: stream reset
}
