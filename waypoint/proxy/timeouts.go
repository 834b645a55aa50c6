package proxy

import (
	"context"
	"errors"
	"net/http"
	"sync"
	"time"

	"github.com/amber-mesh/amber/tunnel/relay"
	"github.com/amber-mesh/amber/waypoint/route"
)

// Why a stream or an upstream attempt was ended early by a timer: the
// HCM's (Envoy's ActiveStream timers, source/common/http/conn_manager_impl.cc)
// end the stream, the router's (source/common/router/router.cc) the
// upstream request.
var (
	errStreamIdle        = errors.New("stream idle timeout")
	errRequestTimeout    = errors.New("request timeout")
	errStreamMaxDuration = errors.New("max stream duration reached")
	errRouteTimeout      = errors.New("route timeout")
	errPerTryTimeout     = errors.New("per-try timeout")
	errPerTryIdle        = errors.New("per-try idle timeout")
)

// upstreamTimeout reports whether cause is one of the router's timers,
// which Envoy answers 504 "upstream request timeout" (UT).
func upstreamTimeout(cause error) bool {
	return cause == errRouteTimeout || cause == errPerTryTimeout || cause == errPerTryIdle
}

// perTryTimers are one attempt's per_try_timeout and per_try_idle_timeout.
// Envoy arms both once the downstream request is complete and the
// attempt has its connection (for a waypoint, the internal connection to
// connect_originate, which is there at once: the HBONE dial counts); the
// per-try timeout then bounds the whole attempt, its response body
// included, while every upstream byte re-arms the idle one.
type perTryTimers struct {
	d      time.Duration
	cancel context.CancelCauseFunc
	idle   *relay.IdleTimer

	mu      sync.Mutex // guards the fields below
	t       *time.Timer
	stopped bool
}

// perTryTimers returns the attempt's timers, which end it through
// cancel; unarmed until start.
func (x *exchange) perTryTimers(p *route.RetryPolicy, cancel context.CancelCauseFunc) *perTryTimers {
	pt := &perTryTimers{cancel: cancel}
	if p == nil {
		return pt
	}
	pt.d = p.PerTryTimeout
	if p.PerTryIdleTimeout > 0 {
		pt.idle = relay.NewIdleTimer(p.PerTryIdleTimeout, func() { cancel(errPerTryIdle) })
	}
	return pt
}

// start arms the timers: the request is complete.
func (pt *perTryTimers) start() {
	pt.mu.Lock()
	defer pt.mu.Unlock()
	if pt.stopped {
		return
	}
	if pt.d > 0 && pt.t == nil {
		pt.t = time.AfterFunc(pt.d, func() { pt.cancel(errPerTryTimeout) })
	}
	pt.idle.Start()
}

// stop disarms the timers for good: the attempt is over.
func (pt *perTryTimers) stop() {
	pt.mu.Lock()
	defer pt.mu.Unlock()
	pt.stopped = true
	if pt.t != nil {
		pt.t.Stop()
	}
	pt.idle.Stop()
}

// streamTimers are one request's HCM timers: stream_idle_timeout (the
// route's idle_timeout in its place once routed), request_timeout (until
// the request is complete) and max_stream_duration (the route's in its
// place), the last two counted from the stream's start. The first to
// fire ends the stream's context with its cause: what the stream answers
// depends on how far it got (a 408 before the response started, a reset
// after), decided by the handler when what it waits for fails. The
// handler may be blocked where no context reaches: reading a request body
// the client stopped sending (Go's transport returns only once its body
// read does), or writing a response to a client that does not read; the
// expiry ends those reads and writes too.
type streamTimers struct {
	cancel       context.CancelCauseFunc
	unblockRead  func()
	unblockWrite func()
	idle         *relay.IdleTimer

	// mu guards the fields below, and is held while the unblock funcs
	// run so that none runs once stop returned (the handler is gone).
	mu       sync.Mutex
	request  *time.Timer
	duration *time.Timer
	ended    bool  // the whole request arrived
	started  bool  // the response header went out
	expired  error // the timer that fired
	stopped  bool
}

