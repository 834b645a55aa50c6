package proxy_test

import (
	"bytes"
	"context"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"

	"github.com/amber-mesh/amber/tunnel/hbone"
	"github.com/amber-mesh/amber/waypoint/proxy"
)

// TestHTTP1BadInput: requests a proxy must refuse rather than guess at,
// each a clear local reply (Envoy's codec form: the status text, the
// connection closed) and a counter, and nothing reaching the application.
func TestHTTP1BadInput(t *testing.T) {
	m := newMesh(t, meshOptions{limits: proxy.Limits{MaxRequestHeaderBytes: 8 << 10, MaxRequestBodyBytes: 1024, HeaderTimeout: 300 * time.Millisecond}})
	m.wp.Update(compile(t, golden(t, "base")))
	sleep := m.sleep()
	const head = "POST /productpage HTTP/1.1\r\nHost: productpage\r\n"
	for _, tc := range []struct {
		name    string
		payload string
		status  int
		body    string
		cause   string
	}{
		{"CL and TE", head + "Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400, "Bad Request", "content_length_and_transfer_encoding"},
		{"TE and CL", head + "Transfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n", 400, "Bad Request", "content_length_and_transfer_encoding"},
		{"duplicate Content-Length", head + "Content-Length: 5\r\nContent-Length: 5\r\n\r\nhello", 400, "Bad Request", "duplicate_content_length"},
		{"conflicting Content-Length", head + "Content-Length: 5, 6\r\n\r\nhello", 400, "Bad Request", "duplicate_content_length"},
		{"signed Content-Length", head + "Content-Length: +5\r\n\r\nhello", 400, "Bad Request", "content_length"},
		{"obs-fold", head + "X-A: a\r\n b\r\n\r\n", 400, "Bad Request", "obs_fold"},
		{"space in header name", head + "Bad Name: x\r\n\r\n", 400, "Bad Request", "header_name"},
		{"space before colon", head + "X-A : x\r\n\r\n", 400, "Bad Request", "header_name"},
		{"control character in value", head + "X-A: a\x01b\r\n\r\n", 400, "Bad Request", "header_value"},
		{"bare CR", head + "X-A: a\rb\r\n\r\n", 400, "Bad Request", "request_line"},
		{"unsupported transfer coding", head + "Transfer-Encoding: gzip, chunked\r\n\r\n", 501, "Not Implemented", "transfer_encoding"},
		{"no Host", "GET / HTTP/1.1\r\n\r\n", 400, "Bad Request", "host"},
		{"two Hosts", "GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400, "Bad Request", "host"},
		{"HTTP/1.2", "GET / HTTP/1.2\r\nHost: a\r\n\r\n", 400, "Bad Request", "http_version"},
		{"oversized header", head + "X-Big: " + strings.Repeat("a", 10<<10) + "\r\n\r\n", 431, "Request Header Fields Too Large", "header_too_large"},
		{"too many headers", head + strings.Repeat("X-A: 1\r\n", 101) + "\r\n", 431, "Request Header Fields Too Large", "too_many_headers"},
		{"declared body over the limit", head + "Content-Length: 2048\r\n\r\n" + strings.Repeat("a", 2048), 413, "Payload Too Large", "body_too_large"},
		{"slowloris", "GET /productpage HTTP/1.1\r\nHost: productpage\r\nX-A: 1\r\n", 408, "request header timeout", "header_timeout"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			before := m.refused(tc.cause)
			resp, body := sleep.raw(t, productpageVIP, tc.payload, tc.status != 413)
			if resp.StatusCode != tc.status || body != tc.body {
				t.Errorf("%d %q, want %d %q", resp.StatusCode, body, tc.status, tc.body)
			}
			if !resp.Close && tc.status != 413 {
				t.Errorf("connection kept after a refused request")
			}
			if resp.Header.Get("Server") != "istio-envoy" {
				t.Errorf("headers %v", resp.Header)
			}
			if n := m.refused(tc.cause); n != before+1 {
				t.Errorf("amber_waypoint_refused_total{cause=%q} went %v → %v", tc.cause, before, n)
			}
		})
	}
	if n := len(m.pods["productpage-v1"].app.requests()); n != 0 {
		t.Errorf("the application received %d of the refused requests", n)
	}
	// A chunked body that grows past the limit while being forwarded.
	chunk := strings.Repeat("a", 512)
	resp, body := sleep.raw(t, productpageVIP, head+"Transfer-Encoding: chunked\r\n\r\n"+
		strings.Repeat("200\r\n"+chunk+"\r\n", 4)+"0\r\n\r\n", false)
	if resp.StatusCode != 413 || body != "Payload Too Large" {
		t.Errorf("chunked body over the limit: %d %q", resp.StatusCode, body)
	}
}

// h2conn is a raw HTTP/2 client connection inside a CONNECT stream.
type h2conn struct {
	s   *hbone.Stream
	fr  *http2.Framer
	enc *hpack.Encoder
	buf bytes.Buffer
}

func (c *client) rawH2(t *testing.T, authority string) *h2conn {
	t.Helper()
	s, err := c.connect(context.Background(), authority)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	h := &h2conn{s: s, fr: http2.NewFramer(s, s)}
	h.enc = hpack.NewEncoder(&h.buf)
	if _, err := io.WriteString(s, http2.ClientPreface); err != nil {
		t.Fatal(err)
	}
	if err := h.fr.WriteSettings(); err != nil {
		t.Fatal(err)
	}
	return h
}

// block encodes header fields.
func (h *h2conn) block(fields ...string) []byte {
	h.buf.Reset()
	for i := 0; i+1 < len(fields); i += 2 {
		h.enc.WriteField(hpack.HeaderField{Name: fields[i], Value: fields[i+1]})
	}
	return append([]byte(nil), h.buf.Bytes()...)
}

func request(path string) []string {
	return []string{":method", "GET", ":scheme", "http", ":authority", "productpage", ":path", path}
}

// closed reads frames until the connection ends, which it must.
func (h *h2conn) closed(t *testing.T) {
	t.Helper()
	for {
		if _, err := h.fr.ReadFrame(); err != nil {
			return
		}
	}
}

// TestHTTP2Abuse: abuse of the inner HTTP/2 connection ends it, with a
// counter per cause.
func TestHTTP2Abuse(t *testing.T) {
	m := newMesh(t, meshOptions{limits: proxy.Limits{MaxRequestHeaderBytes: 8 << 10, HeaderTimeout: 300 * time.Millisecond}})
	m.wp.Update(compile(t, golden(t, "base")))
	sleep := m.sleep()

	t.Run("rapid reset", func(t *testing.T) {
		h := sleep.rawH2(t, productpageVIP)
		go h.closed(t)
		for id := uint32(1); id < 2*400; id += 2 {
			if err := h.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: h.block(request("/hold")...), EndHeaders: true, EndStream: true}); err != nil {
				break
			}
			if err := h.fr.WriteRSTStream(id, http2.ErrCodeCancel); err != nil {
				break
			}
		}
		m.waitRefused("h2_rapid_reset", 1)
	})
	t.Run("CONTINUATION flood", func(t *testing.T) {
		h := sleep.rawH2(t, productpageVIP)
		// A header whose value arrives one byte per CONTINUATION: valid
		// HPACK all along, so only the frame count is at fault.
		blk := h.block(request("/p")...)
		h.buf.Reset()
		h.enc.WriteField(hpack.HeaderField{Name: "x-flood", Value: strings.Repeat("a", 400)})
		lit := h.buf.Bytes()
		if err := h.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: append(blk, lit[:10]...), EndStream: true}); err != nil {
			t.Fatal(err)
		}
		for i := 10; i < len(lit)-1; i++ {
			if err := h.fr.WriteContinuation(1, false, lit[i:i+1]); err != nil {
				break
			}
		}
		h.closed(t)
		m.waitRefused("h2_continuation_flood", 1)
	})
	t.Run("unfinished header block", func(t *testing.T) {
		h := sleep.rawH2(t, productpageVIP)
		blk := h.block(request("/p")...)
		if err := h.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: blk[:len(blk)-1], EndStream: true}); err != nil {
			t.Fatal(err)
		}
		h.closed(t)
		m.waitRefused("h2_header_timeout", 1)
	})
	t.Run("invalid header name", func(t *testing.T) {
		h := sleep.rawH2(t, productpageVIP)
		if err := h.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: h.block(append(request("/p"), "X-Upper", "1")...), EndHeaders: true, EndStream: true}); err != nil {
			t.Fatal(err)
		}
		for {
			f, err := h.fr.ReadFrame()
			if err != nil {
				t.Fatalf("no RST_STREAM: %v", err)
			}
			if rst, ok := f.(*http2.RSTStreamFrame); ok {
				if rst.ErrCode != http2.ErrCodeProtocol {
					t.Errorf("RST_STREAM %v, want PROTOCOL_ERROR", rst.ErrCode)
				}
				break
			}
		}
		m.waitRefused("h2_malformed_request", 1)
	})
	t.Run("oversized header", func(t *testing.T) {
		resp, body := do(t, sleep.http2(productpageVIP), "GET", "http://productpage:9080/p", http.Header{"X-Big": {strings.Repeat("a", 10<<10)}}, nil)
		if resp.StatusCode != 431 || body != "Request Header Fields Too Large" {
			t.Errorf("%d %q", resp.StatusCode, body)
		}
		m.waitRefused("header_too_large", 1)
	})
	if n := len(m.pods["productpage-v1"].app.requests()); n > 0 {
		for _, e := range m.pods["productpage-v1"].app.requests() {
			if e.URI != "/hold" {
				t.Errorf("the application received %+v", e)
			}
		}
	}
}
