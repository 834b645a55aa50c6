package proxy

import (
	"errors"
	"io"
	"net/http"
	"sync"
)

// errBodyTooLarge ends a request whose body grew past
// Limits.MaxRequestBodyBytes; errStaleAttempt the body of an attempt a
// retry replaced (a transport may still read it after it gave up).
var (
	errBodyTooLarge = errors.New("request body over the configured limit")
	errStaleAttempt = errors.New("request body of an abandoned attempt")
)

// requestBody is a request's body as the upstream attempts read it: it
// counts the bytes received, enforces the body limit, reports the end of
// the request (when Envoy's route timeout starts) and keeps the first
// RetryBufferBytes so that a retry can send them again.
type requestBody struct {
	src   io.ReadCloser
	limit int64
	keep  int

	mu       sync.Mutex // guards the fields below
	onEnd    []func()   // run once when the whole body arrived
	timers   *streamTimers
	n        int64
	kept     []byte
	overflow bool // more was read than kept: no replay
	eof      bool
	err      error
	gen      int
}

func newRequestBody(x *exchange, r *http.Request) *requestBody {
	b := &requestBody{src: r.Body, limit: x.p.lim.MaxRequestBodyBytes, keep: x.p.lim.RetryBufferBytes}
	if r.Body == nil || r.Body == http.NoBody {
		b.eof = true
	}
	return b
}

// watch tells timers of the body's bytes and end from now on, and
// reports whether it ended already.
func (b *requestBody) watch(timers *streamTimers) (ended bool) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.timers = timers
	return b.eof
}

// whenEnded runs f once the whole body has arrived: now if it has, else
// from the read that sees its end. Envoy starts the route timeout and the
// per-try timers only once the downstream request is complete.
func (b *requestBody) whenEnded(f func()) {
	b.mu.Lock()
	if !b.eof {
		b.onEnd = append(b.onEnd, f)
		b.mu.Unlock()
		return
	}
	b.mu.Unlock()
	f()
}

// empty reports whether the request has no body at all.
func (b *requestBody) empty() bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.eof && b.n == 0
}

// received is the number of body bytes read from the client.
func (b *requestBody) received() int64 {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.n
}

// ended reports whether the whole body was received.
func (b *requestBody) ended() bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.eof
}

// replayable reports whether a new attempt can send the body from its
// start.
func (b *requestBody) replayable() bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	return !b.overflow && b.err == nil
}

// attempt returns the body reader of a new attempt; earlier attempts'
// readers fail from now on.
func (b *requestBody) attempt() io.ReadCloser {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.gen++
	if b.eof && b.n == 0 {
		return http.NoBody
	}
	return &attemptBody{b: b, gen: b.gen}
}

type attemptBody struct {
	b   *requestBody
	gen int
	off int
}

func (a *attemptBody) Read(p []byte) (int, error) {
	b := a.b
	b.mu.Lock()
	if a.gen != b.gen {
		b.mu.Unlock()
		return 0, errStaleAttempt
	}
	if a.off < len(b.kept) {
		n := copy(p, b.kept[a.off:])
		a.off += n
		b.mu.Unlock()
		return n, nil
	}
	if b.eof {
		b.mu.Unlock()
		return 0, io.EOF
	}
	if b.err != nil {
		err := b.err
		b.mu.Unlock()
		return 0, err
	}
	b.mu.Unlock()

	// Reading from the client happens without the lock: only the
	// current attempt reads, and a retry starts only after the attempt
	// it replaces returned.
	n, err := b.src.Read(p)

	b.mu.Lock()
	defer b.mu.Unlock()
	b.n += int64(n)
	if n > 0 {
		b.timers.touch()
	}
	if b.limit > 0 && b.n > b.limit {
		b.err = errBodyTooLarge
		return 0, b.err
	}
	if !b.overflow && len(b.kept)+n <= b.keep {
		b.kept = append(b.kept, p[:n]...)
		a.off = len(b.kept)
	} else {
		b.overflow, b.kept = true, nil
		a.off = 0
	}
	switch {
	case err == io.EOF:
		b.eof = true
		b.timers.requestEnded()
		for _, f := range b.onEnd {
			f()
		}
		b.onEnd = nil
	case err != nil:
		b.err = err
	}
	return n, err
}

func (a *attemptBody) Close() error { return nil }
