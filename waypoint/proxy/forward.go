package proxy

import (
	"context"
	"errors"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"net/http/httptrace"
	"net/netip"
	"net/textproto"
	"net/url"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"

	"golang.org/x/net/http2"

	"github.com/amber-mesh/amber/tunnel/relay"
	"github.com/amber-mesh/amber/waypoint/config"
	"github.com/amber-mesh/amber/waypoint/route"
	"github.com/amber-mesh/amber/waypoint/telemetry"
	"github.com/amber-mesh/amber/xds/state"
)

// bodyBuffers hold the 32 KiB a response body is copied through, so that
// a request does not allocate and clear one.
var bodyBuffers = sync.Pool{New: func() any {
	b := make([]byte, 32<<10)
	return &b
}}

// result is how one upstream attempt ended.
type result struct {
	resp    *http.Response
	outcome route.Outcome
	err     error
	timeout bool // the route's or a per-try timeout
	perTry  bool // a per-try timeout: retried as a reset is
	start   time.Time
	conn    net.Conn         // the upstream connection the response came on
	ctx     context.Context  // the attempt's, which the response body reads under
	idle    *relay.IdleTimer // the attempt's per-try idle timer, touched by upstream bytes; nil: none
	done    func()           // releases the attempt's context and endpoint count
}

// forward is Envoy's router: pick the cluster, then endpoints, attempts
// and retries as the route's policy says, and stream the response back.
func (x *exchange) forward() *upgrade {
	snap := x.p.snapshot()
	f := x.route.Forward
	name, wc, ok := f.Pick(rand.Uint64())
	if !ok {
		// Every weight is zero: istiod's conversion means 500.
		x.flags |= flagNC
		x.refuse(http.StatusInternalServerError, "", causeNoCluster)
		return nil
	}
	x.cluster = name
	cl := x.resolveCluster(snap, name)
	if cl == nil {
		x.flags |= flagNC
		x.refuse(f.ClusterNotFound, "", causeNoCluster)
		return nil
	}
	if cl.ServiceMeta.Host != "" {
		x.service = telemetry.Service{Host: cl.ServiceMeta.Host, Name: cl.ServiceMeta.Name, Namespace: cl.ServiceMeta.Namespace}
	}
	if cl.Err != nil {
		x.err = cl.Err
		x.flags |= flagUH
		x.refuse(http.StatusServiceUnavailable, bodyNoHealthy, causeClusterRefused)
		return nil
	}
	cs := x.p.clusterState(name)
	if !acquire(&cs.requests, cl.Limits.MaxRequests) {
		x.flags |= flagUO
		x.refuse(http.StatusServiceUnavailable, bodyUpstreamErr+"overflow", causeOverflow)
		return nil
	}
	defer cs.requests.Add(-1)

	// The route timeout runs from the end of the request (Envoy starts it
	// once the downstream request is complete) to the end of the response.
	ctx, cancel := context.WithCancelCause(x.ctx)
	defer cancel(nil)
	timeout := x.routeTimeout()
	var timer *time.Timer
	var timerMu sync.Mutex
	startTimer := func() {
		if timeout <= 0 {
			return
		}
		timerMu.Lock()
		defer timerMu.Unlock()
		if timer == nil {
			timer = time.AfterFunc(timeout, func() { cancel(errRouteTimeout) })
		}
	}
	defer func() {
		timerMu.Lock()
		if timer != nil {
			timer.Stop()
		}
		timerMu.Unlock()
	}()
	x.body.whenEnded(startTimer)

	hdr := x.upstreamHeader(wc, timeout)
	policy := x.route.RetryPolicy()
	maxAttempts := 1
	if policy != nil {
		maxAttempts += int(policy.NumRetries)
	}
	upH2 := cl.Protocol == config.UpstreamHTTP2 || (cl.Protocol == config.UpstreamAsDownstream && x.r.ProtoMajor == 2)
	if x.upgrade != "" {
		upH2 = false
	}
	rt := x.p.transport(cs, cl, snap.cfg.Originate, upH2)
	var avoid map[netip.AddrPort]bool
	var last result
	for {
		ep, ok := cs.pick(cl, avoid)
		if !ok {
			// Only on the first pick: a retry falls back to hosts already
			// tried rather than finding none.
			x.flags |= flagUH
			x.refuse(http.StatusServiceUnavailable, bodyNoHealthy, causeNoHealthy)
			return nil
		}
		x.attempts++
		x.endpoint = ep.Address
		x.dst = destinationPeer(x.p.cfg.Store.Load(), ep)
		res := x.try(ctx, cs, cl, ep, rt, hdr, snap.cfg.Originate, policy)
		last = res
		retry := policy.Retriable(res.outcome) && !res.timeout
		if res.perTry && context.Cause(ctx) != errRouteTimeout {
			// A per-try timeout, idle or not, is retried as the reset
			// of a request already sent is (Envoy's onPerTryTimeout:
			// retry_on 5xx, gateway-error or reset).
			retry = policy.Retriable(route.Outcome{Reset: true, RequestSent: true})
		}
		if !retry || x.attempts >= maxAttempts || !x.body.replayable() || ctx.Err() != nil {
			if retry && x.attempts >= maxAttempts && maxAttempts > 1 {
				x.flags |= flagURX
			}
			break
		}
		if !acquire(&cs.retries, cl.Limits.MaxRetries) {
			break
		}
		if res.resp != nil {
			io.Copy(io.Discard, io.LimitReader(res.resp.Body, 64<<10))
			res.resp.Body.Close()
		}
		res.done()
		if policy.PreviousHosts {
			if avoid == nil {
				avoid = map[netip.AddrPort]bool{}
			}
			avoid[ep.Address] = true
		}
		wait := backoff(policy, x.attempts)
		select {
		case <-time.After(wait):
		case <-ctx.Done():
		}
		cs.retries.Add(-1)
		if ctx.Err() != nil {
			last = result{err: context.Cause(ctx), timeout: context.Cause(ctx) == errRouteTimeout, done: func() {}}
			break
		}
	}
	defer last.done()
	if last.resp != nil {
		return x.respond(ctx, last, wc)
	}
	x.failed(last)
	return nil
}

