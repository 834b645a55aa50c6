// Package http1 is the server side of HTTP/1.1 for a proxy that must not
// be smuggled through: a strict request reader that refuses every framing
// ambiguity with a typed error naming its cause, and a response writer.
//
// The reader follows RFC 9112 where it lets a recipient refuse, and
// Envoy's HTTP/1 codec where Envoy is stricter: a request with both
// Content-Length and Transfer-Encoding is refused (RFC 9112 §6.3 allows
// either refusing or ignoring Content-Length; Envoy refuses unless
// allow_chunked_length), and so are repeated Content-Length fields even
// when they agree, obsolete line folding (§5.2), whitespace before a
// field's colon (§5.1), control characters in values, transfer codings
// other than a single "chunked" (501, as Envoy), and HTTP versions other
// than 1.0 and 1.1. What is refused is decided from the bytes alone, so a
// proxy and the application behind it can never disagree on where a
// request ends: the proxy writes the request it forwards anew.
package http1

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httputil"
	"net/textproto"
	"net/url"
	"strconv"
	"strings"

	"golang.org/x/net/http/httpguts"
)

// Causes of refused requests: Error.Cause, and the label of the counter
// the caller keeps.
const (
	CauseRequestLine      = "request_line"
	CauseVersion          = "http_version"
	CauseTarget           = "request_target"
	CauseHeaderName       = "header_name"
	CauseHeaderValue      = "header_value"
	CauseObsFold          = "obs_fold"
	CauseHeaderTooLarge   = "header_too_large"
	CauseTooManyHeaders   = "too_many_headers"
	CauseContentLength    = "content_length"
	CauseDupContentLength = "duplicate_content_length"
	CauseCLAndTE          = "content_length_and_transfer_encoding"
	CauseTransferEncoding = "transfer_encoding"
	CauseHost             = "host"
	CauseChunked          = "chunked_encoding"
	CauseTrailer          = "trailer"
	CauseBodyTruncated    = "body_truncated"
)

// Error is a request refused by the reader: Status is the local reply
// (400, 431 or 501), Cause one of the Cause constants.
type Error struct {
	Status int
	Cause  string
	Detail string
}

func (e *Error) Error() string {
	if e.Detail == "" {
		return "http1: " + e.Cause
	}
	return "http1: " + e.Cause + ": " + e.Detail
}

func badRequest(cause, format string, args ...any) *Error {
	return &Error{Status: http.StatusBadRequest, Cause: cause, Detail: fmt.Sprintf(format, args...)}
}

// Limits bound what ReadRequest accepts. The zero value is Envoy's
// defaults.
type Limits struct {
	// MaxHeaderBytes bounds the request line and header fields together,
	// line endings included. Zero means 60 KiB (Envoy's
	// max_request_headers_kb).
	MaxHeaderBytes int
	// MaxHeaders bounds the number of header fields. Zero means 100
	// (Envoy's max_headers_count).
	MaxHeaders int
	// MaxTrailerBytes bounds a chunked body's trailer section. Zero means
	// MaxHeaderBytes.
	MaxTrailerBytes int
}

func (l Limits) withDefaults() Limits {
	if l.MaxHeaderBytes <= 0 {
		l.MaxHeaderBytes = 60 << 10
	}
	if l.MaxHeaders <= 0 {
		l.MaxHeaders = 100
	}
	if l.MaxTrailerBytes <= 0 {
		l.MaxTrailerBytes = l.MaxHeaderBytes
	}
	return l
}

