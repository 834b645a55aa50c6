package hbone

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"strings"

	"golang.org/x/net/http/httpguts"
	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
)

// headerBlock collects one HEADERS frame and its CONTINUATIONs as the
// reader decodes them (RFC 9113 §4.3). Fields are checked as they are
// emitted; once the list is too large they are decoded but dropped, so
// the HPACK dynamic table stays in step with the peer.
type headerBlock struct {
	streamID   uint32
	endStream  bool
	selfDep    bool // PRIORITY on the stream itself
	wireBytes  int
	frames     int
	listSize   uint32
	tooLarge   bool
	invalid    error
	sawRegular bool

	method, authority, scheme, path, protocol, status string
	seen                                              uint8 // bit per pseudo-header
	fields                                            []hpack.HeaderField
}

const (
	seenMethod = 1 << iota
	seenAuthority
	seenScheme
	seenPath
	seenProtocol
	seenStatus
)

var (
	errPseudoAfterRegular = errors.New("pseudo-header after regular header")
	errUnknownPseudo      = errors.New("unknown or misplaced pseudo-header")
	errDuplicatePseudo    = errors.New("duplicate pseudo-header")
	errBadFieldName       = errors.New("invalid header field name")
	errBadFieldValue      = errors.New("invalid header field value")
	errConnectionSpecific = errors.New("connection-specific header field")
)

// onHeaderField is the HPACK decoder's emit function; it runs on the
// reader goroutine inside hdec.Write.
func (c *conn) onHeaderField(f hpack.HeaderField) {
	hb := &c.hb
	if hb.tooLarge || hb.invalid != nil {
		return
	}
	hb.listSize += f.Size()
	if hb.listSize > c.cfg.MaxHeaderListSize {
		hb.tooLarge = true
		hb.fields = hb.fields[:0]
		c.hdec.SetEmitEnabled(false)
		return
	}
	if strings.HasPrefix(f.Name, ":") {
		// RFC 9113 §8.3: pseudo-headers come first, once each, and only
		// the ones defined for requests or responses.
		if hb.sawRegular {
			hb.invalid = errPseudoAfterRegular
			return
		}
		var bit uint8
		var dst *string
		switch {
		case c.server != nil && f.Name == ":method":
			bit, dst = seenMethod, &hb.method
		case c.server != nil && f.Name == ":authority":
			bit, dst = seenAuthority, &hb.authority
		case c.server != nil && f.Name == ":scheme":
			bit, dst = seenScheme, &hb.scheme
		case c.server != nil && f.Name == ":path":
			bit, dst = seenPath, &hb.path
		case c.server != nil && f.Name == ":protocol":
			bit, dst = seenProtocol, &hb.protocol
		case c.server == nil && f.Name == ":status":
			bit, dst = seenStatus, &hb.status
		default:
			hb.invalid = errUnknownPseudo
			return
		}
		if hb.seen&bit != 0 {
			hb.invalid = errDuplicatePseudo
			return
		}
		hb.seen |= bit
		*dst = f.Value
		return
	}
	hb.sawRegular = true
	// RFC 9113 §8.2.1: field names are lowercase tokens; §8.2.2: no
	// connection-specific fields.
	if !validFieldName(f.Name) {
		hb.invalid = errBadFieldName
		return
	}
	if !httpguts.ValidHeaderFieldValue(f.Value) {
		hb.invalid = errBadFieldValue
		return
	}
	switch f.Name {
	case "connection", "proxy-connection", "keep-alive", "transfer-encoding", "upgrade":
		hb.invalid = errConnectionSpecific
		return
	case "te":
		if f.Value != "trailers" {
			hb.invalid = errConnectionSpecific
			return
		}
	}
	hb.fields = append(hb.fields, f)
}

func validFieldName(name string) bool {
	if name == "" {
		return false
	}
	for i := 0; i < len(name); i++ {
		b := name[i]
		if 'A' <= b && b <= 'Z' || !httpguts.IsTokenRune(rune(b)) {
			return false
		}
	}
	return true
}

func (c *conn) headerBlockFlood(reason string) error {
	c.stats.ContinuationFloods.Add(1)
	return connError{http2.ErrCodeEnhanceYourCalm, reason}
}

