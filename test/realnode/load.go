package realnode

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"slices"
	"strings"
	"sync"
	"time"
)

// PodClient is an HTTP client whose connections are opened inside the
// network namespace nsPath (a pod's, PodNetns): amber captures them as
// that pod's own, with its identity. Without keepAlive every request
// opens a connection of its own, as curl does, so that each one is
// routed afresh (a new HBONE stream from the ztunnel, a new waypoint
// pick); with it, connections are reused, as a long-running client's.
func PodClient(nsPath string, timeout time.Duration, keepAlive bool) *http.Client {
	return &http.Client{
		Timeout: timeout,
		Transport: &http.Transport{
			DialContext: func(ctx context.Context, _, addr string) (net.Conn, error) {
				return DialFrom(ctx, nsPath, addr)
			},
			DisableKeepAlives:   !keepAlive,
			MaxIdleConnsPerHost: 256,
		},
	}
}

// Response is what a Request received.
type Response struct {
	Status int
	Body   string
}

// Get sends method to url with Host host (the Service name and port a
// pod's curl would send) and reads the whole answer.
func Get(ctx context.Context, c *http.Client, method, url, host string) (Response, error) {
	req, err := http.NewRequestWithContext(ctx, method, url, nil)
	if err != nil {
		return Response{}, err
	}
	req.Host = host
	resp, err := c.Do(req)
	if err != nil {
		return Response{}, err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return Response{Status: resp.StatusCode, Body: string(b)}, err
}

// PageError is what is wrong with a productpage answer to a GET of
// /productpage from a client the policy admits: nil for a 200 page with
// both details and reviews, an error naming the failure otherwise (a
// backend behind the waypoint that failed shows only in the page, which
// productpage answers 200 regardless).
func PageError(r Response, err error) error {
	switch {
	case err != nil:
		return err
	case r.Status != http.StatusOK:
		return fmt.Errorf("status %d: %.200s", r.Status, r.Body)
	case strings.Contains(r.Body, "Error fetching product details"):
		return errors.New("page without details")
	case strings.Contains(r.Body, "Error fetching product reviews"):
		return errors.New("page without reviews")
	}
	return nil
}

// Load is a stream of requests at a fixed rate (StartLoad). Its
// exported fields are final once Wait returned.
type Load struct {
	// OK and Failed count the requests; Errors holds the first few
	// failures, each once.
	OK, Failed int
	Errors     []string
	// Latencies of the successful requests, sorted.
	Latencies []time.Duration
	// Late counts requests started more than one interval after their
	// slot: the generator could not keep the rate.
	Late int

	mu   sync.Mutex // guards the fields above until done is closed
	done chan struct{}
}

// StartLoad calls do at rate per second, each call in its own goroutine
// (an open-loop generator: a slow answer does not delay the next
// request), until ctx is done; Wait waits for the calls in flight.
func StartLoad(ctx context.Context, rate int, do func(context.Context) error) *Load {
	l := &Load{done: make(chan struct{})}
	go l.run(ctx, time.Second/time.Duration(rate), do)
	return l
}

func (l *Load) run(ctx context.Context, interval time.Duration, do func(context.Context) error) {
	var wg sync.WaitGroup
	defer func() {
		wg.Wait()
		slices.Sort(l.Latencies)
		close(l.done)
	}()
	start := time.Now()
	for i := 0; ; i++ {
		slot := start.Add(time.Duration(i) * interval)
		select {
		case <-ctx.Done():
			return
		case <-time.After(time.Until(slot)):
		}
		late := time.Since(slot) > interval
		wg.Go(func() {
			t0 := time.Now()
			// The request outlives ctx, which only ends the stream.
			err := do(context.WithoutCancel(ctx))
			d := time.Since(t0)
			l.mu.Lock()
			defer l.mu.Unlock()
			if late {
				l.Late++
			}
			if err != nil {
				l.Failed++
				if msg := err.Error(); len(l.Errors) < 5 && !slices.Contains(l.Errors, msg) {
					l.Errors = append(l.Errors, msg)
				}
				return
			}
			l.OK++
			l.Latencies = append(l.Latencies, d)
		})
	}
}

// Answered returns how many requests have been answered or failed so
// far; safe while the load runs.
func (l *Load) Answered() (ok, failed int) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.OK, l.Failed
}

// Wait waits until the stream has ended (its ctx is done) and every call
// in flight has returned, and returns l.
func (l *Load) Wait() *Load {
	<-l.done
	return l
}

// Quantile returns the q-quantile of the sorted latencies, 0 without
// any; call it after Wait.
func (l *Load) Quantile(q float64) time.Duration {
	if len(l.Latencies) == 0 {
		return 0
	}
	return l.Latencies[min(len(l.Latencies)-1, int(q*float64(len(l.Latencies))))]
}
