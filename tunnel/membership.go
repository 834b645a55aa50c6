package tunnel

import (
	"net/netip"
	"sync"

	"github.com/amber-mesh/amber/bpf"
)

// membership answers proxy.Config.Captured from the membership map the
// agent pins under root. It is opened at its first use: the agent pins it
// before the ztunnel can register its listeners, so before any captured
// connection arrives. An address it cannot look up counts as captured:
// its connection then meets the inbound checks (fail closed).
type membership struct {
	root string

	mu sync.Mutex // guards ms
	ms *bpf.Membership
}

func (m *membership) captured(a netip.Addr) bool {
	m.mu.Lock()
	if m.ms == nil {
		ms, err := bpf.OpenMembership(m.root)
		if err != nil {
			m.mu.Unlock()
			return true
		}
		m.ms = ms
	}
	ms := m.ms
	m.mu.Unlock()
	ok, err := ms.Captured(a)
	return ok || err != nil
}

// Close releases the map.
func (m *membership) Close() error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.ms == nil {
		return nil
	}
	err := m.ms.Close()
	m.ms = nil
	return err
}
