package proxy

import (
	"log/slog"
	"time"

	"github.com/amber-mesh/amber/waypoint/config"
	"github.com/amber-mesh/amber/waypoint/telemetry"
)

// Access-log attribute keys: one line per request, TCP connection or
// refused CONNECT, message accessLogMsg.
const (
	accessLogMsg = "access"

	logKeyKind       = "kind" // "http", "tcp" or "connect"
	logKeySrcAddr    = "src.addr"
	logKeySrcID      = "src.identity"
	logKeySrcWl      = "src.workload"
	logKeyDst        = "dst" // the CONNECT's :authority: VIP:port or podIP:port
	logKeyChain      = "chain"
	logKeyMethod     = "method"
	logKeyAuthority  = "authority"
	logKeyPath       = "path"
	logKeyProtocol   = "protocol"
	logKeyStatus     = "status"
	logKeyFlags      = "flags"
	logKeyRoute      = "route"
	logKeyCluster    = "cluster"
	logKeyService    = "dst.service"
	logKeyUpstream   = "upstream"
	logKeyUpWl       = "upstream.workload"
	logKeyAttempts   = "attempts"
	logKeyRecv       = "bytes_received"
	logKeySent       = "bytes_sent"
	logKeyDuration   = "duration"
	logKeyUpTime     = "upstream_ms"
	logKeyRequestID  = "request_id"
	logKeyPolicy     = "rbac.policy"
	logKeyAudit      = "rbac.audit"
	logKeyError      = "error"
	logKeyRefusal    = "refusal"
	logKeyGRPCStatus = "grpc_status"
	logKeyGateway    = "gateway" // the ingress gateway listener
)

func workloadText(p telemetry.Peer) string {
	if p.Workload == "" {
		return ""
	}
	return p.Namespace + "/" + p.Workload
}

// finish reports a request once: the refusal counter, istio_requests_*
// and the access-log line.
func (x *exchange) finish() {
	if x.finished {
		return
	}
	x.finished = true
	x.timers.stop()
	defer x.cancel(nil)
	p := x.p
	if x.cause != "" {
		p.counts.refuse(x.cause)
	}
	status := x.w.status
	recvBody := int64(0)
	if x.body != nil {
		recvBody = x.body.received()
	}
	hdrBytes, _ := headerSize(x.r)
	proto := telemetry.ProtocolHTTP
	if x.grpc {
		proto = telemetry.ProtocolGRPC
	}
	l := telemetry.Labels{
		Source:                   x.d.source,
		Destination:              x.dst,
		Service:                  x.service,
		Protocol:                 proto,
		ResponseCode:             status,
		GRPCStatus:               x.grpcStatus,
		ResponseFlags:            x.flags.String(),
		ConnectionSecurityPolicy: telemetry.MutualTLS,
	}
	if x.d.gateway != "" {
		// An ingress gateway reports as the client side, which knows
		// no connection security policy (Istio's stats filter).
		l.Reporter = telemetry.ReporterSource
		l.ConnectionSecurityPolicy = telemetry.Unknown
	}
	d := time.Since(x.start)
	p.tel.Request(&l, d, int64(hdrBytes)+recvBody, x.w.head+x.w.bytes)

	attrs := []slog.Attr{
		slog.String(logKeyKind, "http"),
		slog.String(logKeySrcAddr, x.d.peerAddr.String()),
	}
	if !x.d.peer.IsZero() {
		attrs = append(attrs, slog.String(logKeySrcID, x.d.peer.String()))
	}
	if x.d.gateway != "" {
		attrs = append(attrs, slog.String(logKeyGateway, x.d.gateway))
	}
	if w := workloadText(x.d.source); w != "" {
		attrs = append(attrs, slog.String(logKeySrcWl, w))
	}
	attrs = append(attrs,
		slog.String(logKeyDst, x.d.in.Authority),
		slog.String(logKeyMethod, x.r.Method),
		slog.String(logKeyAuthority, x.r.Host),
		slog.String(logKeyPath, x.path),
		slog.String(logKeyProtocol, x.r.Proto),
		slog.Int(logKeyStatus, status),
		slog.String(logKeyFlags, x.flags.String()),
	)
	if x.chain != nil {
		attrs = append(attrs, slog.String(logKeyChain, x.chain.Name))
	}
	if x.route != nil {
		attrs = append(attrs, slog.String(logKeyRoute, x.route.Name))
	}
	if x.cluster != "" {
		attrs = append(attrs, slog.String(logKeyCluster, x.cluster))
	}
	if x.service.Host != "" {
		attrs = append(attrs, slog.String(logKeyService, x.service.Host))
	}
	if x.endpoint.IsValid() {
		attrs = append(attrs, slog.String(logKeyUpstream, x.endpoint.String()), slog.Int(logKeyAttempts, x.attempts), slog.Int64(logKeyUpTime, x.upstreamMs))
		if w := workloadText(x.dst); w != "" {
			attrs = append(attrs, slog.String(logKeyUpWl, w))
		}
	}
	if x.grpcStatus != "" {
		attrs = append(attrs, slog.String(logKeyGRPCStatus, x.grpcStatus))
	}
	if id := x.r.Header.Get("X-Request-Id"); id != "" {
		attrs = append(attrs, slog.String(logKeyRequestID, id))
	}
	if x.policy != "" {
		attrs = append(attrs, slog.String(logKeyPolicy, x.policy))
	}
	if x.audit {
		attrs = append(attrs, slog.Bool(logKeyAudit, true))
	}
	attrs = append(attrs,
		slog.Int64(logKeyRecv, int64(hdrBytes)+recvBody),
		slog.Int64(logKeySent, x.w.head+x.w.bytes),
		slog.Duration(logKeyDuration, d),
	)
	if x.cause != "" {
		attrs = append(attrs, slog.String(logKeyRefusal, x.cause))
	}
	if x.err != nil {
		attrs = append(attrs, slog.String(logKeyError, x.err.Error()))
	}
	p.log.LogAttrs(x.r.Context(), slog.LevelInfo, accessLogMsg, attrs...)
}

// logTCP reports a TCP chain connection.
func (p *Proxy) logTCP(d *downstream, ch *config.Chain, upstream string, l telemetry.Labels, start time.Time, up, down int64, fl flags, status int, err error) {
	attrs := []slog.Attr{
		slog.String(logKeyKind, "tcp"),
		slog.String(logKeySrcAddr, d.peerAddr.String()),
		slog.String(logKeySrcID, d.peer.String()),
	}
	if w := workloadText(d.source); w != "" {
		attrs = append(attrs, slog.String(logKeySrcWl, w))
	}
	attrs = append(attrs,
		slog.String(logKeyDst, d.in.Authority),
		slog.String(logKeyChain, ch.Name),
		slog.String(logKeyFlags, fl.String()),
	)
	if l.Service.Host != "" {
		attrs = append(attrs, slog.String(logKeyService, l.Service.Host))
	}
	if upstream != "" {
		attrs = append(attrs, slog.String(logKeyUpstream, upstream))
		if w := workloadText(l.Destination); w != "" {
			attrs = append(attrs, slog.String(logKeyUpWl, w))
		}
	}
	if status != 0 {
		attrs = append(attrs, slog.Int(logKeyStatus, status))
	}
	attrs = append(attrs,
		slog.Int64(logKeyRecv, up),
		slog.Int64(logKeySent, down),
		slog.Duration(logKeyDuration, time.Since(start)),
	)
	if err != nil {
		attrs = append(attrs, slog.String(logKeyError, err.Error()))
	}
	p.log.LogAttrs(p.ctx, slog.LevelInfo, accessLogMsg, attrs...)
}