// backoff is Envoy's jittered exponential back-off before retry n (from
// 1): a random time below base·2^(n-1), capped at the maximum.
func backoff(p *route.RetryPolicy, n int) time.Duration {
	if p.BackOffBase <= 0 {
		return 0
	}
	d := p.BackOffBase << min(n-1, 20)
	if p.BackOffMax > 0 && d > p.BackOffMax {
		d = p.BackOffMax
	}
	return time.Duration(rand.Int64N(int64(d)))
}

// upstreamHeader is the request header to send upstream: the sanitised
// client header with the weighted cluster's, the route's, the virtual
// host's and the configuration's mutations, and the router's
// x-envoy-expected-rq-timeout-ms.
func (x *exchange) upstreamHeader(wc *route.WeightedCluster, t time.Duration) http.Header {
	h := x.r.Header.Clone()
	if wc != nil {
		wc.RequestHeaders.Apply(h)
	}
	for _, m := range x.route.RequestMutations() {
		m.Apply(h)
	}
	if p := x.route.RetryPolicy(); p != nil && p.PerTryTimeout > 0 && (t == 0 || p.PerTryTimeout < t) {
		t = p.PerTryTimeout
	}
	if t > 0 {
		h.Set("X-Envoy-Expected-Rq-Timeout-Ms", strconv.FormatInt(t.Milliseconds(), 10))
	}
	if _, ok := h["User-Agent"]; !ok {
		// Go's transports add their own User-Agent unless the field is
		// present; an empty one is not sent.
		h["User-Agent"] = []string{""}
	}
	return h
}

