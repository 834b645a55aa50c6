package proxy

import (
	"errors"
	"log/slog"
	"net/netip"
	"time"

	"github.com/amber-mesh/amber/internal/logkey"
	"github.com/amber-mesh/amber/tunnel/identity"
	"github.com/amber-mesh/amber/tunnel/metrics"
	"github.com/amber-mesh/amber/xds/state"
)

// Response flags, as Istio's ztunnel reports them, and Envoy's DC
// (downstream connection termination) for a CONNECT its client cancelled:
// Istio's ztunnel has no flag for it, and its CONNECT (upstream connection
// failure) would be wrong — the label Istio's Envoy-based proxies report
// for the same event keeps dashboards that alert on CONNECT honest.
const (
	flagNone       = "-"
	flagDenied     = "DENY"
	flagConnect    = "CONNECT"
	flagDownstream = "DC"
)

// Access-log attribute keys.
const (
	logKeyReporter  = "reporter"
	logKeySrcAddr   = "src.addr"
	logKeySrcWl     = "src.workload"
	logKeySrcNs     = "src.namespace"
	logKeySrcID     = "src.identity"
	logKeyDstAddr   = "dst.addr"
	logKeyDstHBONE  = "dst.hbone_addr"
	logKeyDstSvc    = "dst.service"
	logKeyDstWl     = "dst.workload"
	logKeyDstNs     = "dst.namespace"
	logKeyDstID     = "dst.identity"
	logKeyProtocol  = "protocol"
	logKeySent      = "bytes_sent"
	logKeyRecv      = "bytes_recv"
	logKeyDuration  = "duration"
	logKeyError     = logkey.Error
	logKeyListener  = logkey.Listener
	accessLogMsg    = "connection complete"
	protocolHBONE   = "HBONE"
	protocolTCP     = "TCP"
	reporterSource  = metrics.ReporterSource
	reporterDestino = metrics.ReporterDestination
)

// record is what the access log and the metrics say about a connection.
type record struct {
	reporter     string
	src, dst     netip.AddrPort // client address, original destination
	hboneAddr    netip.AddrPort // HBONE peer dialled (outbound)
	srcW, dstW   *state.Workload
	srcID, dstID identity.ID
	svc          *state.Service
	protocol     string
	mtls         bool
	start        time.Time
	sent, recv   int64 // towards the client, towards the destination
	err          error
}

func (r *record) labels() metrics.Labels {
	l := metrics.Labels{
		Reporter:                 r.reporter,
		RequestProtocol:          metrics.ProtocolTCP,
		ConnectionSecurityPolicy: metrics.NoTLS,
		ResponseFlags:            flagNone,
	}
	if r.mtls {
		l.ConnectionSecurityPolicy = metrics.MutualTLS
	}
	if r.srcW != nil {
		l.SourceWorkload, l.SourceWorkloadNamespace = workloadName(r.srcW), r.srcW.Namespace
	}
	if !r.srcID.IsZero() {
		l.SourcePrincipal = r.srcID.String()
	}
	if r.dstW != nil {
		l.DestinationWorkload, l.DestinationWorkloadNamespace = workloadName(r.dstW), r.dstW.Namespace
	}
	if !r.dstID.IsZero() {
		l.DestinationPrincipal = r.dstID.String()
	}
	if r.svc != nil {
		l.DestinationService = r.svc.Hostname
	}
	var de *DeniedError
	switch {
	case errors.As(r.err, &de):
		l.ResponseFlags = flagDenied
	case errors.Is(r.err, errCancelled):
		l.ResponseFlags = flagDownstream
	case r.err != nil:
		l.ResponseFlags = flagConnect
	}
	return l
}

// workloadName is Istio's workload label: the controller's name when
// known (a Deployment's), else the pod's.
func workloadName(w *state.Workload) string {
	if w.WorkloadName != "" {
		return w.WorkloadName
	}
	return w.Name
}

// maxLogAttrs is the most attributes an access-log line has.
const maxLogAttrs = 16

func (p *Proxy) logRecord(r *record) {
	// Room for every attribute below at once: grown step by step, the
	// slice cost three allocations per line.
	attrs := make([]slog.Attr, 0, maxLogAttrs)
	attrs = append(attrs,
		slog.String(logKeyReporter, r.reporter),
		slog.String(logKeySrcAddr, r.src.String()),
		slog.String(logKeyDstAddr, r.dst.String()),
	)
	if r.hboneAddr.IsValid() {
		attrs = append(attrs, slog.String(logKeyDstHBONE, r.hboneAddr.String()))
	}
	if r.srcW != nil {
		attrs = append(attrs, slog.String(logKeySrcWl, r.srcW.Name), slog.String(logKeySrcNs, r.srcW.Namespace))
	}
	if !r.srcID.IsZero() {
		attrs = append(attrs, slog.String(logKeySrcID, r.srcID.String()))
	}
	if r.svc != nil {
		attrs = append(attrs, slog.String(logKeyDstSvc, r.svc.Hostname))
	}
	if r.dstW != nil {
		attrs = append(attrs, slog.String(logKeyDstWl, r.dstW.Name), slog.String(logKeyDstNs, r.dstW.Namespace))
	}
	if !r.dstID.IsZero() {
		attrs = append(attrs, slog.String(logKeyDstID, r.dstID.String()))
	}
	attrs = append(attrs,
		slog.String(logKeyProtocol, r.protocol),
		slog.Int64(logKeySent, r.sent),
		slog.Int64(logKeyRecv, r.recv),
		slog.Duration(logKeyDuration, time.Since(r.start)),
	)
	level := slog.LevelInfo
	if r.err != nil {
		attrs = append(attrs, slog.String(logKeyError, r.err.Error()))
		// A cancelled CONNECT is the client's choice, not a failure: a
		// warning would be written at once (internal/cli), one per
		// stream of a client that resets them all.
		if !errors.Is(r.err, errCancelled) {
			level = slog.LevelWarn
		}
	}
	p.log.LogAttrs(p.ctx, level, accessLogMsg, attrs...)
}

// refuse reports a connection that never reached its destination.
func (p *Proxy) refuse(r *record, err error) {
	r.err = err
	mc := p.metrics.Open(r.labels())
	mc.Close()
	p.logRecord(r)
}

// relayDone reports a connection that was relayed, once it ended.
func (p *Proxy) relayDone(r *record, mc *metrics.Conn) {
	mc.Received(r.recv)
	mc.Sent(r.sent)
	mc.Close()
	p.logRecord(r)
}