// timeouts are the stream timeouts in effect for a routed request.
type timeouts struct {
	idle, request, maxDuration time.Duration
}

// streamTimeouts are x's: the chain's HCM settings with the route's in
// their place, where it sets them (negative: turned off).
func (x *exchange) streamTimeouts() timeouts {
	t := timeouts{idle: x.hc.StreamIdleTimeout, request: x.hc.RequestTimeout, maxDuration: x.hc.MaxStreamDuration}
	if x.route != nil && x.route.Forward != nil {
		if d := x.route.Forward.IdleTimeout; d != 0 {
			t.idle = d
		}
		if d := x.route.Forward.MaxStreamDuration; d != 0 {
			t.maxDuration = d
		}
	}
	return t
}

// startTimers arms x's stream timers. The request and duration timers
// count from the stream's start (x.start); the idle timer from now, as
// Envoy re-arms it at route selection.
func (x *exchange) startTimers() {
	t := x.streamTimeouts()
	st := &streamTimers{cancel: x.cancel, unblockRead: x.unblockRead, unblockWrite: x.unblockWrite}
	x.timers = st
	x.w.timers = st
	ended := x.body.watch(st)
	st.mu.Lock()
	defer st.mu.Unlock()
	st.ended = ended
	if t.idle > 0 {
		st.idle = relay.NewIdleTimer(t.idle, func() { st.fire(errStreamIdle) })
		st.idle.Start()
	}
	if t.request > 0 && !ended {
		st.request = time.AfterFunc(t.request-time.Since(x.start), func() { st.fire(errRequestTimeout) })
	}
	if t.maxDuration > 0 {
		st.duration = time.AfterFunc(t.maxDuration-time.Since(x.start), func() { st.fire(errStreamMaxDuration) })
	}
}

// unblockRead ends a read of the request body in progress and any after
// it: the stream is answered or reset without the rest.
func (x *exchange) unblockRead() {
	if x.r.ProtoMajor == 1 {
		x.d.stream.SetReadDeadline(time.Now())
		return
	}
	_ = http.NewResponseController(x.w.ResponseWriter).SetReadDeadline(time.Now())
}

// unblockWrite ends a write to the client in progress and any after it:
// a timeout after the response started can only end the stream.
func (x *exchange) unblockWrite() {
	if x.r.ProtoMajor == 1 {
		x.d.stream.SetWriteDeadline(time.Now())
		return
	}
	// x/net/http2 resets the stream when its write deadline passes.
	_ = http.NewResponseController(x.w.ResponseWriter).SetWriteDeadline(time.Now())
}

// fire ends the stream with cause, once.
func (st *streamTimers) fire(cause error) {
	st.mu.Lock()
	defer st.mu.Unlock()
	if st.stopped || st.expired != nil {
		return
	}
	st.expired = cause
	st.cancel(cause)
	if !st.ended {
		st.unblockRead()
	}
	if st.started {
		st.unblockWrite()
	}
}

// touch notes activity on the stream: request or response bytes.
func (st *streamTimers) touch() {
	if st != nil {
		st.idle.Touch()
	}
}

// responseStarted notes that the response header went out, which
// disarms the request timeout (Envoy's request_timeout ends "when the
// response is initiated"); a timer that fired before then left the
// writing to the handler's reply, one that fires after ends the writes.
func (st *streamTimers) responseStarted() {
	if st == nil {
		return
	}
	st.mu.Lock()
	defer st.mu.Unlock()
	st.started = true
	if st.request != nil {
		st.request.Stop()
	}
	if st.expired != nil && !st.stopped {
		st.unblockWrite()
	}
}

// requestEnded disarms the request timeout: the whole request arrived.
func (st *streamTimers) requestEnded() {
	if st == nil {
		return
	}
	st.mu.Lock()
	defer st.mu.Unlock()
	st.ended = true
	if st.request != nil {
		st.request.Stop()
	}
}