// routeTimeout is the request's timeout: the route's (zero: none), or for
// a gRPC request with a grpc-timeout header when the route honours it
// (istiod's max_grpc_timeout: 0s, uncapped) that deadline, capped by the
// route's maximum (Envoy's Router::FilterUtility::finalTimeout).
func (x *exchange) routeTimeout() time.Duration {
	f := x.route.Forward
	t := f.Timeout
	if !f.HonorGRPCTimeout || !x.grpc {
		return t
	}
	g, ok := grpcTimeout(x.r.Header.Get("Grpc-Timeout"))
	if !ok {
		return t
	}
	if f.MaxGRPCTimeout > 0 && g > f.MaxGRPCTimeout {
		g = f.MaxGRPCTimeout
	}
	return g
}

// grpcTimeout parses gRPC's timeout header: at most 8 digits and a unit
// (H, M, S, m, u, n). A value of 0 means no timeout, as in Envoy.
func grpcTimeout(v string) (time.Duration, bool) {
	if len(v) < 2 || len(v) > 9 {
		return 0, false
	}
	n, err := strconv.ParseInt(v[:len(v)-1], 10, 64)
	if err != nil || n < 0 {
		return 0, false
	}
	unit := map[byte]time.Duration{'H': time.Hour, 'M': time.Minute, 'S': time.Second, 'm': time.Millisecond, 'u': time.Microsecond, 'n': time.Nanosecond}[v[len(v)-1]]
	if unit == 0 {
		return 0, false
	}
	return time.Duration(n) * unit, true
}

// try runs one attempt to ep.
func (x *exchange) try(ctx context.Context, cs *clusterState, cl *config.Cluster, ep config.Endpoint, rt http.RoundTripper, hdr http.Header, orig *config.Originate, policy *route.RetryPolicy) result {
	maxPerConn := cl.MaxRequestsPerConnection
	actx, cancel := context.WithCancelCause(ctx)
	pt := x.perTryTimers(policy, cancel)
	t := &dialTarget{ep: ep, connectTimeout: cl.ConnectTimeout}
	if orig != nil {
		t.originatePort = orig.Port
	}
	if x.d.gateway != "" {
		t.gatewayTD = x.p.gatewayTrustDomain(orig)
	}
	var sentMu sync.Mutex
	sent := false
	var req *http.Request
	var conn net.Conn
	trace := &httptrace.ClientTrace{
		GotConn: func(info httptrace.GotConnInfo) {
			conn = info.Conn
			// max_requests_per_connection: the Nth request on a connection
			// asks for it to close (Connection: close; HTTP/2 does not
			// reuse it). GotConn runs before the request is written.
			if cc, ok := info.Conn.(*countedConn); ok && maxPerConn > 0 && cc.n.Add(1) >= int64(maxPerConn) {
				req.Close = true
			}
		},
		WroteRequest: func(httptrace.WroteRequestInfo) {
			sentMu.Lock()
			sent = true
			sentMu.Unlock()
		},
		Got1xxResponse: func(code int, h textproto.MIMEHeader) error {
			// Envoy proxies 100-continue (istiod sets proxy_100_continue)
			// and other informational responses.
			if x.w.started() {
				return nil
			}
			dst := x.w.Header()
			for k, v := range h {
				dst[k] = v
			}
			x.w.WriteHeader(code)
			x.w.Flush()
			for k := range dst {
				delete(dst, k)
			}
			return nil
		},
	}
	actx = httptrace.WithClientTrace(context.WithValue(actx, dialKey{}, t), trace)
	req = x.upstreamRequest(actx, ep, hdr)
	cs.begin(ep.Address)
	res := result{start: time.Now(), ctx: actx, idle: pt.idle}
	res.done = func() {
		pt.stop()
		cancel(nil)
		cs.end(ep.Address)
	}
	x.body.whenEnded(pt.start)
	resp, err := rt.RoundTrip(req)
	if err == nil {
		pt.idle.Touch()
		x.upstreamMs = time.Since(res.start).Milliseconds()
		res.resp = resp
		res.conn = conn
		res.outcome = route.Outcome{Status: resp.StatusCode, GRPCStatus: resp.Header.Get("Grpc-Status")}
		return res
	}
	res.err = err
	sentMu.Lock()
	res.outcome.RequestSent = sent
	sentMu.Unlock()
	var de *dialError
	var se http2.StreamError
	cause := context.Cause(actx)
	switch {
	case upstreamTimeout(cause):
		res.timeout = true
		res.perTry = cause != errRouteTimeout
		res.err = cause
	case errors.As(err, &de):
		res.outcome.ConnectFailure = true
	case errors.As(err, &se) && se.Code == http2.ErrCodeRefusedStream:
		res.outcome.RefusedStream = true
	default:
		res.outcome.Reset = true
	}
	return res
}