// ReadRequest reads one request's head from br and returns it with a
// Body that reads the framed body from br: Content-Length bytes, the
// decoded chunks (trailers into Trailer), or nothing. RequestURI holds the
// request-target as sent; URL is parsed from it. Host is the Host field
// (or an absolute-form target's authority). Close is true when the
// connection must end after the response. A malformed request is an
// *Error; an error from br is returned as it is (io.EOF before the first
// byte: the client closed an idle connection).
func ReadRequest(br *bufio.Reader, lim Limits) (*http.Request, error) {
	lim = lim.withDefaults()
	budget := lim.MaxHeaderBytes
	line, err := readLine(br, &budget)
	if err != nil {
		return nil, err
	}
	// RFC 9112 §2.2: a server SHOULD ignore at least one empty line
	// before the request line.
	if len(line) == 0 {
		if line, err = readLine(br, &budget); err != nil {
			return nil, unexpectedEOF(err)
		}
	}
	r, err := parseRequestLine(line)
	if err != nil {
		return nil, err
	}
	if err := readHeader(br, r.Header, &budget, lim.MaxHeaders, false); err != nil {
		return nil, unexpectedEOF(err)
	}
	if err := frame(r, br, lim); err != nil {
		return nil, err
	}
	return r, nil
}

func unexpectedEOF(err error) error {
	if err == io.EOF {
		return io.ErrUnexpectedEOF
	}
	return err
}

// readLine reads one line ending in LF (a preceding CR is dropped),
// charging it to budget. A bare CR inside is refused: some parsers end
// lines there, and a request two parsers split differently is how
// smuggling starts.
func readLine(br *bufio.Reader, budget *int) ([]byte, error) {
	var line []byte
	for {
		chunk, err := br.ReadSlice('\n')
		*budget -= len(chunk)
		if *budget < 0 {
			return nil, &Error{Status: http.StatusRequestHeaderFieldsTooLarge, Cause: CauseHeaderTooLarge}
		}
		switch err {
		case nil:
			if line == nil {
				line = chunk
			} else {
				line = append(line, chunk...)
			}
			line = line[:len(line)-1]
			if n := len(line); n > 0 && line[n-1] == '\r' {
				line = line[:n-1]
			}
			if bytes.IndexByte(line, '\r') >= 0 {
				return nil, badRequest(CauseRequestLine, "bare CR in a line")
			}
			return line, nil
		case bufio.ErrBufferFull:
			line = append(line, chunk...)
		default:
			if len(chunk) > 0 || line != nil {
				return nil, io.ErrUnexpectedEOF
			}
			return nil, err
		}
	}
}

func parseRequestLine(line []byte) (*http.Request, error) {
	method, rest, ok1 := strings.Cut(string(line), " ")
	target, version, ok2 := strings.Cut(rest, " ")
	if !ok1 || !ok2 || method == "" || target == "" {
		return nil, badRequest(CauseRequestLine, "%q", truncate(line))
	}
	if !validToken(method) {
		return nil, badRequest(CauseRequestLine, "method %q", method)
	}
	r := &http.Request{Method: method, RequestURI: target, Header: http.Header{}}
	switch version {
	case "HTTP/1.1":
		r.Proto, r.ProtoMajor, r.ProtoMinor = version, 1, 1
	case "HTTP/1.0":
		r.Proto, r.ProtoMajor, r.ProtoMinor = version, 1, 0
	default:
		return nil, badRequest(CauseVersion, "%q", truncate([]byte(version)))
	}
	for i := 0; i < len(target); i++ {
		if c := target[i]; c <= ' ' || c == 0x7f || c >= 0x80 {
			return nil, badRequest(CauseTarget, "byte %#x", c)
		}
	}
	switch {
	case method == http.MethodConnect:
		// authority-form (RFC 9112 §3.2.3).
		if _, _, err := splitAuthority(target); err != nil {
			return nil, badRequest(CauseTarget, "CONNECT %q", target)
		}
		r.URL = &url.URL{Host: target}
		r.Host = target
	case target[0] == '/' || (target == "*" && method == http.MethodOptions):
		u, err := url.ParseRequestURI(target)
		if err != nil {
			return nil, badRequest(CauseTarget, "%v", err)
		}
		r.URL = u
	default:
		// absolute-form (§3.2.2): only http URIs; the authority becomes
		// the Host.
		u, err := url.ParseRequestURI(target)
		if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" || u.User != nil {
			return nil, badRequest(CauseTarget, "%q", truncate([]byte(target)))
		}
		r.URL = u
		r.Host = u.Host
	}
	return r, nil
}

