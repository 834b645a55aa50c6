package proxy

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/amber-mesh/amber/internal/testutil"
	"github.com/amber-mesh/amber/tunnel/ca"
	"github.com/amber-mesh/amber/tunnel/certs"
	"github.com/amber-mesh/amber/tunnel/hbone"
	"github.com/amber-mesh/amber/tunnel/sockopt"
	"github.com/amber-mesh/amber/xds/state"
)

// mustCerts returns a certificate manager on a local CA for cluster.local,
// closed when t ends.
func mustCerts(t *testing.T) *certs.Manager {
	t.Helper()
	local, err := ca.OpenLocal(t.TempDir(), "cluster.local")
	if err != nil {
		t.Fatal(err)
	}
	mgr := &certs.Manager{CA: local}
	t.Cleanup(func() { mgr.Close() })
	return mgr
}

type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) lines() []map[string]any {
	l.mu.Lock()
	defer l.mu.Unlock()
	var out []map[string]any
	for _, line := range strings.Split(l.b.String(), "\n") {
		var m map[string]any
		if json.Unmarshal([]byte(line), &m) == nil && m["msg"] == accessLogMsg {
			out = append(out, m)
		}
	}
	return out
}

// TestHBONERefusals sends CONNECTs a destination ztunnel must refuse with
// 400 before it looks at policy, over real mTLS on loopback, and checks
// what the client, the access log and the metrics see.
func TestHBONERefusals(t *testing.T) {
	mgr := mustCerts(t)
	pp := wl("productpage", state.ProtocolHBONE, "127.0.0.2")
	sleep := wl("sleep", state.ProtocolHBONE, "127.0.0.3")
	store := state.NewStore()
	store.Update(func(tx *state.Txn) { tx.PutWorkload(pp); tx.PutWorkload(sleep) })

	var logs lockedBuffer
	p, err := New(Config{
		Store: store, Certs: mgr, NodeName: "n1",
		Logger:  slog.New(slog.NewJSONHandler(&logs, nil)),
		Sockets: sockopt.Options{Mark: -1, NoTransparent: true},
	})
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.2:0")
	if err != nil {
		t.Fatal(err)
	}
	served := make(chan error, 1)
	go func() { served <- p.ServeHBONE(ln) }()
	t.Cleanup(func() {
		if err := p.Close(); err != nil {
			t.Error(err)
		}
		if err := <-served; !errors.Is(err, ErrClosed) {
			t.Errorf("ServeHBONE = %v, want ErrClosed", err)
		}
	})

	srcID, dstID := workloadID(sleep), workloadID(pp)
	client := &hbone.Pool{Dial: func(ctx context.Context, key hbone.Key) (net.Conn, error) {
		var d net.Dialer
		nc, err := d.DialContext(ctx, "tcp", key.Addr.String())
		if err != nil {
			return nil, err
		}
		tc := tls.Client(nc, mgr.ClientConfig(srcID, dstID))
		if err := tc.HandshakeContext(ctx); err != nil {
			nc.Close()
			return nil, err
		}
		return tc, nil
	}}
	t.Cleanup(func() { client.Close() })
	key := hbone.Key{Src: srcID.String(), Dst: dstID.String(), Addr: netip.MustParseAddrPort(ln.Addr().String())}

	for _, tc := range []struct {
		name, authority, reason string
	}{
		{"authority is not the connection's destination", "10.1.2.3:9080", errAuthority.Error()},
		{"ztunnel's own port", "127.0.0.2:15001", errReservedPort.Error()},
		{"loopback target", "127.0.0.2:9080", errBadTarget.Error()},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			s, err := client.Connect(ctx, key, tc.authority, http.Header{"Forwarded": {formatForwarded(netip.MustParseAddrPort("127.0.0.3:1234"), nil)}})
			var se *hbone.StatusError
			if !errors.As(err, &se) || se.Code != http.StatusBadRequest {
				if s != nil {
					s.Close()
				}
				t.Fatalf("Connect = %v, want 400", err)
			}
			// The 400 is sent before the line is logged.
			var line map[string]any
			testutil.Eventually(t, "the access-log line for "+tc.authority, func() bool {
				for _, l := range logs.lines() {
					if l[logKeyDstAddr] == tc.authority {
						line = l
					}
				}
				return line != nil
			})
			for k, want := range map[string]string{
				logKeyReporter: "destination",
				logKeySrcID:    srcID.String(),
				logKeySrcAddr:  "127.0.0.3:1234", // trusted: the peer is the workload at that address
				logKeyProtocol: protocolHBONE,
			} {
				if line[k] != want {
					t.Errorf("access log %s = %v, want %s", k, line[k], want)
				}
			}
			if e, _ := line[logKeyError].(string); !strings.Contains(e, tc.reason) {
				t.Errorf("access log error = %q, want it to say %q", e, tc.reason)
			}
		})
	}
	if got := p.Stats().BadRequests.Load(); got != 3 {
		t.Errorf("BadRequests = %d, want 3", got)
	}
	// A refused stream lets go of its connection's peer identity.
	testutil.Eventually(t, "no peer identity held by the refused streams", func() bool {
		p.peers.mu.Lock()
		defer p.peers.mu.Unlock()
		return len(p.peers.m) == 0
	})
	mfs, err := p.Metrics().Registry().Gather()
	if err != nil {
		t.Fatal(err)
	}
	var opened float64
	for _, mf := range mfs {
		if mf.GetName() != "istio_tcp_connections_opened_total" {
			continue
		}
		for _, m := range mf.GetMetric() {
			labels := map[string]string{}
			for _, l := range m.GetLabel() {
				labels[l.GetName()] = l.GetValue()
			}
			if len(labels) != 11 {
				t.Errorf("labels %v: want exactly Istio's 11", labels)
			}
			if labels["reporter"] == "destination" && labels["source_principal"] == srcID.String() &&
				labels["connection_security_policy"] == "mutual_tls" && labels["destination_service"] == "unknown" {
				opened += m.GetCounter().GetValue()
			}
		}
	}
	if opened != 3 {
		t.Errorf("istio_tcp_connections_opened_total{reporter=destination,source_principal=sleep} = %v, want 3", opened)
	}
}

