package proxy

import (
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"net/netip"
	"strings"
	"time"

	"github.com/amber-mesh/amber/waypoint/config"
	"github.com/amber-mesh/amber/waypoint/http1"
	"github.com/amber-mesh/amber/waypoint/match"
	"github.com/amber-mesh/amber/waypoint/rbac"
	"github.com/amber-mesh/amber/waypoint/route"
	"github.com/amber-mesh/amber/waypoint/telemetry"
)

// Local reply bodies, as Envoy sends them.
const (
	bodyRBACDenied   = "RBAC: access denied"
	bodyNoHealthy    = "no healthy upstream"
	bodyUpstreamErr  = "upstream connect error or disconnect/reset before headers. reset reason: "
	bodyTimeout      = "upstream request timeout"
	bodyHeaderTO     = "request header timeout"
	bodyPayloadLarge = "Payload Too Large"
)

// peerPrincipalKey is the filter state istiod's waypoint RBAC matches
// principals on (pilot/pkg/security/authz/model/principal.go).
const peerPrincipalKey = "io.istio.peer_principal"

// exchange is one request and what happened to it, for the reply, the
// access log and the metrics.
type exchange struct {
	p     *Proxy
	d     *downstream
	r     *http.Request
	w     *tracker
	start time.Time
	// ctx is the stream's: its timers end it (timedOut), and the
	// router's attempts derive from it.
	ctx    context.Context
	cancel context.CancelCauseFunc
	timers *streamTimers // nil until routed

	chain   *config.Chain
	hc      *config.HTTPChain
	path    string
	route   *route.Route
	cluster string
	// endpoint is the last endpoint tried and dst its workload.
	endpoint netip.AddrPort
	dst      telemetry.Peer
	service  telemetry.Service
	body     *requestBody

	flags      flags
	cause      string
	err        error
	attempts   int
	policy     string // the RBAC policy that denied, or the AUDIT one that matched
	audit      bool
	grpc       bool
	grpcStatus string
	upstreamMs int64
	closeConn  bool
	upgrade    string // the allowed upgrade the request asks for
	localGRPC  int    // a local reply's gRPC status, when not its HTTP status's
	finished   bool
}

func (p *Proxy) newExchange(d *downstream, w *tracker, r *http.Request, start time.Time) *exchange {
	x := &exchange{p: p, d: d, r: r, w: w, start: start}
	x.ctx, x.cancel = context.WithCancelCause(r.Context())
	return x
}

// setChain records the chain and, for a VIP chain, its service: what
// telemetry reports as the destination service until a cluster is picked
// (a 403 has no upstream; its service labels are the target service's).
func (x *exchange) setChain(ch *config.Chain) {
	x.chain, x.hc = ch, ch.HTTP
	if ch.Service.Host != "" {
		x.service = serviceOfHost(ch.Service.Host)
	}
}

// serviceOfHost names a Kubernetes service by its FQDN
// (<name>.<namespace>.svc.<domain>).
func serviceOfHost(host string) telemetry.Service {
	s := telemetry.Service{Host: host}
	parts := strings.Split(host, ".")
	if len(parts) >= 3 && parts[2] == "svc" {
		s.Name, s.Namespace = parts[0], parts[1]
	}
	return s
}

// upgrade is an accepted protocol upgrade (HTTP/1 101) for the
// connection to relay: the response body the transport handed over, and
// the connection under it.
type upgrade struct {
	x    *exchange
	body io.ReadCloser
	conn net.Conn
}

