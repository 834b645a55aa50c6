package tunnel

import (
	"log/slog"
	"net/netip"
	"sync"
	"sync/atomic"

	"github.com/amber-mesh/amber/bpf"
)

// membership answers proxy.Config.Captured from the membership map the
// agent pins under root. It is opened at its first use: the agent pins it
// before the ztunnel can register its listeners, so before any captured
// connection arrives. An address it cannot look up counts as captured:
// its connection then meets the inbound checks (fail closed), and the
// failure is logged once until a lookup succeeds again.
type membership struct {
	root string
	log  *slog.Logger

	failed atomic.Bool // the last open or lookup failed, and that was logged

	mu sync.Mutex // guards ms
	ms *bpf.Membership
}

func (m *membership) captured(a netip.Addr) bool {
	m.mu.Lock()
	if m.ms == nil {
		ms, err := bpf.OpenMembership(m.root)
		if err != nil {
			m.mu.Unlock()
			m.fail(err)
			return true
		}
		m.ms = ms
	}
	ms := m.ms
	m.mu.Unlock()
	ok, err := ms.Captured(a)
	if err != nil {
		m.fail(err)
		return true
	}
	m.failed.Store(false)
	return ok
}

// fail logs err unless the previous failure was logged and nothing
// succeeded since.
func (m *membership) fail(err error) {
	if !m.failed.Swap(true) {
		m.log.Warn("membership map unreadable: every plain TCP destination counts as captured and meets the inbound checks", "error", err)
	}
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
