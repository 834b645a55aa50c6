package proxy

import (
	"io"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"time"

	hcmv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"

	"github.com/amber-mesh/amber/waypoint/http1"
)

// flags are Envoy's response flags (envoy/stream_info/stream_info.h),
// the ones the waypoint can raise, in Envoy's order, which is the order
// of their short names in the response_flags label and the access log.
type flags uint32

const (
	flagUH  flags = 1 << iota // no healthy upstream
	flagUT                    // upstream request timeout
	flagUR                    // upstream remote reset (after the response started)
	flagUF                    // upstream connection failure
	flagUC                    // upstream connection termination
	flagUO                    // upstream overflow (circuit breaker)
	flagNR                    // no route
	flagDC                    // downstream connection termination
	flagURX                   // upstream retry limit exceeded
	flagSI                    // stream idle timeout
	flagDPE                   // downstream protocol error
	flagNC                    // no cluster found
)

var flagNames = []string{"UH", "UT", "UR", "UF", "UC", "UO", "NR", "DC", "URX", "SI", "DPE", "NC"}

func (f flags) String() string {
	if f == 0 {
		return "-"
	}
	var b []string
	for i, n := range flagNames {
		if f&(1<<i) != 0 {
			b = append(b, n)
		}
	}
	return strings.Join(b, ",")
}

// tracker records what a handler wrote: the final status, the body bytes
// and whether the response started.
type tracker struct {
	http.ResponseWriter
	status int
	bytes  int64
	head   int64         // header bytes, approximately as on the wire
	timers *streamTimers // told of the response's start and bytes, once armed
}

func newTracker(w http.ResponseWriter) *tracker { return &tracker{ResponseWriter: w} }

func (t *tracker) WriteHeader(code int) {
	if t.status == 0 && (code >= 200 || code == http.StatusSwitchingProtocols) {
		t.status = code
		t.timers.responseStarted()
		t.head = int64(len("HTTP/1.1 000 \r\n\r\n"))
		for k, vs := range t.Header() {
			for _, v := range vs {
				t.head += int64(len(k) + len(v) + 4)
			}
		}
	}
	t.ResponseWriter.WriteHeader(code)
}

func (t *tracker) Write(b []byte) (int, error) {
	if t.status == 0 {
		t.WriteHeader(http.StatusOK)
	}
	n, err := t.ResponseWriter.Write(b)
	t.bytes += int64(n)
	if n > 0 {
		t.timers.touch()
	}
	return n, err
}

func (t *tracker) Flush() {
	if f, ok := t.ResponseWriter.(http.Flusher); ok {
		f.Flush()
	}
}

// started reports whether the response header went out: after that, a
// failure can only end the stream.
func (t *tracker) started() bool { return t.status != 0 }

// localReply answers the request itself, as Envoy's sendLocalReply does:
// text/plain body, content-length, the server and date headers; for a
// gRPC request a trailers-only response carrying the status Envoy maps
// the HTTP status to (source/common/grpc/status.cc httpToGrpcStatus) and
// the body as grpc-message. After the response started it can only end
// the stream.
func (x *exchange) localReply(status int, body string, extra http.Header) {
	if x.w.started() {
		x.abort()
		return
	}
	h := x.w.Header()
	for k := range h {
		delete(h, k)
	}
	for k, v := range extra {
		h[k] = v
	}
	if x.grpc && status >= 300 && status != http.StatusTemporaryRedirect {
		code := httpToGRPC(status)
		if x.localGRPC != 0 {
			code = x.localGRPC
		}
		x.grpcStatus = strconv.Itoa(code)
		h.Set("Content-Type", "application/grpc")
		h.Set("Grpc-Status", x.grpcStatus)
		if body != "" {
			h.Set("Grpc-Message", url.PathEscape(body))
		}
		status, body = http.StatusOK, ""
	}
	if body != "" {
		h.Set("Content-Type", "text/plain")
	}
	h.Set("Content-Length", strconv.Itoa(len(body)))
	x.closing(h)
	x.decorate(h)
	x.w.WriteHeader(status)
	if body != "" && x.r.Method != http.MethodHead {
		io.WriteString(x.w, body)
	}
}

// closing marks an HTTP/1 response as the connection's last when the
// exchange must end the connection or the proxy drains.
func (x *exchange) closing(h http.Header) {
	if x.r.ProtoMajor != 1 {
		return
	}
	if x.closeConn || x.d.isDraining() || x.p.isDraining() {
		h.Set("Connection", "close")
	}
}

// grpcDeadlineExceeded is gRPC's DEADLINE_EXCEEDED, which Envoy's local
// reply for a stream's max duration carries.
const grpcDeadlineExceeded = 4

// httpToGRPC is Envoy's Grpc::Utility::httpToGrpcStatus.
func httpToGRPC(status int) int {
	switch status {
	case http.StatusBadRequest:
		return 13 // INTERNAL
	case http.StatusUnauthorized:
		return 16 // UNAUTHENTICATED
	case http.StatusForbidden:
		return 7 // PERMISSION_DENIED
	case http.StatusNotFound:
		return 12 // UNIMPLEMENTED
	case http.StatusTooManyRequests, http.StatusBadGateway, http.StatusServiceUnavailable, http.StatusGatewayTimeout:
		return 14 // UNAVAILABLE
	}
	return 2 // UNKNOWN
}

// decorate sets the headers the HCM puts on every response: server (per
// server_header_transformation; istiod names it istio-envoy) and date.
func (x *exchange) decorate(h http.Header) {
	name := "envoy"
	var transform hcmv3.HttpConnectionManager_ServerHeaderTransformation
	if x.hc != nil {
		transform = x.hc.ServerHeader
		if x.hc.ServerName != "" {
			name = x.hc.ServerName
		}
	}
	switch transform {
	case hcmv3.HttpConnectionManager_OVERWRITE:
		h.Set("Server", name)
	case hcmv3.HttpConnectionManager_APPEND_IF_ABSENT:
		if h.Get("Server") == "" {
			h.Set("Server", name)
		}
	}
	h.Set("Date", time.Now().UTC().Format(http.TimeFormat))
}

// abort ends a response that has started and cannot be completed: the
// HTTP/1 connection is closed mid-response, the HTTP/2 stream reset.
func (x *exchange) abort() {
	x.closeConn = true
	if hw, ok := x.w.ResponseWriter.(*http1.ResponseWriter); ok {
		hw.Abort()
		return
	}
	// x/net/http2 resets the stream (RST_STREAM INTERNAL_ERROR) for this
	// panic and does not log it; serveRequest's deferred finish still
	// reports the request.
	panic(http.ErrAbortHandler)
}
