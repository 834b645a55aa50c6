package proxy

import (
	"errors"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/net/http2"

	"github.com/amber-mesh/amber/internal/logkey"
	"github.com/amber-mesh/amber/tunnel/authz"
	"github.com/amber-mesh/amber/tunnel/hbone"
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
	// errCancelled: the client reset its CONNECT stream (or its HBONE
	// connection ended) before the answer. Nothing failed upstream.
	errCancelled = errors.New("client cancelled the CONNECT before it was answered")
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

// halfConn is a connection that can end its sending side on its own:
// *net.TCPConn and hbone.Stream.
type halfConn interface {
	net.Conn
	CloseWrite() error
}

// tracked is a live proxied connection the proxy may have to close: on
// Close, or when a policy change revokes it.
type tracked struct {
	down, up halfConn
	// inbound connections are re-authorized when policies change.
	inbound bool
	authz   authz.Conn
	gen     uint64 // generation of the snapshot that authorized it (inbound)

	mu     sync.Mutex // guards the fields below
	err    error
	closed bool
	pump   *pump // the upload direction, when it can park (relayIdle)
}

func (t *tracked) close(err error) {
	t.mu.Lock()
	if t.err == nil {
		t.err = err
	}
	t.closed = true
	u := t.pump
	t.mu.Unlock()
	if u != nil {
		u.stop() // before the sockets close: see parker.disarm
	}
	t.down.Close()
	t.up.Close()
}

func (t *tracked) setPump(u *pump) {
	t.mu.Lock()
	t.pump = u
	closed := t.closed
	t.mu.Unlock()
	if closed {
		u.stop()
	}
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
//
// An idle connection's goroutine waits in here for as long as the
// connection lives, so the work around the wait happens in separate
// functions: the parked stack stays small (see copyBoth).
func (p *Proxy) relay(r *record, t *tracked, down, up halfConn) {
	if p.relayIdle(r, t, down, up) {
		return
	}
	mc := p.relayStart(r, t)
	if mc == nil {
		return
	}
	p.copyBoth(r, t, down, up)
	p.relayEnd(r, t, mc)
}

// relayIdle relays a connection between a socket and an HBONE stream
// without a goroutine while it idles, and returns at once: the stream's
// data goes out with hbone.Forward, the socket's with a pump that parks
// when idle. The last direction to end reports the connection. It
// reports false, having done nothing, for other pairs.
func (p *Proxy) relayIdle(r *record, t *tracked, down, up halfConn) bool {
	var stream, sock halfConn
	var fromStream, toStream *int64
	switch {
	case isSocket(down) && !isSocket(up):
		stream, sock, fromStream, toStream = up, down, &r.sent, &r.recv
	case isSocket(up) && !isSocket(down):
		stream, sock, fromStream, toStream = down, up, &r.recv, &r.sent
	default:
		return false
	}
	var mc *metrics.Conn
	var left atomic.Int32
	left.Store(2)
	end := func(n *int64) func(int64, error) {
		return func(k int64, err error) {
			*n = k
			if err != nil {
				t.close(err)
			}
			if left.Add(-1) == 0 {
				p.relayEnd(r, t, mc)
				p.wg.Done()
			}
		}
	}
	u := newPump(p.parker, stream, sock, end(toStream))
	if u == nil {
		return false
	}
	mc = p.relayStart(r, t)
	if mc == nil {
		return true
	}
	p.wg.Add(1)
	if !forward(sock, stream, end(fromStream)) {
		// Not an HBONE stream after all: copy that way on a goroutine.
		go asyncCopy(sock, stream, end(fromStream))
	}
	t.setPump(u)
	go u.run()
	return true
}

func isSocket(c halfConn) bool {
	_, ok := c.(*net.TCPConn)
	return ok
}

// relayStart counts the connection open and tracks it; nil when the
// proxy is closed, in which case the connection is already reported.
func (p *Proxy) relayStart(r *record, t *tracked) *metrics.Conn {
	mc := p.metrics.Open(r.labels())
	if !p.track(t) {
		t.down.Close()
		t.up.Close()
		r.err = ErrClosed
		p.relayDone(r, mc)
		return nil
	}
	if t.inbound {
		p.recheckTracked(t)
	}
	return mc
}

// relayEnd closes and reports a connection copyBoth finished.
func (p *Proxy) relayEnd(r *record, t *tracked, mc *metrics.Conn) {
	p.untrack(t)
	t.down.Close()
	t.up.Close()
	// Bytes count once written to the peer: an HBONE stream accepts
	// bytes it then never writes when its connection fails or the peer
	// resets it first (hbone.Unsent; a TCP socket's write is the kernel's).
	r.sent -= unsent(t.down)
	r.recv -= unsent(t.up)
	if err := t.closeErr(); err != nil && !errors.Is(err, net.ErrClosed) && !peerEnded(err) {
		r.err = err
	}
	p.relayDone(r, mc)
}

// unsent is hbone.Unsent for an HBONE stream, 0 for a socket.
func unsent(c halfConn) int64 {
	if s, ok := c.(*hbone.Stream); ok {
		return hbone.Unsent(s)
	}
	return 0
}

// peerEnded reports an error that only says an endpoint ended the
// connection its own way after it was established: a reset, a write to
// or a shutdown of a socket its peer already reset, the remote ztunnel
// cancelling the stream because its side did so. A TCP connection may
// end like that at any time; as in Istio's ztunnel, it is not a failure
// of the connection and the access log does not report it as one. The
// other side is still torn down.
func peerEnded(err error) bool {
	var se *hbone.StreamError
	if errors.As(err, &se) {
		return se.Remote && (se.Code == http2.ErrCodeCancel || se.Code == http2.ErrCodeNo)
	}
	return errors.Is(err, syscall.ECONNRESET) || errors.Is(err, syscall.EPIPE) ||
		errors.Is(err, syscall.ENOTCONN) || errors.Is(err, io.ErrUnexpectedEOF)
}

func (p *Proxy) relayDone(r *record, mc *metrics.Conn) {
	mc.Received(r.recv)
	mc.Sent(r.sent)
	mc.Close()
	p.logRecord(r)
}

// copyBoth copies both ways until both directions ended. One direction
// runs on this goroutine, the other on its own, except that a direction
// out of an HBONE stream needs no goroutine while the connection is idle
// (hbone.Forward): that one is the asynchronous one.
//
// Goroutine stacks are most of an idle connection's memory: the runtime
// sizes new stacks by the average stack in use and shrinks a parked one
// only below a quarter of its size, so the frames under the wait are kept
// few and small.
func (p *Proxy) copyBoth(r *record, t *tracked, down, up halfConn) {
	done := make(chan struct{})
	fin := func(n *int64) func(int64, error) {
		return func(k int64, err error) {
			*n = k
			if err != nil {
				t.close(err)
			}
			close(done)
		}
	}
	switch {
	case forward(down, up, fin(&r.sent)):
		r.recv = t.copy(up, down)
	case forward(up, down, fin(&r.recv)):
		r.sent = t.copy(down, up)
	default:
		go asyncCopy(up, down, fin(&r.recv))
		r.sent = t.copy(down, up)
	}
	<-done
}

// copy is proxyCopy for a tracked connection: an error aborts both sides.
func (t *tracked) copy(dst, src halfConn) int64 {
	n, err := proxyCopy(dst, src)
	if err != nil {
		t.close(err)
	}
	return n
}

// forward starts copying src to dst as proxyCopy does, with
// hbone.Forward, if src is an HBONE stream: the HBONE reader then writes
// what arrives straight to dst, and an idle connection keeps no goroutine
// (and no stack) for that direction. fin gets proxyCopy's results.
func forward(dst, src halfConn, fin func(int64, error)) bool {
	s, ok := src.(*hbone.Stream)
	if !ok {
		return false
	}
	hbone.Forward(s, dst, func(n int64, err error) {
		if err == nil {
			err = dst.CloseWrite()
		}
		fin(n, err)
	})
	return true
}

// asyncCopy is a copy direction on a goroutine of its own.
func asyncCopy(dst, src halfConn, fin func(int64, error)) {
	fin(proxyCopy(dst, src))
}

// proxyCopy copies src to dst until EOF and passes the half-close on, so
// the peer reads EOF while the other direction keeps flowing (TCP
// semantics, DESIGN.md §3). An error other than EOF is returned so that the
// caller aborts both sides.
//
// ReadFrom is called directly: both ways have one (splice between TCP
// sockets, the stream's buffer-less wait), and io.Copy would reach it
// through src's WriteTo, adding frames under an idle connection's wait.
func proxyCopy(dst, src halfConn) (int64, error) {
	var n int64
	var err error
	if rf, ok := dst.(io.ReaderFrom); ok {
		n, err = rf.ReadFrom(src)
	} else {
		n, err = io.Copy(dst, src)
	}
	if err != nil {
		return n, err
	}
	return n, dst.CloseWrite()
}