// upstreamRequest builds the request for one attempt. The path is sent
// byte for byte as normalised (and rewritten): Opaque keeps Go from
// re-encoding it, except for a path starting with "//", which Opaque
// would turn into an absolute URI.
func (x *exchange) upstreamRequest(ctx context.Context, ep config.Endpoint, hdr http.Header) *http.Request {
	path := x.route.UpstreamPath(x.path)
	p, q, _ := strings.Cut(path, "?")
	u := &url.URL{Scheme: "http", Host: ep.Address.String(), Opaque: p, RawQuery: q, ForceQuery: strings.HasSuffix(path, "?")}
	if strings.HasPrefix(p, "//") {
		if pu, err := url.ParseRequestURI(path); err == nil {
			pu.Scheme, pu.Host = "http", ep.Address.String()
			u = pu
		}
	}
	host := x.r.Host
	if f := x.route.Forward; f.HostRewrite != "" {
		host = f.HostRewrite
	}
	req := (&http.Request{
		Method:        x.r.Method,
		URL:           u,
		Proto:         "HTTP/1.1",
		ProtoMajor:    1,
		ProtoMinor:    1,
		Header:        hdr.Clone(),
		Host:          host,
		ContentLength: x.r.ContentLength,
		Trailer:       x.r.Trailer,
	}).WithContext(ctx)
	if body := x.body.attempt(); body != http.NoBody {
		req.Body = body
		if req.ContentLength == 0 {
			req.ContentLength = -1
		}
	} else {
		req.ContentLength = 0
	}
	return req
}

// destinationPeer is the endpoint's workload for telemetry: from workload
// discovery, else from the endpoint metadata istiod sends
// ("name;namespace;canonical name;revision;cluster").
func destinationPeer(snap *state.Snapshot, ep config.Endpoint) telemetry.Peer {
	if w := snap.WorkloadByAddr(state.NetworkAddr{Addr: ep.Address.Addr()}); w != nil {
		return peerOf(w)
	}
	f := strings.Split(ep.Workload, ";")
	if len(f) != 5 {
		return telemetry.Peer{}
	}
	return telemetry.Peer{Workload: f[0], Namespace: f[1], CanonicalService: f[2], CanonicalRevision: f[3], App: f[2], Version: f[3], Cluster: f[4]}
}

// failed answers a request whose last attempt got no response, with
// Envoy's local reply for the way it failed.
func (x *exchange) failed(res result) {
	x.err = res.err
	var de *dialError
	switch {
	case x.timedOut() != nil:
		x.timeoutReply(x.timedOut())
	case errors.Is(res.err, errBodyTooLarge):
		x.refuse(http.StatusRequestEntityTooLarge, bodyPayloadLarge, causeBodySize)
	case x.r.Context().Err() != nil:
		// The client went away: nothing to answer.
		x.flags |= flagDC
		x.cause = causeClientReset
	case res.timeout:
		x.flags |= flagUT
		x.refuse(http.StatusGatewayTimeout, bodyTimeout, causeTimeout)
	case res.outcome.ConnectFailure:
		x.flags |= flagUF
		cause := causeConnectFailure
		if errors.As(res.err, &de) {
			cause = de.cause
		}
		x.refuse(http.StatusServiceUnavailable, bodyUpstreamErr+"connection failure", cause)
	case res.outcome.RefusedStream:
		x.flags |= flagUR
		x.refuse(http.StatusServiceUnavailable, bodyUpstreamErr+"remote refused stream reset", causeUpstreamReset)
	default:
		x.flags |= flagUC
		x.refuse(http.StatusServiceUnavailable, bodyUpstreamErr+"connection termination", causeUpstreamReset)
	}
}