// serveRequest runs one request through the HCM's steps in Envoy's order
// (source/common/http/conn_manager_impl.cc decodeHeaders): sanity checks,
// path normalisation, header sanitising, the RBAC filters in chain order,
// route selection, then the router. It returns an accepted upgrade.
func (p *Proxy) serveRequest(d *downstream, rw http.ResponseWriter, r *http.Request, start time.Time) (up *upgrade) {
	x := p.newExchange(d, newTracker(rw), r, start)
	x.grpc = isGRPC(r.Header)
	defer func() {
		// An upgrade is reported when its relay ends.
		if up == nil {
			x.finish()
		}
	}()
	_, ch, err := d.dispatch()
	if err != nil {
		x.err = err
		x.cause = causeChainRefused
		if errors.Is(err, errNoConfig) {
			x.cause = causeNoConfig
		}
		x.closeConn = true
		x.flags |= flagUH
		x.localReply(http.StatusServiceUnavailable, bodyNoHealthy, nil)
		return nil
	}
	x.setChain(ch)
	h := x.hc
	x.body = newRequestBody(x, r)

	// Sanity checks the HCM makes before any filter.
	switch {
	case r.ProtoMajor == 1 && r.ProtoMinor == 0 && !h.AcceptHTTP10:
		x.refuse(http.StatusUpgradeRequired, "", causeHTTP10)
		return nil
	case r.Host == "":
		x.refuse(http.StatusBadRequest, "", http1.CauseHost)
		return nil
	}
	// HTTP/1's reader bounded the header on the wire; HTTP/2's is bounded
	// here, decoded (HPACK can make a small block a large header).
	if n, count := headerSize(r); r.ProtoMajor == 2 && (n > x.p.headerLimit(h) || count > maxHeaders(h)) {
		x.refuse(http.StatusRequestHeaderFieldsTooLarge, http.StatusText(http.StatusRequestHeaderFieldsTooLarge), causeHeaderSize)
		return nil
	}
	if !underscores(r.Header, h.HeadersWithUnderscores) {
		x.refuse(http.StatusBadRequest, "", causeUnderscore)
		return nil
	}
	raw := r.RequestURI
	if r.ProtoMajor == 1 && r.URL != nil && r.URL.IsAbs() {
		// absolute-form: Envoy's codec takes :authority and :path from it.
		raw = r.URL.RequestURI()
	}
	if r.Method == http.MethodConnect || !strings.HasPrefix(raw, "/") {
		x.refuse(http.StatusNotFound, "", causeAbsolutePath)
		return nil
	}
	path, res := route.NormalizePath(raw, h.Path)
	switch res {
	case route.PathReject:
		x.refuse(http.StatusBadRequest, "", causePath)
		return nil
	case route.PathRedirect:
		x.cause = causePath
		x.localReply(http.StatusTemporaryRedirect, "", http.Header{"Location": {path}})
		return nil
	}
	x.path = path
	if l := x.p.lim.MaxRequestBodyBytes; l > 0 && r.ContentLength > l {
		x.refuse(http.StatusRequestEntityTooLarge, bodyPayloadLarge, causeBodySize)
		return nil
	}
	x.sanitize()

	view := &match.Request{Method: r.Method, Authority: r.Host, Path: path, Scheme: d.scheme(), Header: r.Header}
	rr := &rbac.Request{
		Headers:     view,
		Source:      d.peerAddr.Addr(),
		Remote:      h.RemoteAddress(d.peerAddr.Addr(), r.Header.Values("X-Forwarded-For")),
		Destination: d.in.Destination,
		FilterState: map[string]string{},
	}
	if !d.peer.IsZero() {
		rr.FilterState[peerPrincipalKey] = d.peer.String()
	}
	for _, f := range h.RBAC {
		dec := f.Evaluate(rr)
		if dec.Log {
			x.audit, x.policy = true, dec.Policy
		}
		if !dec.Allowed {
			x.policy = dec.Policy
			x.refuse(http.StatusForbidden, bodyRBACDenied, causeRBAC)
			return nil
		}
	}

	rt := h.Routes.Select(view)
	if rt == nil {
		x.flags |= flagNR
		x.refuse(http.StatusNotFound, "", causeNoRoute)
		return nil
	}
	x.route = rt
	switch {
	case rt.Direct != nil:
		hdr := http.Header{}
		for _, m := range rt.ResponseMutations() {
			m.Apply(hdr)
		}
		x.localReply(rt.Direct.Status, rt.Direct.Body, hdr)
		return nil
	case rt.Redirect != nil:
		hdr := http.Header{"Location": {rt.Location("http", r.Host, path)}}
		for _, m := range rt.ResponseMutations() {
			m.Apply(hdr)
		}
		x.localReply(rt.Redirect.Code, "", hdr)
		return nil
	}
	x.startTimers()
	return x.forward()
}

// refuse answers with a local reply and counts cause.
func (x *exchange) refuse(status int, body, cause string) {
	x.cause = cause
	x.localReply(status, body, nil)
}

// isGRPC is Envoy's Grpc::Common::isGrpcRequestHeaders.
func isGRPC(h http.Header) bool {
	ct := h.Get("Content-Type")
	const g = "application/grpc"
	return strings.HasPrefix(ct, g) && (len(ct) == len(g) || ct[len(g)] == '+' || ct[len(g)] == ';')
}

// headerSize is a request header's size as HTTP/2 counts it (RFC 9113
// §6.5.2: name, value and 32 per field, pseudo-headers included) and its
// number of fields. For HTTP/1 the reader already enforced its bounds on
// the wire bytes; this is what bounds HTTP/2.
func headerSize(r *http.Request) (int, int) {
	n := len(r.Method) + len(r.Host) + len(r.RequestURI) + 4*32
	count := 0
	for k, vs := range r.Header {
		for _, v := range vs {
			n += len(k) + len(v) + 32
			count++
		}
	}
	return n, count
}

// underscores applies headers_with_underscores_action: false means the
// request is refused (REJECT_REQUEST); DROP_HEADER removes them.
func underscores(h http.Header, action string) bool {
	if action == "" || action == "ALLOW" {
		return true
	}
	for k := range h {
		if strings.IndexByte(k, '_') < 0 {
			continue
		}
		if action == "REJECT_REQUEST" {
			return false
		}
		delete(h, k)
	}
	return true
}
