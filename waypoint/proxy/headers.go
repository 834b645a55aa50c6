package proxy

import (
	"crypto/rand"
	"fmt"
	"net/http"
	"net/textproto"
	"net/url"
	"strings"
)

// hopHeaders are connection-specific fields a proxy never forwards
// (RFC 9110 §7.6.1; Envoy's HCM removes these from requests,
// conn_manager_utility.cc mutateRequestHeaders, and its codecs from
// responses). Upgrade and Connection are kept only for an upgrade the
// route allows.
var hopHeaders = []string{"Connection", "Keep-Alive", "Proxy-Connection", "Transfer-Encoding", "Upgrade", "Te", "Trailer"}

// envoyInternalHeaders are the x-envoy-* request fields Envoy's HCM
// removes from a request it does not consider internal
// (ConnectionManagerUtility::cleanInternalHeaders). amber honours none of
// them either way (docs/waypoint.md §6); removing them keeps the
// application's view what Envoy's would be.
var envoyInternalHeaders = []string{
	"X-Envoy-Retriable-Status-Codes", "X-Envoy-Retriable-Header-Names", "X-Envoy-Retry-On",
	"X-Envoy-Retry-Grpc-On", "X-Envoy-Max-Retries", "X-Envoy-Upstream-Alt-Stat-Name",
	"X-Envoy-Upstream-Rq-Timeout-Ms", "X-Envoy-Upstream-Rq-Per-Try-Timeout-Ms",
	"X-Envoy-Upstream-Rq-Timeout-Alt-Response", "X-Envoy-Expected-Rq-Timeout-Ms",
	"X-Envoy-Force-Trace", "X-Envoy-Ip-Tags", "X-Envoy-Original-Url", "X-Envoy-Hedge-On-Per-Try-Timeout",
}

// upgradeType returns the request's upgrade token, lower case, when it
// asks for one the chain or route allows; "" otherwise.
func (x *exchange) upgradeType() string {
	if x.r.ProtoMajor != 1 || !connectionHas(x.r.Header, "upgrade") {
		return ""
	}
	t := strings.ToLower(strings.TrimSpace(x.r.Header.Get("Upgrade")))
	if t == "" {
		return ""
	}
	allowed := x.hc.Upgrades
	if x.route != nil && x.route.Forward != nil && len(x.route.Forward.Upgrades) > 0 {
		allowed = x.route.Forward.Upgrades
	}
	for _, a := range allowed {
		if a == t {
			return t
		}
	}
	return ""
}

func connectionHas(h http.Header, token string) bool {
	for _, v := range h["Connection"] {
		for _, t := range strings.Split(v, ",") {
			if strings.EqualFold(strings.TrimSpace(t), token) {
				return true
			}
		}
	}
	return false
}

// removeHop removes the connection-specific fields of h, and those the
// Connection field names.
func removeHop(h http.Header) {
	for _, v := range h["Connection"] {
		for _, t := range strings.Split(v, ",") {
			if t = strings.TrimSpace(t); t != "" {
				delete(h, textproto.CanonicalMIMEHeaderKey(t))
			}
		}
	}
	for _, k := range hopHeaders {
		delete(h, k)
	}
}

// sanitize is Envoy's HCM mutateRequestHeaders with istiod's settings for
// a waypoint's inner HCM (use_remote_address false, no trusted hops,
// forward_client_cert_details SANITIZE, request ids generated): the
// client's x-forwarded-for is kept as it is; x-forwarded-proto is set
// when absent; x-request-id is added when absent; a client's
// x-forwarded-client-cert is removed, and so are connection fields (an
// allowed upgrade's are put back). No request is internal: Envoy's
// internal_address_config is empty unless configured (its
// explicit_internal_address_config default), and istiod configures none,
// so the internal x-envoy-* fields are always removed and
// x-envoy-internal never set — a client cannot make itself internal with
// a forged x-forwarded-for.
func (x *exchange) sanitize() {
	h := x.r.Header
	up := x.upgradeType()
	upValue := h.Get("Upgrade")
	removeHop(h)
	delete(h, "X-Envoy-Internal")
	if refs := h["Referer"]; len(refs) > 1 {
		delete(h, "Referer")
	} else if len(refs) == 1 {
		if _, err := url.Parse(refs[0]); err != nil {
			delete(h, "Referer")
		}
	}
	if x.hc.UseRemoteAddress {
		// A gateway's (use_remote_address): the client's address is
		// appended to x-forwarded-for and the scheme is the connection's
		// (conn_manager_utility.cc mutateRequestHeaders).
		h["X-Forwarded-For"] = []string{appendXFF(h.Values("X-Forwarded-For"), x.d.peerAddr.Addr().String())}
		h.Set("X-Forwarded-Proto", x.d.scheme())
	} else if h.Get("X-Forwarded-Proto") == "" {
		h.Set("X-Forwarded-Proto", "http")
	}
	if x.hc.AppendXForwardedPort && h.Get("X-Forwarded-Port") == "" {
		h.Set("X-Forwarded-Port", fmt.Sprint(x.d.in.Destination.Port()))
	}
	for _, k := range envoyInternalHeaders {
		delete(h, k)
	}
	if x.hc.GenerateRequestID && h.Get("X-Request-Id") == "" {
		h.Set("X-Request-Id", newUUID())
	}
	// SANITIZE: the compiler refuses every other setting.
	delete(h, "X-Forwarded-Client-Cert")
	if up != "" {
		h.Set("Connection", "Upgrade")
		h.Set("Upgrade", upValue)
	}
	x.upgrade = up
}

// scheme is the connection's: https on a gateway listener terminating
// TLS, else http.
func (d *downstream) scheme() string {
	if d.tls {
		return "https"
	}
	return "http"
}

// appendXFF joins a request's x-forwarded-for values and appends addr.
func appendXFF(prev []string, addr string) string {
	if len(prev) == 0 {
		return addr
	}
	return strings.Join(prev, ",") + "," + addr
}

// newUUID is a random (version 4) UUID, the form of Envoy's x-request-id.
func newUUID() string {
	var b [16]byte
	rand.Read(b[:])
	b[6] = b[6]&0x0f | 0x40
	b[8] = b[8]&0x3f | 0x80
	return fmt.Sprintf("%x-%x-%x-%x-%x", b[0:4], b[4:6], b[6:8], b[8:10], b[10:])
}

// responseHeaders copies an upstream response's fields to h without the
// connection-specific ones (kept for a 101).
func responseHeaders(h, from http.Header, switching bool) {
	for k, v := range from {
		h[k] = append([]string(nil), v...)
	}
	if switching {
		up, conn := h["Upgrade"], h["Connection"]
		removeHop(h)
		h["Upgrade"], h["Connection"] = up, conn
		return
	}
	removeHop(h)
}
