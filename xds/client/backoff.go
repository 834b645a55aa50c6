package client

import (
	"math/rand/v2"
	"time"
)

// backoff is capped exponential backoff with "equal jitter": each delay is
// uniform in [d/2, d], so ztunnels that lost the same istiod do not all
// come back in the same instant, yet none retries sooner than d/2.
type backoff struct {
	initial, max time.Duration
	cur          time.Duration
}

func (b *backoff) reset() { b.cur = 0 }

func (b *backoff) next() time.Duration {
	switch {
	case b.cur == 0:
		b.cur = b.initial
	case b.cur < b.max:
		b.cur = min(2*b.cur, b.max)
	}
	half := b.cur / 2
	return half + rand.N(b.cur-half+1)
}
