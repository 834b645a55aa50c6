package capture

import (
	"context"
	"sync"
	"time"
)

// queue is a set of keys waiting for work, in arrival order, with
// delayed re-adds for retries. A key queued twice is worked once.
type queue struct {
	mu      sync.Mutex // guards the fields below
	order   []string
	pending map[string]bool
	timers  map[string]*time.Timer
	wake    chan struct{}
}

func newQueue() *queue {
	return &queue{pending: map[string]bool{}, timers: map[string]*time.Timer{}, wake: make(chan struct{}, 1)}
}

func (q *queue) add(keys ...string) {
	if len(keys) == 0 {
		return
	}
	q.mu.Lock()
	for _, k := range keys {
		if !q.pending[k] {
			q.pending[k] = true
			q.order = append(q.order, k)
		}
	}
	q.mu.Unlock()
	select {
	case q.wake <- struct{}{}:
	default:
	}
}

// addAfter queues key after d unless a sooner retry is already set.
func (q *queue) addAfter(key string, d time.Duration) {
	q.mu.Lock()
	defer q.mu.Unlock()
	if _, ok := q.timers[key]; ok {
		return
	}
	q.timers[key] = time.AfterFunc(d, func() {
		q.mu.Lock()
		delete(q.timers, key)
		q.mu.Unlock()
		q.add(key)
	})
}

// get blocks for the next key; false once ctx is done.
func (q *queue) get(ctx context.Context) (string, bool) {
	for {
		q.mu.Lock()
		if len(q.order) > 0 {
			k := q.order[0]
			q.order = q.order[1:]
			delete(q.pending, k)
			q.mu.Unlock()
			return k, true
		}
		q.mu.Unlock()
		select {
		case <-ctx.Done():
			q.stop()
			return "", false
		case <-q.wake:
		}
	}
}

func (q *queue) stop() {
	q.mu.Lock()
	defer q.mu.Unlock()
	for k, t := range q.timers {
		t.Stop()
		delete(q.timers, k)
	}
}

// backoff is the retry delay after n consecutive failures: 100 ms
// doubling up to 30 s.
func backoff(n int) time.Duration {
	d := 100 * time.Millisecond
	for i := 1; i < n && d < 30*time.Second; i++ {
		d *= 2
	}
	return min(d, 30*time.Second)
}