// TestClientSource: the address an inbound CONNECT's application sees is
// the Forwarded one, else the TCP peer's, each only when its workload has
// the identity the peer proved.
func TestClientSource(t *testing.T) {
	sleep := wl("sleep", state.ProtocolHBONE, "10.0.0.3")
	waypoint := wl("waypoint", state.ProtocolTCP, "10.0.0.9")
	store := state.NewStore()
	store.Update(func(tx *state.Txn) { tx.PutWorkload(sleep); tx.PutWorkload(waypoint) })
	snap := store.Load()
	for _, tc := range []struct {
		name, peer, peerAddr, forwarded, want string
	}{
		{"ztunnel names its client", "sleep", "10.0.0.3:61000", `for="10.0.0.3:4711"`, "10.0.0.3:4711"},
		{"ztunnel from the node names its client", "sleep", "192.0.2.1:61000", `for="10.0.0.3:4711"`, "10.0.0.3:4711"},
		{"waypoint sends no Forwarded", "waypoint", "10.0.0.9:38000", "", "10.0.0.9:38000"},
		{"IPv4-mapped peer", "waypoint", "[::ffff:10.0.0.9]:38000", "", "10.0.0.9:38000"},
		{"Forwarded of another identity, own address", "waypoint", "10.0.0.9:38000", `for="10.0.0.3:4711"`, "10.0.0.9:38000"},
		{"neither is the peer's", "waypoint", "10.0.0.3:38000", `for="10.0.0.3:4711"`, ""},
		{"unknown address", "sleep", "192.0.2.1:61000", "", ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			peer := workloadID(map[string]*state.Workload{"sleep": sleep, "waypoint": waypoint}[tc.peer])
			src, w, ok := clientSource(snap, peer, netip.MustParseAddrPort(tc.peerAddr), tc.forwarded)
			switch {
			case tc.want == "" && ok:
				t.Errorf("source %s (%s), want none preserved", src, w.Name)
			case tc.want != "" && (!ok || src.String() != tc.want || w.Name != tc.peer):
				t.Errorf("source %s %v %v, want %s of %s", src, w, ok, tc.want, tc.peer)
			}
		})
	}
}
