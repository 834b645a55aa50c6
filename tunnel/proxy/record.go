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
// An idle connection holds it (in its conn), so it is kept small: fields
// of a few fixed values are flags, the identities are pointers to what
// they are read from (srcID, dstID), the start is a monotonic reading in
// 8 bytes, the byte counts are the relay's and go straight to the report.
type record struct {
	src, dst   netip.AddrPort // client address, original destination
	hboneAddr  netip.AddrPort // HBONE peer dialled (outbound)
	srcW, dstW *state.Workload
	svc        *state.Service
	// peerW is the workload whose identity an outbound connection's HBONE
	// peer presents: the destination's, or its waypoint's.
	peerW *state.Workload
	// peer is an inbound HBONE connection's client identity, shared with
	// the other streams of its HBONE connection.
	peer    *peer
	start   time.Duration // since epoch
	err     error
	inbound bool // reported by the destination (else by the source)
	hbone   bool // protocol HBONE (else TCP)
	mtls    bool
}

// srcID is the client's identity: the source workload's on an outbound
// connection, the certificate's on an inbound HBONE one, none on an
// inbound plaintext one.
func (r *record) srcID() identity.ID {
	switch {
	case r.peer != nil:
		return r.peer.id
	case !r.inbound && r.srcW != nil:
		return workloadID(r.srcW)
	}
	return identity.ID{}
}

// dstID is the destination's identity: the HBONE peer's on an outbound
// connection, the local destination workload's on an inbound one.
func (r *record) dstID() identity.ID {
	switch {
	case r.peerW != nil:
		return workloadID(r.peerW)
	case r.inbound && r.dstW != nil:
		return workloadID(r.dstW)
	}
	return identity.ID{}
}

// epoch is what records' start times count from: a time.Duration since
// it keeps the monotonic clock reading a time.Time would, in a third of
// its size.
var epoch = time.Now()

// now is the start time of a record beginning now.
func now() time.Duration { return time.Since(epoch) }

func (r *record) reporter() string {
	if r.inbound {
		return reporterDestino
	}
	return reporterSource
}

func (r *record) protocol() string {
	if r.hbone {
		return protocolHBONE
	}
	return protocolTCP
}

func (r *record) labels() metrics.Labels {
	l := metrics.Labels{
		Reporter:                 r.reporter(),
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
	if id := r.srcID(); !id.IsZero() {
		l.SourcePrincipal = id.String()
	}
	if r.dstW != nil {
		l.DestinationWorkload, l.DestinationWorkloadNamespace = workloadName(r.dstW), r.dstW.Namespace
	}
	if id := r.dstID(); !id.IsZero() {
		l.DestinationPrincipal = id.String()
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

// logRecord writes r's access-log line; sent and recv are the bytes
// towards the client and towards the destination.
func (p *Proxy) logRecord(r *record, sent, recv int64) {
	// Room for every attribute below at once: grown step by step, the
	// slice cost three allocations per line.
	attrs := make([]slog.Attr, 0, maxLogAttrs)
	attrs = append(attrs,
		slog.String(logKeyReporter, r.reporter()),
		slog.String(logKeySrcAddr, r.src.String()),
		slog.String(logKeyDstAddr, r.dst.String()),
	)
	if r.hboneAddr.IsValid() {
		attrs = append(attrs, slog.String(logKeyDstHBONE, r.hboneAddr.String()))
	}
	if r.srcW != nil {
		attrs = append(attrs, slog.String(logKeySrcWl, r.srcW.Name), slog.String(logKeySrcNs, r.srcW.Namespace))
	}
	if id := r.srcID(); !id.IsZero() {
		attrs = append(attrs, slog.String(logKeySrcID, id.String()))
	}
	if r.svc != nil {
		attrs = append(attrs, slog.String(logKeyDstSvc, r.svc.Hostname))
	}
	if r.dstW != nil {
		attrs = append(attrs, slog.String(logKeyDstWl, r.dstW.Name), slog.String(logKeyDstNs, r.dstW.Namespace))
	}
	if id := r.dstID(); !id.IsZero() {
		attrs = append(attrs, slog.String(logKeyDstID, id.String()))
	}
	attrs = append(attrs,
		slog.String(logKeyProtocol, r.protocol()),
		slog.Int64(logKeySent, sent),
		slog.Int64(logKeyRecv, recv),
		slog.Duration(logKeyDuration, now()-r.start),
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
func (p *Proxy) refuse(c *conn, err error) {
	c.err = err
	p.metrics.Open(&c.mc, c.labels())
	p.relayDone(c, 0, 0)
}

// relayDone reports a connection once it ended, relayed or not (its
// metrics are open), with the bytes sent towards the client and received
// towards the destination, and lets go of its peer identity.
func (p *Proxy) relayDone(c *conn, sent, recv int64) {
	c.mc.Received(recv)
	c.mc.Sent(sent)
	c.mc.Close()
	p.logRecord(&c.record, sent, recv)
	p.peers.release(c.record.peer)
}
