// Command echo is the local cluster's test server (it plays Istio's
// "productpage"): every HTTP request on :9080 (PORT overrides) is answered
// 200 with the serving pod's name and the request as the server saw it, so
// a client can tell which pod answered and from which source address.
package main

import (
	"cmp"
	"context"
	"fmt"
	"log"
	"net"
	"net/http"
	"os"
)

func main() {
	port := cmp.Or(os.Getenv("PORT"), "9080")
	host, _ := os.Hostname()
	// MPTCP off: the amber datapath cannot put MPTCP sockets in a SOCKMAP
	// and traffic to this server is what it captures.
	lc := net.ListenConfig{}
	lc.SetMultipathTCP(false)
	l, err := lc.Listen(context.Background(), "tcp", ":"+port)
	if err != nil {
		log.Fatal(err)
	}
	log.Printf("echo: listening on %s", l.Addr())
	http.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) {
		fmt.Fprintln(w, "ok")
	})
	http.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintf(w, "hostname=%s\nremote=%s\nmethod=%s\npath=%s\nhost=%s\n",
			host, r.RemoteAddr, r.Method, r.URL.Path, r.Host)
	})
	log.Fatal(http.Serve(l, nil))
}