// respond streams the upstream response to the client.
func (x *exchange) respond(ctx context.Context, res result, wc *route.WeightedCluster) *upgrade {
	resp := res.resp
	switching := resp.StatusCode == http.StatusSwitchingProtocols
	h := x.w.Header()
	for k := range h {
		delete(h, k)
	}
	responseHeaders(h, resp.Header, switching)
	if resp.ContentLength >= 0 && !switching && resp.StatusCode != http.StatusNoContent && resp.StatusCode != http.StatusNotModified {
		h.Set("Content-Length", strconv.FormatInt(resp.ContentLength, 10))
	}
	if wc != nil {
		wc.ResponseHeaders.Apply(h)
	}
	for _, m := range x.route.ResponseMutations() {
		m.Apply(h)
	}
	h.Set("X-Envoy-Upstream-Service-Time", strconv.FormatInt(x.upstreamMs, 10))
	if !switching {
		x.closing(h)
	}
	x.decorate(h)
	x.grpcStatus = resp.Header.Get("Grpc-Status")
	x.w.WriteHeader(resp.StatusCode)
	if switching {
		if _, ok := resp.Body.(io.ReadWriteCloser); !ok || x.upgrade == "" || res.conn == nil {
			resp.Body.Close()
			x.abort()
			return nil
		}
		x.w.Flush()
		return &upgrade{x: x, body: resp.Body, conn: res.conn}
	}
	defer resp.Body.Close()
	bp := bodyBuffers.Get().(*[]byte)
	defer bodyBuffers.Put(bp)
	buf := *bp
	if resp.ContentLength < 0 || resp.ContentLength > int64(len(buf)) {
		// Envoy forwards the header as it arrives: a client of a
		// response whose body comes later (a long poll, events, a large
		// download) sees it at once. A body of a known length that one
		// read can hold goes out with its header instead, in one HBONE
		// DATA frame: it nearly always arrived with the header, and a
		// flush of its own costs a TLS record and a write per response.
		x.w.Flush()
	}
	for {
		n, err := resp.Body.Read(buf)
		if n > 0 {
			res.idle.Touch()
			x.timers.touch()
			if _, werr := x.w.Write(buf[:n]); werr != nil {
				x.err = werr
				x.closeConn = true
				if cause := x.timedOut(); cause != nil {
					// The stream's timer ended the write to a client
					// that did not read.
					x.err = cause
					x.flags |= timeoutFlags(cause)
					x.cause = timeoutCause(cause)
					x.abort()
					return nil
				}
				x.flags |= flagDC
				return nil
			}
			x.w.Flush()
		}
		if err == io.EOF {
			break
		}
		if err != nil {
			x.err = err
			switch cause := x.timedOut(); {
			case cause != nil:
				x.err = cause
				x.flags |= timeoutFlags(cause)
				x.cause = timeoutCause(cause)
			case upstreamTimeout(context.Cause(res.ctx)) || errors.Is(err, os.ErrDeadlineExceeded):
				x.flags |= flagUT
				x.cause = causeTimeout
			case x.r.Context().Err() != nil:
				x.flags |= flagDC
				x.cause = causeClientReset
				x.closeConn = true
				return nil
			default:
				x.flags |= flagUR
				x.cause = causeUpstreamReset
			}
			x.abort()
			return nil
		}
	}
	for k, v := range resp.Trailer {
		x.w.Header()[http.TrailerPrefix+k] = v
		if k == "Grpc-Status" && len(v) > 0 {
			x.grpcStatus = v[0]
		}
	}
	return nil
}
