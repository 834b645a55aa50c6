package proxy

import (
	"crypto/tls"
	"sync"

	"github.com/amber-mesh/amber/tunnel/certs"
	"github.com/amber-mesh/amber/tunnel/identity"
)

// peers are the identities of the HBONE connections that carry live
// inbound streams, each parsed from its connection's certificate once
// rather than per stream: the streams' records share its strings, which
// an idle stream would otherwise hold a copy of. An entry lives while
// streams hold it and goes with the last; a connection whose streams all
// ended parses again for its next one.
type peers struct {
	mu sync.Mutex // guards the fields below
	m  map[*tls.Conn]*peer
}

// peer is an HBONE connection's peer identity, shared by its streams.
type peer struct {
	tc      *tls.Conn
	id      identity.ID
	streams int // streams holding it; guarded by peers.mu
}

// acquire returns the peer identity of tc, exactly as certs.PeerID does,
// held for a stream until release; an error is PeerID's.
func (ps *peers) acquire(tc *tls.Conn) (*peer, error) {
	ps.mu.Lock()
	pr := ps.m[tc]
	if pr != nil {
		pr.streams++
	}
	ps.mu.Unlock()
	if pr != nil {
		return pr, nil
	}
	id, err := certs.PeerID(tc.ConnectionState())
	if err != nil {
		return nil, err
	}
	ps.mu.Lock()
	defer ps.mu.Unlock()
	// Another stream of tc may have parsed it meanwhile.
	if pr = ps.m[tc]; pr == nil {
		if ps.m == nil {
			ps.m = make(map[*tls.Conn]*peer)
		}
		pr = &peer{tc: tc, id: id}
		ps.m[tc] = pr
	}
	pr.streams++
	return pr, nil
}

// release lets go of what acquire returned; nil does nothing.
func (ps *peers) release(pr *peer) {
	if pr == nil {
		return
	}
	ps.mu.Lock()
	defer ps.mu.Unlock()
	if pr.streams--; pr.streams == 0 {
		delete(ps.m, pr.tc)
	}
}
