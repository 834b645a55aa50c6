// Package hbone speaks HBONE, Istio ambient's tunnel protocol: one HTTP/2
// CONNECT stream per proxied TCP connection, multiplexed over a mutual-TLS
// connection to port 15008, with a client connection pool and a server.
//
// It runs its own small HTTP/2 engine on top of x/net/http2's Framer and
// hpack rather than net/http, because a TCP tunnel needs half-close in both
// directions (an x/net/http2 server handler cannot end its response while
// the request body is still open) and large buffers only while data flows.
package hbone
