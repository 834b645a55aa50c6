// Command curl is the local cluster's test client: curl [-X METHOD]
// [-retry N] [-timeout D] URL... sends each URL a request (GET unless -X
// names another method, as curl's -X), prints the status line and body,
// and exits 1 when a request fails or answers a status of 400 or more. No
// shell is needed in its image. curl -sleep waits for SIGTERM: the
// container of a client Deployment (Istio's "sleep") that
// `kubectl exec deploy/sleep -- curl URL` runs in.
//
// Two more modes probe the node from inside a pod: curl -resolve-tcp NAME
// asks the pod's DNS server (its resolv.conf) over TCP only and prints
// the addresses; curl -whoami calls the API server through the
// `kubernetes` Service with client-go's in-cluster configuration (the
// pod's service-account token) and prints the user it was authenticated
// as (a SelfSubjectReview, which every authenticated user may create).
package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/signal"
	"syscall"
	"time"
)

func main() {
	method := flag.String("X", http.MethodGet, "request method")
	retry := flag.Int("retry", 0, "retries per URL after a failure, one second apart")
	timeout := flag.Duration("timeout", 5*time.Second, "timeout of each request")
	sleep := flag.Bool("sleep", false, "wait for SIGTERM or SIGINT, then exit 0")
	resolveTCP := flag.String("resolve-tcp", "", "resolve this name over TCP with the pod's DNS server, print the addresses")
	whoami := flag.Bool("whoami", false, "authenticate to the API server with the pod's service account (client-go in-cluster), print the user")
	flag.Parse()
	switch {
	case *resolveTCP != "":
		exitOn(resolveOverTCP(*resolveTCP, *timeout))
		return
	case *whoami:
		exitOn(whoAmI(*timeout))
		return
	}
	if *sleep {
		ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, os.Interrupt)
		defer stop()
		<-ctx.Done()
		return
	}
	if flag.NArg() == 0 {
		fmt.Fprintln(os.Stderr, "usage: curl [-X METHOD] [-retry N] [-timeout D] URL...")
		os.Exit(2)
	}
	// MPTCP off, as the echo server: captured connections must be TCP.
	d := &net.Dialer{}
	d.SetMultipathTCP(false)
	c := &http.Client{
		Timeout:   *timeout,
		Transport: &http.Transport{DialContext: d.DialContext, DisableKeepAlives: true},
	}
	failed := false
	for _, url := range flag.Args() {
		var err error
		for try := 0; try <= *retry; try++ {
			if try > 0 {
				time.Sleep(time.Second)
			}
			if err = do(c, *method, url); err == nil {
				break
			}
			fmt.Fprintf(os.Stderr, "curl: %v\n", err)
		}
		failed = failed || err != nil
	}
	if failed {
		os.Exit(1)
	}
}

func do(c *http.Client, method, url string) error {
	req, err := http.NewRequestWithContext(context.Background(), method, url, nil)
	if err != nil {
		return err
	}
	resp, err := c.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	fmt.Printf("%s %s\n", resp.Proto, resp.Status)
	if _, err := io.Copy(os.Stdout, resp.Body); err != nil {
		return fmt.Errorf("%s %s: read body: %w", method, url, err)
	}
	if resp.StatusCode >= 400 {
		return fmt.Errorf("%s %s: %s", method, url, resp.Status)
	}
	return nil
}