func (c *conn) onHeaders(fh http2.FrameHeader) error {
	if int(fh.Length) > c.cfg.maxHeaderBlock() {
		return c.headerBlockFlood("HEADERS frame over the header block budget")
	}
	f, err := c.fr.ReadFrameForHeader(fh)
	if err != nil {
		var se http2.StreamError
		if errors.As(err, &se) {
			// The fragment could not be decoded, so HPACK state is lost:
			// what would be a stream error must end the connection.
			return c.protocolError(http2.ErrCodeProtocol, "malformed HEADERS frame")
		}
		return c.readError(err)
	}
	hf := f.(*http2.HeadersFrame)
	hb := &c.hb
	fields := hb.fields[:0]
	*hb = headerBlock{
		streamID:  hf.StreamID,
		endStream: hf.StreamEnded(),
		selfDep:   hf.HasPriority() && hf.Priority.StreamDep == hf.StreamID,
		wireBytes: int(fh.Length),
		fields:    fields,
	}
	c.hdec.SetEmitEnabled(true)
	return c.decodeFragment(hf.HeaderBlockFragment(), hf.HeadersEnded())
}

func (c *conn) onContinuation(fh http2.FrameHeader) error {
	hb := &c.hb
	hb.frames++
	hb.wireBytes += int(fh.Length)
	if hb.frames > maxContinuations {
		return c.headerBlockFlood("too many CONTINUATION frames")
	}
	if hb.wireBytes > c.cfg.maxHeaderBlock() {
		return c.headerBlockFlood("header block over its budget")
	}
	f, err := c.fr.ReadFrameForHeader(fh)
	if err != nil {
		return c.readError(err)
	}
	cf := f.(*http2.ContinuationFrame)
	return c.decodeFragment(cf.HeaderBlockFragment(), cf.HeadersEnded())
}

func (c *conn) decodeFragment(frag []byte, end bool) error {
	if _, err := c.hdec.Write(frag); err != nil {
		c.stats.ProtocolErrors.Add(1)
		return connError{http2.ErrCodeCompression, "HPACK: " + err.Error()}
	}
	if !end {
		return nil
	}
	if err := c.hdec.Close(); err != nil {
		c.stats.ProtocolErrors.Add(1)
		return connError{http2.ErrCodeCompression, "HPACK: " + err.Error()}
	}
	hb := &c.hb
	if !c.isPeerID(hb.streamID) && c.server != nil {
		return c.protocolError(http2.ErrCodeProtocol, "HEADERS on a server stream id")
	}
	var err error
	if c.server != nil {
		err = c.onRequest(hb)
	} else {
		err = c.onResponse(hb)
	}
	if cap(hb.fields) > 64 {
		hb.fields = nil
	}
	return err
}

// onRequest handles a complete request header block on the server.
func (c *conn) onRequest(hb *headerBlock) error {
	id := hb.streamID
	c.mu.Lock()
	if s := c.streams[id]; s != nil {
		// Trailers (RFC 9113 §8.1): they must end the stream.
		if !hb.endStream {
			err := c.resetLocked(s, http2.ErrCodeProtocol)
			c.mu.Unlock()
			return err
		}
		c.mu.Unlock()
		c.onEndStream(s)
		return nil
	}
	defer c.mu.Unlock()
	if id <= c.maxPeerID {
		// RFC 9113 §5.1.1: new stream ids only grow; this one is closed.
		c.stats.ProtocolErrors.Add(1)
		return connError{http2.ErrCodeProtocol, "HEADERS on a closed stream"}
	}
	c.maxPeerID = id
	c.prioritiesEarn = min(c.prioritiesEarn+1, maxEarned)
	if !c.controlRoomLocked() {
		return c.controlFlood()
	}
	// Refusals are answered without creating the stream.
	refuse := func(code http2.ErrCode) error {
		_ = c.wfr.WriteRSTStream(id, code)
		c.signalWriter()
		return nil
	}
	respond := func(status int) error {
		c.writeHeadersLocked(id, statusFields(status), true)
		if !hb.endStream {
			// RFC 9113 §8.1: after a complete response the server may stop
			// the request with RST_STREAM(NO_ERROR).
			_ = c.wfr.WriteRSTStream(id, http2.ErrCodeNo)
		}
		c.signalWriter() // the reader never writes itself
		return nil
	}
	switch {
	case c.goAwaySent || c.closing:
		c.stats.StreamsRefused.Add(1)
		return refuse(http2.ErrCodeRefusedStream)
	case hb.tooLarge:
		c.stats.HeaderListTooLarge.Add(1)
		if err := c.streamErrorBudget(); err != nil {
			return err
		}
		return respond(http.StatusRequestHeaderFieldsTooLarge)
	case hb.invalid != nil, hb.selfDep:
		c.stats.BadRequests.Add(1)
		if err := c.streamErrorBudget(); err != nil {
			return err
		}
		return refuse(http2.ErrCodeProtocol)
	case uint32(len(c.streams)) >= c.maxStreams || c.handlers >= 2*int(c.maxStreams):
		// Handlers of streams the client already reset still count, so
		// resetting streams cannot start unbounded work (CVE-2023-44487).
		// A refusal costs no more than the HEADERS that caused it; a client
		// that sends them without reading the answers hits the control
		// backlog limit.
		c.stats.StreamsRefused.Add(1)
		return refuse(http2.ErrCodeRefusedStream)
	}
	// RFC 9113 §8.5: CONNECT carries :method and :authority only.
	addr, err := ParseAuthority(hb.authority)
	if hb.method != http.MethodConnect || hb.seen&(seenScheme|seenPath|seenProtocol) != 0 || err != nil {
		c.stats.BadRequests.Add(1)
		if err := c.streamErrorBudget(); err != nil {
			return err
		}
		return respond(http.StatusBadRequest)
	}
	s := c.newStreamLocked(id)
	s.recvEnded = hb.endStream
	if hb.endStream {
		s.rerr = io.EOF // a CONNECT that will send nothing: reads see EOF at once
	}
	c.handlers++
	req := &Request{
		Method:    hb.method,
		Authority: hb.authority,
		Addr:      addr,
		Header:    make(http.Header, len(hb.fields)),
		Conn:      c.nc,
	}
	for _, f := range hb.fields {
		req.Header.Add(http.CanonicalHeaderKey(f.Name), f.Value)
	}
	s.ctx, s.cancel = context.WithCancel(c.ctx)
	go c.serveStream(s, req)
	return nil
}

