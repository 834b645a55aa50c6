package http1

import (
	"bufio"
	"bytes"
	"errors"
	"io"
	"net/http"
	"strings"
	"testing"
)

func TestReadRequest(t *testing.T) {
	for _, tc := range []struct {
		name, in string
		cause    string // "" accepted
		status   int
		check    func(*testing.T, *http.Request, *bufio.Reader)
	}{
		{name: "simple", in: "GET /a?b HTTP/1.1\r\nHost: h\r\nX-A: 1\r\nX-A: 2\r\n\r\n", check: func(t *testing.T, r *http.Request, _ *bufio.Reader) {
			if r.Method != "GET" || r.RequestURI != "/a?b" || r.Host != "h" || r.Header["X-A"][1] != "2" || r.Close || r.Header.Get("Host") != "" {
				t.Errorf("%+v", r)
			}
		}},
		{name: "bare LF lines", in: "GET / HTTP/1.1\nHost: h\n\n"},
		{name: "leading empty line", in: "\r\nGET / HTTP/1.1\r\nHost: h\r\n\r\n"},
		{name: "HTTP/1.0 closes", in: "GET / HTTP/1.0\r\n\r\n", check: func(t *testing.T, r *http.Request, _ *bufio.Reader) {
			if !r.Close || r.ProtoMinor != 0 {
				t.Errorf("%+v", r)
			}
		}},
		{name: "absolute-form", in: "GET http://h:8/p HTTP/1.1\r\nHost: other\r\n\r\n", check: func(t *testing.T, r *http.Request, _ *bufio.Reader) {
			if r.Host != "h:8" || r.URL.RequestURI() != "/p" {
				t.Errorf("host %q uri %q", r.Host, r.URL.RequestURI())
			}
		}},
		{name: "content-length body then next request", in: "POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n\r\nabcGET", check: func(t *testing.T, r *http.Request, br *bufio.Reader) {
			b, _ := io.ReadAll(r.Body)
			rest, _ := io.ReadAll(br)
			if string(b) != "abc" || string(rest) != "GET" || !Complete(r.Body) {
				t.Errorf("body %q rest %q", b, rest)
			}
		}},
		{name: "chunked with trailer", in: "POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: Chunked\r\n\r\n3\r\nabc\r\n1;ext=1\r\nd\r\n0\r\nX-T: 1\r\n\r\nGET", check: func(t *testing.T, r *http.Request, br *bufio.Reader) {
			b, err := io.ReadAll(r.Body)
			rest, _ := io.ReadAll(br)
			if err != nil || string(b) != "abcd" || r.Trailer.Get("X-T") != "1" || string(rest) != "GET" || !Complete(r.Body) || r.ContentLength != -1 {
				t.Errorf("body %q %v trailer %v rest %q", b, err, r.Trailer, rest)
			}
		}},
		{name: "truncated body", in: "POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\nab", check: func(t *testing.T, r *http.Request, _ *bufio.Reader) {
			_, err := io.ReadAll(r.Body)
			var e *Error
			if !errors.As(err, &e) || e.Cause != CauseBodyTruncated || Complete(r.Body) {
				t.Errorf("%v", err)
			}
		}},
		{name: "bad chunk size", in: "POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", check: func(t *testing.T, r *http.Request, _ *bufio.Reader) {
			_, err := io.ReadAll(r.Body)
			var e *Error
			if !errors.As(err, &e) || e.Cause != CauseChunked {
				t.Errorf("%v", err)
			}
		}},
		{name: "CL+TE", in: "POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n", cause: CauseCLAndTE, status: 400},
		{name: "CL list", in: "POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 1,1\r\n\r\n", cause: CauseDupContentLength, status: 400},
		{name: "CL hex", in: "POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 0x1\r\n\r\n", cause: CauseContentLength, status: 400},
		{name: "TE in 1.0", in: "POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n", cause: CauseTransferEncoding, status: 400},
		{name: "TE twice", in: "POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n", cause: CauseTransferEncoding, status: 501},
		{name: "obs-fold", in: "GET / HTTP/1.1\r\nHost: h\r\nX: a\r\n\tb\r\n\r\n", cause: CauseObsFold, status: 400},
		{name: "NUL in value", in: "GET / HTTP/1.1\r\nHost: h\r\nX: a\x00\r\n\r\n", cause: CauseHeaderValue, status: 400},
		{name: "empty name", in: "GET / HTTP/1.1\r\nHost: h\r\n: a\r\n\r\n", cause: CauseHeaderName, status: 400},
		{name: "two spaces", in: "GET  / HTTP/1.1\r\nHost: h\r\n\r\n", cause: CauseRequestLine, status: 400},
		{name: "space in target", in: "GET /a b HTTP/1.1\r\nHost: h\r\n\r\n", cause: CauseVersion, status: 400},
		{name: "non-ASCII target", in: "GET /\xff HTTP/1.1\r\nHost: h\r\n\r\n", cause: CauseTarget, status: 400},
		{name: "bad Host", in: "GET / HTTP/1.1\r\nHost: a b\r\n\r\n", cause: CauseHost, status: 400},
		{name: "too large", in: "GET / HTTP/1.1\r\nHost: h\r\nX: " + strings.Repeat("a", 100) + "\r\n\r\n", cause: CauseHeaderTooLarge, status: 431},
	} {
		t.Run(tc.name, func(t *testing.T) {
			br := bufio.NewReaderSize(strings.NewReader(tc.in), 16)
			r, err := ReadRequest(br, Limits{MaxHeaderBytes: 96})
			if tc.cause != "" {
				var e *Error
				if !errors.As(err, &e) || e.Cause != tc.cause || e.Status != tc.status {
					t.Fatalf("%v, want %s %d", err, tc.cause, tc.status)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if tc.check != nil {
				tc.check(t, r, br)
			}
		})
	}
	if _, err := ReadRequest(bufio.NewReader(strings.NewReader("")), Limits{}); err != io.EOF {
		t.Errorf("empty connection: %v, want io.EOF", err)
	}
	if _, err := ReadRequest(bufio.NewReader(strings.NewReader("GET / HT")), Limits{}); err != io.ErrUnexpectedEOF {
		t.Errorf("cut request line: %v, want io.ErrUnexpectedEOF", err)
	}
}

func TestResponseWriter(t *testing.T) {
	for _, tc := range []struct {
		name  string
		req   string
		write func(w *ResponseWriter)
		want  string
		keep  bool
	}{
		{"chunked with trailer", "GET / HTTP/1.1\r\nHost: h\r\n\r\n", func(w *ResponseWriter) {
			w.Write([]byte("ab"))
			w.Header().Set(http.TrailerPrefix+"X-T", "1")
		}, "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nab\r\n0\r\nX-T: 1\r\n\r\n", true},
		{"content-length", "GET / HTTP/1.1\r\nHost: h\r\n\r\n", func(w *ResponseWriter) {
			w.Header().Set("Content-Length", "2")
			w.Write([]byte("ab"))
		}, "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nab", true},
		{"HTTP/1.0 close-delimited", "GET / HTTP/1.0\r\n\r\n", func(w *ResponseWriter) {
			w.Write([]byte("ab"))
		}, "HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nab", false},
		{"HEAD", "HEAD / HTTP/1.1\r\nHost: h\r\n\r\n", func(w *ResponseWriter) {
			w.Header().Set("Content-Length", "10")
			w.WriteHeader(200)
		}, "HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n", true},
		{"100 then 204", "GET / HTTP/1.1\r\nHost: h\r\n\r\n", func(w *ResponseWriter) {
			w.WriteHeader(100)
			w.WriteHeader(204)
		}, "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n", true},
		{"caller closes", "GET / HTTP/1.1\r\nHost: h\r\n\r\n", func(w *ResponseWriter) {
			w.Header().Set("Connection", "close")
			w.Header().Set("Content-Length", "0")
			w.WriteHeader(400)
		}, "HTTP/1.1 400 Bad Request\r\nConnection: close\r\nContent-Length: 0\r\n\r\n", false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r, err := ReadRequest(bufio.NewReader(strings.NewReader(tc.req)), Limits{})
			if err != nil {
				t.Fatal(err)
			}
			var out bytes.Buffer
			w := NewResponseWriter(bufio.NewWriter(&out), r, false)
			tc.write(w)
			if err := w.Finish(); err != nil {
				t.Fatal(err)
			}
			if got := canonical(out.String()); got != canonical(tc.want) || w.KeepAlive() != tc.keep {
				t.Errorf("got %q keep-alive %v, want %q %v", out.String(), w.KeepAlive(), tc.want, tc.keep)
			}
		})
	}
	r, _ := ReadRequest(bufio.NewReader(strings.NewReader("GET / HTTP/1.1\r\nHost: h\r\n\r\n")), Limits{})
	var out bytes.Buffer
	w := NewResponseWriter(bufio.NewWriter(&out), r, false)
	w.Header().Set("Content-Length", "5")
	w.Write([]byte("ab"))
	if err := w.Finish(); err == nil {
		t.Error("a short Content-Length body finished cleanly")
	}
	w = NewResponseWriter(bufio.NewWriter(&out), r, false)
	w.Write([]byte("ab"))
	w.Abort()
	if err := w.Finish(); err == nil || w.KeepAlive() {
		t.Error("an aborted response finished cleanly")
	}
}

// canonical sorts a response's header lines, whose order a map decides.
func canonical(s string) string {
	head, body, _ := strings.Cut(s, "\r\n\r\n")
	lines := strings.Split(head, "\r\n")
	first, fields := lines[0], lines[1:]
	for i := range fields {
		for j := i + 1; j < len(fields); j++ {
			if fields[j] < fields[i] {
				fields[i], fields[j] = fields[j], fields[i]
			}
		}
	}
	return first + "|" + strings.Join(fields, "|") + "|" + body
}