// stop disarms every timer; the stream ended or was handed over.
func (st *streamTimers) stop() {
	if st == nil {
		return
	}
	st.mu.Lock()
	defer st.mu.Unlock()
	st.stopped = true
	st.idle.Stop()
	for _, t := range []*time.Timer{st.request, st.duration} {
		if t != nil {
			t.Stop()
		}
	}
}

// handOver stops x's stream timers for a relay that takes the stream
// over (an accepted upgrade), whose bytes they do not see, and starts
// their relay form: the idle timeout becomes the relay's, the maximum
// duration a timer closing it, so that an upgraded stream still ends as
// Envoy ends it (its HCM keeps both timers on upgraded streams). stop
// disarms the latter.
func (x *exchange) handOver(pair *relay.Pair) (stop func()) {
	x.timers.stop()
	t := x.streamTimeouts()
	if t.idle > 0 {
		pair.SetIdleTimeout(t.idle)
	}
	if t.maxDuration <= 0 {
		return func() {}
	}
	d := time.AfterFunc(t.maxDuration-time.Since(x.start), func() { pair.Close(errStreamMaxDuration) })
	return func() { d.Stop() }
}

// relayTimedOut records a relay of an accepted upgrade that its timers
// ended (err is the relay's).
func (x *exchange) relayTimedOut(err error) {
	switch {
	case errors.Is(err, relay.ErrIdleTimeout):
		x.flags |= flagSI
		x.cause = causeStreamIdle
	case errors.Is(err, errStreamMaxDuration):
		x.cause = causeStreamDuration
	}
}

// timedOut is the stream timeout that ended x, or nil.
func (x *exchange) timedOut() error {
	switch cause := context.Cause(x.ctx); cause {
	case errStreamIdle, errRequestTimeout, errStreamMaxDuration:
		return cause
	}
	return nil
}

// timeoutFlags are the response flags of a stream timeout: Envoy's SI
// for the idle timeout; the request timeout and the stream's maximum
// duration set none (DT is the connection's, max_connection_duration).
func timeoutFlags(cause error) flags {
	if cause == errStreamIdle {
		return flagSI
	}
	return 0
}

// timeoutReply answers a stream its timer ended before the response
// started, as Envoy's HCM does (onIdleTimeout, onRequestTimeout,
// onStreamMaxDurationReached): the timer's text, with 504 when the whole
// request had arrived and 408 when not, which also ends an HTTP/1
// connection, whose next request would start in the middle of this one's
// body (Http::Utility::maybeRequestTimeoutCode). For gRPC the duration's
// is DEADLINE_EXCEEDED.
func (x *exchange) timeoutReply(cause error) {
	// The reply is the handler's own: no timer may end its writes.
	x.timers.stop()
	x.err = cause
	x.flags |= timeoutFlags(cause)
	status := http.StatusGatewayTimeout
	if !x.body.ended() {
		status = http.StatusRequestTimeout
		x.closeConn = true
	}
	switch cause {
	case errStreamIdle:
		x.refuse(status, "stream timeout", causeStreamIdle)
	case errRequestTimeout:
		x.refuse(status, "request timeout", causeRequestTimeout)
	case errStreamMaxDuration:
		x.localGRPC = grpcDeadlineExceeded
		x.refuse(status, "downstream duration timeout", causeStreamDuration)
	}
}

// timeoutCause is the refusal cause of a stream timeout that ended a
// response already started.
func timeoutCause(cause error) string {
	switch cause {
	case errStreamIdle:
		return causeStreamIdle
	case errRequestTimeout:
		return causeRequestTimeout
	}
	return causeStreamDuration
}

// connectionDuration ends an inner connection gracefully once it has
// lived max (the HCM's max_connection_duration): as a drain, an idle
// HTTP/1 connection at once and a busy one after its current response,
// an HTTP/2 one with GOAWAY once its streams are done. The returned func
// stops the timer.
func (p *Proxy) connectionDuration(d *downstream, max time.Duration) (stop func()) {
	if max <= 0 {
		return func() {}
	}
	t := time.AfterFunc(max, func() {
		p.counts.refuse(causeConnDuration)
		d.drain()
	})
	return func() { t.Stop() }
}