// onResponse handles a complete response header block on the client.
func (c *conn) onResponse(hb *headerBlock) error {
	id := hb.streamID
	c.mu.Lock()
	if !c.isPeerID(id) && id >= c.nextID || c.isPeerID(id) {
		// Servers open no streams here (push is disabled), and never
		// answer a stream not yet opened (RFC 9113 §5.1).
		c.mu.Unlock()
		return c.protocolError(http2.ErrCodeProtocol, "HEADERS on idle stream")
	}
	s := c.streams[id]
	if s == nil {
		c.mu.Unlock()
		return nil // closed by us; the block was decoded, that is all it needs
	}
	if s.responded {
		// Trailers must end the stream.
		if !hb.endStream {
			err := c.resetLocked(s, http2.ErrCodeProtocol)
			c.mu.Unlock()
			return err
		}
		c.mu.Unlock()
		c.onEndStream(s)
		return nil
	}
	var status int
	if hb.tooLarge {
		c.stats.HeaderListTooLarge.Add(1)
	} else if hb.invalid == nil && !hb.selfDep && hb.seen&seenStatus != 0 && len(hb.status) == 3 {
		status, _ = strconv.Atoi(hb.status)
	}
	if status < 100 || status > 599 || status == http.StatusSwitchingProtocols || (status < 200 && hb.endStream) {
		// Malformed response (RFC 9113 §8.1.1, §8.6).
		err := c.resetLocked(s, http2.ErrCodeProtocol)
		c.mu.Unlock()
		return err
	}
	if status < 200 {
		c.mu.Unlock()
		return nil // informational: the final response follows
	}
	s.responded = true
	s.status = status
	c.mu.Unlock()
	s.deliverResponse(nil)
	if hb.endStream {
		c.onEndStream(s)
	}
	return nil
}

func statusFields(status int) []hpack.HeaderField {
	return []hpack.HeaderField{{Name: ":status", Value: strconv.Itoa(status)}}
}

// requestFields builds the CONNECT header block for authority and hdr and
// its size as MAX_HEADER_LIST_SIZE counts it.
func requestFields(authority string, hdr http.Header) ([]hpack.HeaderField, uint32, error) {
	fields := make([]hpack.HeaderField, 0, 2+len(hdr))
	fields = append(fields,
		hpack.HeaderField{Name: ":method", Value: http.MethodConnect},
		hpack.HeaderField{Name: ":authority", Value: authority})
	for k, vs := range hdr {
		name := strings.ToLower(k)
		if !validFieldName(name) {
			return nil, 0, fmt.Errorf("hbone: header %q: %w", k, errBadFieldName)
		}
		switch name {
		case "connection", "proxy-connection", "keep-alive", "transfer-encoding", "upgrade", "te", "host":
			return nil, 0, fmt.Errorf("hbone: header %q: %w", k, errConnectionSpecific)
		}
		for _, v := range vs {
			if !httpguts.ValidHeaderFieldValue(v) {
				return nil, 0, fmt.Errorf("hbone: header %q: %w", k, errBadFieldValue)
			}
			// A value that never repeats is sent never-indexed: indexing it
			// would only churn both ends' HPACK tables, a cost per stream.
			fields = append(fields, hpack.HeaderField{Name: name, Value: v, Sensitive: name == "traceparent"})
		}
	}
	var size uint32
	for _, f := range fields {
		size += f.Size()
	}
	return fields, size, nil
}
