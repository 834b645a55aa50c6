package tunnel

import (
	"context"
	"encoding/json"
	"net/http"
	"net/netip"
	"slices"
	"strings"
	"time"

	"github.com/amber-mesh/amber/bpf"
	"github.com/amber-mesh/amber/tunnel/authz"
	"github.com/amber-mesh/amber/tunnel/certs"
	"github.com/amber-mesh/amber/tunnel/identity"
	"github.com/amber-mesh/amber/tunnel/metrics"
	"github.com/amber-mesh/amber/tunnel/proxy"
	"github.com/amber-mesh/amber/xds/client"
	"github.com/amber-mesh/amber/xds/state"
)

// registerMetrics adds amber's own counters next to Istio's metrics.
func registerMetrics(reg *metrics.Metrics, cfg Config, px *proxy.Proxy, mgr *certs.Manager, xc *client.Client) error {
	regs := []struct {
		name, help, label string
		read              func() map[string]uint64
	}{
		{"amber_hbone_events_total", "HBONE client pool and server events.", "event",
			func() map[string]uint64 { return metrics.AtomicFields(px.HBONEStats()) }},
		{"amber_proxy_refused_total", "Connections the ztunnel refused or closed, by cause (authz_denied: refused by policy; authz_rejected_policy: by a policy the xDS client rejected, enforced fail-closed).", "reason",
			func() map[string]uint64 { return metrics.AtomicFields(px.Stats()) }},
		{"amber_certificate_events_total", "Workload certificate issuance events.", "event", func() map[string]uint64 {
			s := mgr.Stats()
			return map[string]uint64{"issued": s.Issued, "issue_failures": s.IssueFailures, "peers_rejected": s.PeersRejected}
		}},
		{"amber_xds_events_total", "xDS client events.", "event", func() map[string]uint64 { return xc.Stats().Counters() }},
	}
	if !cfg.NoCapture {
		regs = append(regs, struct {
			name, help, label string
			read              func() map[string]uint64
		}{"amber_capture_packets_total", "Packets the datapath programs passed, assigned or dropped, by reason.", "reason", func() map[string]uint64 {
			c, err := bpf.ReadCounters(cfg.PinRoot)
			if err != nil {
				return nil
			}
			return c
		}})
	}
	for _, r := range regs {
		if err := reg.RegisterCounterFunc(r.name, r.help, r.label, r.read); err != nil {
			return err
		}
	}
	return reg.RegisterCounterSamples("amber_accept_errors_total",
		"Failed accepts on the data plane's listeners, by errno (EMFILE: out of file descriptors); the listener backs off and retries.",
		[]string{"listener", "errno"}, func() []metrics.Sample {
			var out []metrics.Sample
			for l, byErrno := range px.AcceptErrors() {
				for errno, n := range byErrno {
					out = append(out, metrics.Sample{Labels: []string{l, errno}, Value: n})
				}
			}
			return out
		})
}

// configDump serves /config_dump: what this ztunnel believes about the
// mesh, as JSON.
type configDump struct {
	store *state.Store
	proxy *proxy.Proxy
	certs *certs.Manager
	xds   *client.Client
}

type dumpWorkload struct {
	UID                   string       `json:"uid"`
	Name                  string       `json:"name"`
	Namespace             string       `json:"namespace"`
	Identity              string       `json:"identity"`
	Node                  string       `json:"node"`
	Addresses             []netip.Addr `json:"addresses"`
	Protocol              string       `json:"protocol"`
	Waypoint              string       `json:"waypoint,omitempty"`
	Services              []string     `json:"services,omitempty"`
	AuthorizationPolicies []string     `json:"authorization_policies,omitempty"`
}

type dumpService struct {
	Name      string   `json:"name"`
	Namespace string   `json:"namespace"`
	Hostname  string   `json:"hostname"`
	VIPs      []string `json:"vips"`
	Ports     []uint16 `json:"ports"`
	Endpoints []string `json:"endpoints"`
	Waypoint  string   `json:"waypoint,omitempty"`
}

type dumpCert struct {
	Identity string    `json:"identity"`
	NotAfter time.Time `json:"not_after,omitzero"`
	Error    string    `json:"error,omitempty"`
}

type dump struct {
	Workloads    []dumpWorkload        `json:"workloads"`
	Services     []dumpService         `json:"services"`
	Policies     []authz.Authorization `json:"policies"`
	Certificates []dumpCert            `json:"certificates"`
	XDS          client.Stats          `json:"xds"`
}

func gateway(g *state.GatewayAddress) string {
	if g == nil {
		return ""
	}
	if g.ByHostname() {
		return g.Hostname.String()
	}
	return g.Address.String()
}

func (d *configDump) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	snap := d.store.Load()
	out := dump{Policies: snap.Policies().All(), XDS: d.xds.Stats(), Workloads: []dumpWorkload{}, Services: []dumpService{}, Certificates: []dumpCert{}}
	ids := map[identity.ID]bool{}
	for _, wl := range snap.Workloads() {
		id := identity.ID{TrustDomain: wl.TrustDomain, Namespace: wl.Namespace, ServiceAccount: wl.ServiceAccount}
		dw := dumpWorkload{
			UID: wl.UID, Name: wl.Name, Namespace: wl.Namespace, Identity: id.String(), Node: wl.Node,
			Addresses: wl.Addresses, Protocol: wl.Protocol.String(), Waypoint: gateway(wl.Waypoint),
			AuthorizationPolicies: wl.AuthorizationPolicies,
		}
		for k := range wl.Services {
			dw.Services = append(dw.Services, k.String())
		}
		slices.Sort(dw.Services)
		out.Workloads = append(out.Workloads, dw)
		if d.proxy.IsLocal(wl) && wl.Protocol == state.ProtocolHBONE {
			ids[id] = true
		}
	}
	for _, svc := range snap.Services() {
		ds := dumpService{Name: svc.Name, Namespace: svc.Namespace, Hostname: svc.Hostname, Waypoint: gateway(svc.Waypoint)}
		for _, v := range svc.VIPs {
			ds.VIPs = append(ds.VIPs, v.String())
		}
		for p := range svc.Ports {
			ds.Ports = append(ds.Ports, p)
		}
		slices.Sort(ds.Ports)
		for _, ep := range snap.Endpoints(svc.Key()) {
			ds.Endpoints = append(ds.Endpoints, ep.Workload.UID)
		}
		out.Services = append(out.Services, ds)
	}
	// Certificates of the local workloads; Get returns at once for a
	// certificate already held and starts issuing one that is not.
	ctx, cancel := context.WithTimeout(r.Context(), 2*time.Second)
	defer cancel()
	for id := range ids {
		dc := dumpCert{Identity: id.String()}
		if c, err := d.certs.Get(ctx, id); err != nil {
			dc.Error = err.Error()
		} else {
			dc.NotAfter = c.Leaf.NotAfter
		}
		out.Certificates = append(out.Certificates, dc)
	}
	slices.SortFunc(out.Certificates, func(a, b dumpCert) int { return strings.Compare(a.Identity, b.Identity) })
	w.Header().Set("Content-Type", "application/json")
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	enc.Encode(out)
}
