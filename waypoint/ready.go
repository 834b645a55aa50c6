package waypoint

import (
	"errors"
	"fmt"
	"net/http"
	"sync"
	"sync/atomic"

	"github.com/amber-mesh/amber/waypoint/config"
	"github.com/amber-mesh/amber/waypoint/discovery"
)

// readiness is pilot-agent's readiness of a waypoint
// (pilot/cmd/pilot-agent/status/ready/probe.go): ready once LDS and CDS
// have each been updated successfully at least once and the proxy is
// serving, which for Envoy means its initial clusters are warm (their
// endpoints arrived) — and here also that the waypoint's certificate is
// there, without which no HBONE handshake succeeds. Once ready it stays
// ready, as pilot-agent caches it (a later NACK, or istiod going away,
// keeps the last good configuration serving), until the waypoint drains.
type readiness struct {
	set     *discovery.Set
	onReady func()
	// listening, when set, reports the data path's listeners that could
	// not be opened (a gateway's).
	listening func() error

	cert     atomic.Bool
	draining atomic.Bool
	ready    atomic.Bool
	once     sync.Once
}

var (
	errDraining = errors.New("server is terminated: draining")
	errNoCert   = errors.New("no certificate from istiod's CA yet")
	errEDS      = errors.New("config not fully received from XDS server: endpoints of some clusters")
)

// check reports why the waypoint is not ready, or nil. It latches
// readiness the first time everything is there.
func (r *readiness) check() error {
	if r.draining.Load() {
		return errDraining
	}
	if r.ready.Load() {
		return nil
	}
	lds, cds := r.set.Updates(config.ListenerType), r.set.Updates(config.ClusterType)
	stats := fmt.Sprintf("cds updates: %d successful, %d rejected; lds updates: %d successful, %d rejected", cds.Success, cds.Rejected, lds.Success, lds.Rejected)
	switch {
	case lds.Success == 0 && cds.Success == 0 && lds.Rejected == 0 && cds.Rejected == 0:
		return fmt.Errorf("config not received from XDS server (is Istiod running?): %s", stats)
	case (lds.Success == 0 || cds.Success == 0) && (lds.Rejected > 0 || cds.Rejected > 0):
		return fmt.Errorf("config received from XDS server, but was rejected: %s", stats)
	case lds.Success == 0 || cds.Success == 0:
		return fmt.Errorf("config not fully received from XDS server: %s", stats)
	case !r.set.EndpointsWarm():
		return errEDS
	case !r.cert.Load():
		return errNoCert
	}
	if r.listening != nil {
		if err := r.listening(); err != nil {
			return err
		}
	}
	r.ready.Store(true)
	if r.onReady != nil {
		r.once.Do(r.onReady)
	}
	return nil
}

// ServeHTTP is /healthz/ready: 200 when ready, 503 with the reason.
func (r *readiness) ServeHTTP(w http.ResponseWriter, _ *http.Request) {
	if err := r.check(); err != nil {
		http.Error(w, err.Error(), http.StatusServiceUnavailable)
		return
	}
	w.WriteHeader(http.StatusOK)
}
