// Package bookinfo holds what the four services of Istio's Bookinfo
// sample (samples/bookinfo/src in istio.io/istio: productpage, details,
// reviews, ratings), rewritten as static Go programs under test/images,
// share: their port, how they find each other, the headers they pass on,
// and an HTTP client that, like the originals, opens a new connection per
// request.
package bookinfo

import (
	"cmp"
	"context"
	"encoding/json"
	"fmt"
	"log"
	"net"
	"net/http"
	"os"
	"strconv"
	"strings"
	"time"
)

// Port is every Bookinfo service's port, on the pod and on its Service.
const Port = 9080

// forwarded are the request headers each service copies onto the requests
// it makes for a request (samples/bookinfo/src/productpage/productpage.py
// getForwardHeaders, reviews' headers_to_propagate): trace context and the
// user's identity, so that routing rules on them (end-user) apply on every
// hop.
var forwarded = []string{
	"x-request-id", "x-ot-span-context",
	"x-datadog-trace-id", "x-datadog-parent-id", "x-datadog-sampling-priority",
	"traceparent", "tracestate", "x-cloud-trace-context", "grpc-trace-bin",
	"x-b3-traceid", "x-b3-spanid", "x-b3-parentspanid", "x-b3-sampled", "x-b3-flags",
	"sw8", "end-user", "user-agent", "cookie", "authorization", "jwt",
}

// Forward returns the headers of r a service passes on to its backends.
func Forward(r *http.Request) http.Header {
	h := http.Header{}
	for _, k := range forwarded {
		if v := r.Header.Values(k); len(v) > 0 {
			h[http.CanonicalHeaderKey(k)] = v
		}
	}
	return h
}

// ServiceURL is the base URL of the Bookinfo service name, as the
// originals build it: host NAME_HOSTNAME (default name), then
// .SERVICES_DOMAIN if set, port NAME_SERVICE_PORT (default Port; Kubernetes
// sets it for a Service of that name in the pod's namespace).
func ServiceURL(name string) string {
	up := strings.ToUpper(name)
	host := cmp.Or(os.Getenv(up+"_HOSTNAME"), name)
	if d := os.Getenv("SERVICES_DOMAIN"); d != "" {
		host += "." + d
	}
	return fmt.Sprintf("http://%s:%s", host, cmp.Or(os.Getenv(up+"_SERVICE_PORT"), strconv.Itoa(Port)))
}

// Client returns an HTTP client whose requests time out after timeout and
// each use a connection of their own: the originals do not pool, "so that
// we can easily test load distribution across many versions of our
// backends" (productpage.py send_request) — with a kept-alive connection,
// an L4 balancer would pin every request to one version.
func Client(timeout time.Duration) *http.Client {
	d := &net.Dialer{Timeout: timeout}
	// MPTCP off: the amber datapath cannot put MPTCP sockets in a SOCKMAP.
	d.SetMultipathTCP(false)
	return &http.Client{Timeout: timeout, Transport: &http.Transport{DialContext: d.DialContext, DisableKeepAlives: true}}
}

// GetJSON GETs url with headers h and decodes a 200 answer's JSON body
// into v; any other status is an error naming it.
func GetJSON(ctx context.Context, c *http.Client, url string, h http.Header, v any) (status int, err error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return 0, err
	}
	for k, vs := range h {
		req.Header[k] = vs
	}
	resp, err := c.Do(req)
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return resp.StatusCode, fmt.Errorf("GET %s: %s", url, resp.Status)
	}
	if err := json.NewDecoder(resp.Body).Decode(v); err != nil {
		return resp.StatusCode, fmt.Errorf("GET %s: %w", url, err)
	}
	return resp.StatusCode, nil
}

// WriteJSON answers status with v as JSON.
func WriteJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(v)
}

// ServeBackend serves a backend service name (details, reviews, ratings)
// as the originals do: GET /health answers that Name is healthy, GET
// /name/ID answers with answer for the product ID, a number (anything else
// is answered 400 with an error).
func ServeBackend(name string, answer func(w http.ResponseWriter, r *http.Request, id int)) {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /health", func(w http.ResponseWriter, _ *http.Request) {
		WriteJSON(w, http.StatusOK, map[string]string{"status": strings.ToUpper(name[:1]) + name[1:] + " is healthy"})
	})
	mux.HandleFunc("GET /"+name+"/{id}", func(w http.ResponseWriter, r *http.Request) {
		id, err := strconv.Atoi(r.PathValue("id"))
		if err != nil || id < 0 {
			WriteJSON(w, http.StatusBadRequest, map[string]string{"error": "please provide numeric product id"})
			return
		}
		answer(w, r, id)
	})
	Serve(name, mux)
}

// Serve serves h on Port (PORT overrides it) until the listener fails,
// logging one line per request, as the originals' servers do.
func Serve(name string, h http.Handler) {
	port := cmp.Or(os.Getenv("PORT"), strconv.Itoa(Port))
	lc := net.ListenConfig{}
	lc.SetMultipathTCP(false)
	l, err := lc.Listen(context.Background(), "tcp", ":"+port)
	if err != nil {
		log.Fatalf("%s: %v", name, err)
	}
	log.Printf("%s: listening on %s", name, l.Addr())
	log.Fatal(http.Serve(l, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		lw := &statusWriter{ResponseWriter: w, status: http.StatusOK}
		h.ServeHTTP(lw, r)
		log.Printf("%s %s %s %d", r.RemoteAddr, r.Method, r.URL.Path, lw.status)
	})))
}

type statusWriter struct {
	http.ResponseWriter
	status int
}

func (w *statusWriter) WriteHeader(code int) {
	w.status = code
	w.ResponseWriter.WriteHeader(code)
}
