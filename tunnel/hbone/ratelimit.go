package hbone

import "time"

// rateLimit is a token bucket: burst events at once, refilled at rate per
// second. It belongs to one goroutine (a connection's reader) and takes no
// lock.
type rateLimit struct {
	tokens float64
	last   time.Time
	rate   float64
	burst  float64
}

func newRateLimit(burst, perSecond float64) rateLimit {
	return rateLimit{tokens: burst, rate: perSecond, burst: burst}
}

// allow spends one token and reports whether there was one.
func (r *rateLimit) allow(now time.Time) bool {
	if !r.last.IsZero() {
		r.tokens = min(r.burst, r.tokens+now.Sub(r.last).Seconds()*r.rate)
	}
	r.last = now
	if r.tokens < 1 {
		return false
	}
	r.tokens--
	return true
}