func truncate(b []byte) string {
	if len(b) > 64 {
		return string(b[:64]) + "..."
	}
	return string(b)
}

// readHeader reads header fields until the empty line into h.
func readHeader(br *bufio.Reader, h http.Header, budget *int, max int, trailer bool) error {
	n := 0
	for {
		line, err := readLine(br, budget)
		if err != nil {
			if e, ok := err.(*Error); ok && trailer {
				e.Cause = CauseTrailer
			}
			return err
		}
		if len(line) == 0 {
			return nil
		}
		if line[0] == ' ' || line[0] == '\t' {
			return badRequest(CauseObsFold, "continuation line")
		}
		if n++; n > max {
			return &Error{Status: http.StatusRequestHeaderFieldsTooLarge, Cause: CauseTooManyHeaders, Detail: strconv.Itoa(max)}
		}
		name, value, ok := bytes.Cut(line, []byte(":"))
		if !ok || len(name) == 0 || !validToken(string(name)) {
			// Also "Name :" (RFC 9112 §5.1: MUST be rejected).
			return badRequest(CauseHeaderName, "%q", truncate(name))
		}
		value = bytes.Trim(value, " \t")
		if !httpguts.ValidHeaderFieldValue(string(value)) {
			return badRequest(CauseHeaderValue, "field %s", name)
		}
		key := textproto.CanonicalMIMEHeaderKey(string(name))
		h[key] = append(h[key], string(value))
	}
}

func validToken(s string) bool {
	if s == "" {
		return false
	}
	for i := 0; i < len(s); i++ {
		if !httpguts.IsTokenRune(rune(s[i])) {
			return false
		}
	}
	return true
}

// frame decides the body of r from its header fields and sets Body,
// ContentLength, TransferEncoding, Host and Close.
func frame(r *http.Request, br *bufio.Reader, lim Limits) error {
	h := r.Header
	hosts := h["Host"]
	switch {
	case len(hosts) > 1:
		return badRequest(CauseHost, "repeated Host")
	case len(hosts) == 1:
		if !httpguts.ValidHostHeader(hosts[0]) {
			return badRequest(CauseHost, "%q", hosts[0])
		}
		if r.Host == "" {
			r.Host = hosts[0]
		}
	case r.ProtoMinor == 1 && r.Host == "":
		// RFC 9112 §3.2: a server MUST answer 400 to an HTTP/1.1 request
		// without Host.
		return badRequest(CauseHost, "missing")
	}
	delete(h, "Host")

	cls, tes := h["Content-Length"], h["Transfer-Encoding"]
	if len(tes) > 0 && len(cls) > 0 {
		return badRequest(CauseCLAndTE, "")
	}
	conn := connectionTokens(h)
	r.Close = r.ProtoMinor == 0 && !conn["keep-alive"] || conn["close"]
	switch {
	case len(tes) > 0:
		if r.ProtoMinor == 0 {
			return badRequest(CauseTransferEncoding, "in HTTP/1.0")
		}
		if len(tes) != 1 || !strings.EqualFold(strings.TrimSpace(tes[0]), "chunked") {
			return &Error{Status: http.StatusNotImplemented, Cause: CauseTransferEncoding, Detail: strings.Join(tes, ", ")}
		}
		delete(h, "Transfer-Encoding")
		r.TransferEncoding = []string{"chunked"}
		r.ContentLength = -1
		r.Body = &chunkedBody{br: br, cr: httputil.NewChunkedReader(br), req: r, lim: lim}
	case len(cls) > 0:
		if len(cls) > 1 || strings.Contains(cls[0], ",") {
			return badRequest(CauseDupContentLength, "%q", strings.Join(cls, ", "))
		}
		n, err := parseContentLength(cls[0])
		if err != nil {
			return badRequest(CauseContentLength, "%q", cls[0])
		}
		r.ContentLength = n
		if n == 0 {
			r.Body = http.NoBody
		} else {
			r.Body = &lengthBody{br: br, left: n}
		}
	default:
		r.Body = http.NoBody
	}
	return nil
}

