package proxy

import (
	"errors"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"sync"
	"time"

	"github.com/amber-mesh/amber/tunnel/authz"
	"github.com/amber-mesh/amber/tunnel/identity"
	"github.com/amber-mesh/amber/tunnel/metrics"
	"github.com/amber-mesh/amber/xds/state"
)

// Why a connection was refused or ended early; the access log's "error"
// field carries these texts.
var (
	errUnknownSource = errors.New("source address is not a local workload")
	errUnknownDest   = errors.New("destination address is not a local workload")
	errNoEndpoint    = errors.New("service has no usable endpoint")
	errWaypoint      = errors.New("waypoint cannot be resolved")
	errReservedPort  = errors.New("destination port is reserved for the ztunnel")
	errBadTarget     = errors.New("destination address may not be tunnelled to")
	errAuthority     = errors.New("CONNECT authority does not match the connection's destination")
	errDestRemoved   = errors.New("destination workload removed")
)

// DeniedError is an authorization decision that refused a connection.
type DeniedError struct {
	Decision authz.Decision
	// Revoked is true when the connection was allowed when it started and
	// a later policy change closed it.
	Revoked bool
}

func (e *DeniedError) Error() string {
	if e.Revoked {
		return "connection revoked by policy change: " + e.Decision.String()
	}
	return "connection denied by policy: " + e.Decision.String()
}

// Response flags, as Istio's ztunnel reports them.
const (
	flagNone    = "-"
	flagDenied  = "DENY"
	flagConnect = "CONNECT"
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
	logKeyError     = "error"
	logKeyListener  = "listener"
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

func (p *Proxy) logRecord(r *record) {
	attrs := []slog.Attr{
		slog.String(logKeyReporter, r.reporter),
		slog.String(logKeySrcAddr, r.src.String()),
		slog.String(logKeyDstAddr, r.dst.String()),
	}
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
		level = slog.LevelWarn
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

// halfConn is a connection that can end its sending side on its own:
// *net.TCPConn and hbone.Stream.
type halfConn interface {
	net.Conn
	CloseWrite() error
}

// tracked is a live proxied connection the proxy may have to close: on
// Close, or when a policy change revokes it.
type tracked struct {
	down, up net.Conn
	// inbound connections are re-authorized when policies change.
	inbound bool
	authz   authz.Conn

	mu  sync.Mutex // guards err
	err error
}

func (t *tracked) close(err error) {
	t.mu.Lock()
	if t.err == nil {
		t.err = err
	}
	t.mu.Unlock()
	t.down.Close()
	t.up.Close()
}

func (t *tracked) closeErr() error {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.err
}

func (p *Proxy) track(t *tracked) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		return false
	}
	p.conns[t] = struct{}{}
	return true
}

func (p *Proxy) untrack(t *tracked) {
	p.mu.Lock()
	delete(p.conns, t)
	p.mu.Unlock()
}

// relay counts the connection open, copies both ways until both
// directions ended, then counts it closed and logs it.
func (p *Proxy) relay(r *record, t *tracked, down, up halfConn) {
	mc := p.metrics.Open(r.labels())
	defer func() {
		mc.Received(r.recv)
		mc.Sent(r.sent)
		mc.Close()
		p.logRecord(r)
	}()
	if !p.track(t) {
		down.Close()
		up.Close()
		r.err = ErrClosed
		return
	}
	defer p.untrack(t)
	done := make(chan struct{})
	var recvErr error
	go func() {
		r.recv, recvErr = proxyCopy(up, down)
		if recvErr != nil {
			t.close(recvErr)
		}
		close(done)
	}()
	sent, sentErr := proxyCopy(down, up)
	if sentErr != nil {
		t.close(sentErr)
	}
	<-done
	r.sent = sent
	down.Close()
	up.Close()
	if err := t.closeErr(); err != nil && !errors.Is(err, net.ErrClosed) {
		r.err = err
	}
}

// proxyCopy copies src to dst until EOF and passes the half-close on, so
// the peer reads EOF while the other direction keeps flowing (TCP
// semantics, DESIGN.md §3). An error other than EOF is returned so that the
// caller aborts both sides.
func proxyCopy(dst, src halfConn) (int64, error) {
	n, err := io.Copy(dst, src)
	if err != nil {
		return n, err
	}
	return n, dst.CloseWrite()
}
