package http1

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/textproto"
	"strconv"
	"strings"
)

// ErrBodyNotAllowed is returned by Write for a response that has no body
// (HEAD, 1xx, 204, 304), and ErrContentLength when more is written than
// the response's Content-Length.
var (
	ErrBodyNotAllowed = errors.New("http1: response has no body")
	ErrContentLength  = errors.New("http1: wrote more than the declared Content-Length")
)

// ResponseWriter writes one response to an HTTP/1 request. It implements
// http.ResponseWriter and http.Flusher; trailers are header keys with
// http.TrailerPrefix set before Finish (sent only with chunked framing).
// Framing follows the response's Content-Length when it has one, else
// chunked for HTTP/1.1 and close-delimited for HTTP/1.0.
type ResponseWriter struct {
	bw     *bufio.Writer
	req    *http.Request
	header http.Header

	status     int
	chunked    bool
	bodyless   bool
	length     int64 // -1: not declared
	written    int64
	close      bool
	err        error
	wroteFinal bool
}

// NewResponseWriter returns the writer of the response to req on bw.
// closeAfter forces "Connection: close" (a draining server).
func NewResponseWriter(bw *bufio.Writer, req *http.Request, closeAfter bool) *ResponseWriter {
	return &ResponseWriter{bw: bw, req: req, header: http.Header{}, length: -1, close: closeAfter || req.Close}
}

// Header returns the header map to set before WriteHeader.
func (w *ResponseWriter) Header() http.Header { return w.header }

// WriteHeader sends the status line and header. A 1xx status is sent at
// once and the header map is reset for the final response.
func (w *ResponseWriter) WriteHeader(code int) {
	if w.wroteFinal || w.err != nil {
		return
	}
	if code < 100 || code > 999 {
		code = http.StatusInternalServerError
	}
	if code < 200 && code != http.StatusSwitchingProtocols {
		w.writeHead(code, w.header, false)
		w.err = w.bw.Flush()
		w.header = http.Header{}
		return
	}
	w.status = code
	w.wroteFinal = true
	h := w.header
	w.bodyless = w.req.Method == http.MethodHead || code == http.StatusNoContent ||
		code == http.StatusNotModified || code == http.StatusSwitchingProtocols
	if cl := h.Get("Content-Length"); cl != "" {
		if n, err := parseContentLength(cl); err == nil {
			w.length = n
		} else {
			h.Del("Content-Length")
		}
	}
	delete(h, "Transfer-Encoding")
	if connectionTokens(h)["close"] {
		w.close = true
	}
	switch {
	case code == http.StatusSwitchingProtocols:
		delete(h, "Content-Length")
	case code == http.StatusNoContent || code == http.StatusNotModified:
		delete(h, "Content-Length")
		w.length = -1
	case w.bodyless:
	case w.length >= 0:
	case w.req.ProtoAtLeast(1, 1):
		w.chunked = true
		h.Set("Transfer-Encoding", "chunked")
	default:
		w.close = true
	}
	if w.close && code != http.StatusSwitchingProtocols {
		h.Set("Connection", "close")
	} else if !w.req.ProtoAtLeast(1, 1) && code != http.StatusSwitchingProtocols {
		h.Set("Connection", "keep-alive")
	}
	w.writeHead(code, h, true)
}

// writeHead writes the status line and the fields of h, except trailers.
func (w *ResponseWriter) writeHead(code int, h http.Header, final bool) {
	text := http.StatusText(code)
	if text == "" {
		text = "status code " + strconv.Itoa(code)
	}
	fmt.Fprintf(w.bw, "HTTP/1.1 %03d %s\r\n", code, text)
	for k, vs := range h {
		if strings.HasPrefix(k, http.TrailerPrefix) || k == "Trailer" && !w.chunked {
			continue
		}
		for _, v := range vs {
			writeField(w.bw, k, v)
		}
	}
	w.bw.WriteString("\r\n")
}

// writeField writes one header or trailer field. Values came through
// validated parsers; a CR, LF or NUL here would be a header injection, so
// it is replaced rather than trusted.
func writeField(bw *bufio.Writer, name, value string) {
	value = strings.Map(func(r rune) rune {
		if r == '\r' || r == '\n' || r == 0 {
			return ' '
		}
		return r
	}, value)
	bw.WriteString(name)
	bw.WriteString(": ")
	bw.WriteString(value)
	bw.WriteString("\r\n")
}

// Write writes body bytes, sending the header first if needed.
func (w *ResponseWriter) Write(p []byte) (int, error) {
	if !w.wroteFinal {
		w.WriteHeader(http.StatusOK)
	}
	if w.err != nil {
		return 0, w.err
	}
	if w.bodyless {
		if len(p) == 0 {
			return 0, nil
		}
		return 0, ErrBodyNotAllowed
	}
	if w.length >= 0 && w.written+int64(len(p)) > w.length {
		return 0, ErrContentLength
	}
	if len(p) == 0 {
		return 0, nil
	}
	if w.chunked {
		fmt.Fprintf(w.bw, "%x\r\n", len(p))
	}
	n, err := w.bw.Write(p)
	if w.chunked && err == nil {
		_, err = w.bw.WriteString("\r\n")
	}
	w.written += int64(n)
	if err != nil {
		w.err = err
	}
	return n, err
}

// Flush sends what is buffered.
func (w *ResponseWriter) Flush() {
	if !w.wroteFinal {
		w.WriteHeader(http.StatusOK)
	}
	if w.err == nil {
		w.err = w.bw.Flush()
	}
}

// Finish ends the response: the last chunk and trailers, and a flush. It
// reports an error when the response is incomplete (fewer bytes than its
// Content-Length): the connection must then be closed.
func (w *ResponseWriter) Finish() error {
	if !w.wroteFinal {
		w.WriteHeader(http.StatusOK)
	}
	if w.err != nil {
		return w.err
	}
	if w.chunked {
		w.bw.WriteString("0\r\n")
		for k, vs := range w.header {
			name, ok := strings.CutPrefix(k, http.TrailerPrefix)
			if !ok {
				continue
			}
			name = textproto.CanonicalMIMEHeaderKey(name)
			for _, v := range vs {
				writeField(w.bw, name, v)
			}
		}
		w.bw.WriteString("\r\n")
	}
	if err := w.bw.Flush(); err != nil {
		w.err = err
		return err
	}
	if !w.bodyless && w.length >= 0 && w.written != w.length {
		w.err = io.ErrShortWrite
		return fmt.Errorf("http1: response body %d bytes, Content-Length %d", w.written, w.length)
	}
	return nil
}

// Abort ends the response unfinished: Finish then writes nothing more
// and reports an error, so that the caller closes the connection and the
// client sees a truncated response rather than a complete-looking one.
func (w *ResponseWriter) Abort() {
	if w.err == nil {
		w.err = errAborted
	}
}

var errAborted = errors.New("http1: response aborted")

// Status is the final status sent, 0 before WriteHeader.
func (w *ResponseWriter) Status() int { return w.status }

// Written is the number of body bytes written.
func (w *ResponseWriter) Written() int64 { return w.written }

// Started reports whether the final response header was written: a
// failure after it can only end the connection.
func (w *ResponseWriter) Started() bool { return w.wroteFinal }

// KeepAlive reports whether the connection may carry another request.
func (w *ResponseWriter) KeepAlive() bool {
	return !w.close && w.err == nil && w.status != http.StatusSwitchingProtocols
}