// connectionTokens returns the Connection field's options, lower case.
func connectionTokens(h http.Header) map[string]bool {
	out := map[string]bool{}
	for _, v := range h["Connection"] {
		for _, t := range strings.Split(v, ",") {
			if t = strings.ToLower(strings.TrimSpace(t)); t != "" {
				out[t] = true
			}
		}
	}
	return out
}

func parseContentLength(s string) (int64, error) {
	if s == "" || len(s) > 18 {
		return 0, errors.New("bad length")
	}
	for i := 0; i < len(s); i++ {
		if s[i] < '0' || s[i] > '9' {
			return 0, errors.New("bad length")
		}
	}
	return strconv.ParseInt(s, 10, 64)
}

func splitAuthority(a string) (host, port string, err error) {
	i := strings.LastIndexByte(a, ':')
	if i <= 0 || i == len(a)-1 {
		return "", "", errors.New("no port")
	}
	if _, err := strconv.ParseUint(a[i+1:], 10, 16); err != nil {
		return "", "", err
	}
	return a[:i], a[i+1:], nil
}

// lengthBody reads a Content-Length body.
type lengthBody struct {
	br   *bufio.Reader
	left int64
	err  error
}

func (b *lengthBody) Read(p []byte) (int, error) {
	if b.err != nil {
		return 0, b.err
	}
	if b.left == 0 {
		return 0, io.EOF
	}
	if int64(len(p)) > b.left {
		p = p[:b.left]
	}
	n, err := b.br.Read(p)
	b.left -= int64(n)
	if err == io.EOF {
		err = &Error{Status: http.StatusBadRequest, Cause: CauseBodyTruncated}
	}
	if err != nil {
		b.err = err
	} else if b.left == 0 {
		b.err = io.EOF
		err = io.EOF
	}
	return n, err
}

func (b *lengthBody) Close() error { return nil }

// chunkedBody decodes a chunked body and reads its trailer section into
// the request's Trailer.
type chunkedBody struct {
	br   *bufio.Reader
	cr   io.Reader
	req  *http.Request
	lim  Limits
	done bool
	err  error
}

func (b *chunkedBody) Read(p []byte) (int, error) {
	if b.err != nil {
		return 0, b.err
	}
	n, err := b.cr.Read(p)
	switch {
	case err == io.EOF:
		budget := b.lim.MaxTrailerBytes
		tr := http.Header{}
		if terr := readHeader(b.br, tr, &budget, b.lim.MaxHeaders, true); terr != nil {
			if e, ok := terr.(*Error); ok {
				e.Cause = CauseTrailer
				err = e
			} else {
				err = &Error{Status: http.StatusBadRequest, Cause: CauseBodyTruncated, Detail: terr.Error()}
			}
			break
		}
		if len(tr) > 0 {
			b.req.Trailer = tr
		}
		b.done = true
	case err == io.ErrUnexpectedEOF:
		err = &Error{Status: http.StatusBadRequest, Cause: CauseBodyTruncated}
	case err != nil:
		if _, ok := err.(*Error); !ok {
			err = &Error{Status: http.StatusBadRequest, Cause: CauseChunked, Detail: err.Error()}
		}
	}
	if err != nil {
		b.err = err
	}
	return n, err
}

func (b *chunkedBody) Close() error { return nil }

// Complete reports whether body, a Body ReadRequest returned, has been
// read to its end: only then does the connection hold the next request.
func Complete(body io.ReadCloser) bool {
	switch b := body.(type) {
	case *lengthBody:
		return b.left == 0 && (b.err == nil || b.err == io.EOF)
	case *chunkedBody:
		return b.done
	}
	return body == http.NoBody || body == nil
}
