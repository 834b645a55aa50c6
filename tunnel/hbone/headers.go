package hbone

import (
	"errors"
	"fmt"
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
		case c.isServer && f.Name == ":method":
			bit, dst = seenMethod, &hb.method
		case c.isServer && f.Name == ":authority":
			bit, dst = seenAuthority, &hb.authority
		case c.isServer && f.Name == ":scheme":
			bit, dst = seenScheme, &hb.scheme
		case c.isServer && f.Name == ":path":
			bit, dst = seenPath, &hb.path
		case c.isServer && f.Name == ":protocol":
			bit, dst = seenProtocol, &hb.protocol
		case !c.isServer && f.Name == ":status":
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
	err := c.side.onHeaderBlock(hb)
	if cap(hb.fields) > 64 {
		hb.fields = nil
	}
	return err
}

// onTrailersLocked handles a header block on a stream that already had
// its request or final response: trailers, which must end the stream
// (RFC 9113 §8.1). It is called with c.mu held and releases it.
func (c *conn) onTrailersLocked(s *Stream, hb *headerBlock) error {
	if !hb.endStream {
		err := c.resetLocked(s, http2.ErrCodeProtocol)
		c.mu.Unlock()
		return err
	}
	c.mu.Unlock()
	c.onEndStream(s)
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
