package hbone

import "sync/atomic"

// Stats counts what a Server or Pool did, for metrics and for tests. All
// fields are updated atomically; a Stats may be shared by several servers
// and pools. Fields name the side that updates them when only one does.
type Stats struct {
	ConnsOpened atomic.Uint64 // HTTP/2 connections started
	ConnsClosed atomic.Uint64 // HTTP/2 connections ended, for any reason

	HandshakeErrors   atomic.Uint64 // server: TLS handshake failed or ALPN was not h2
	HandshakeTimeouts atomic.Uint64 // server: handshake or preface not done within HandshakeTimeout
	HelloTimeouts     atomic.Uint64 // server: nothing received within HelloTimeout: reset

	HandshakesRefused          atomic.Uint64 // server: reset at accept, MaxHandshakes reached
	HandshakesRefusedPerSource atomic.Uint64 // server: reset at accept, MaxHandshakesPerSource reached for its address

	Dials      atomic.Uint64 // pool: connections dialled
	DialErrors atomic.Uint64 // pool: dials that failed
	IdleCloses atomic.Uint64 // pool: connections closed for having no streams for IdleTimeout

	StreamsOpened   atomic.Uint64 // CONNECT answered 200
	StreamsRejected atomic.Uint64 // CONNECT answered with another status (server: by the Handler)
	StreamsRefused  atomic.Uint64 // REFUSED_STREAM: over the concurrency limit or after GOAWAY
	StreamsReset    atomic.Uint64 // RST_STREAM received
	BadRequests     atomic.Uint64 // server: answered 400 or reset as malformed by the server itself
	Retries         atomic.Uint64 // pool: Connect attempts repeated on another connection

	HeaderListTooLarge atomic.Uint64 // request or response over MaxHeaderListSize (server answers 431)
	ContinuationFloods atomic.Uint64 // header block over its byte or CONTINUATION budget: GOAWAY
	RapidResets        atomic.Uint64 // too many streams reset before their response (CVE-2023-44487): GOAWAY
	PingFloods         atomic.Uint64 // PINGs faster than the budget: GOAWAY
	SettingsFloods     atomic.Uint64 // SETTINGS faster than the budget, or oversized: GOAWAY
	EmptyFrameFloods   atomic.Uint64 // DATA frames with no data and no END_STREAM faster than the budget (CVE-2019-9518): GOAWAY
	WindowUpdateFloods atomic.Uint64 // WINDOW_UPDATEs not prompted by our DATA faster than the budget: GOAWAY
	PriorityFloods     atomic.Uint64 // PRIORITY frames beyond one per stream, faster than the budget (CVE-2019-9513): GOAWAY
	StreamErrorFloods  atomic.Uint64 // too many malformed requests or stream errors caused by the peer: GOAWAY
	ControlFloods      atomic.Uint64 // replies queued faster than the peer reads them: connection closed
	ProtocolErrors     atomic.Uint64 // other connection errors answered with GOAWAY
	GoAwaysReceived    atomic.Uint64
	KeepaliveTimeouts  atomic.Uint64 // connections closed because a PING went unanswered
}
