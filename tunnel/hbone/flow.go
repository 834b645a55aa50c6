package hbone

import (
	"sync/atomic"
	"time"

	"golang.org/x/net/http2"
)

// connFlow is a connection's flow control (RFC 9113 §5.2, §6.9): the
// windows of the whole connection. sendWin, recvWin and updatesEarned are
// guarded by conn.mu; connUnacked is atomic, so that readers return window
// without taking conn.mu until a WINDOW_UPDATE is due. A stream's own
// windows are in its streamState, under conn.mu too; what a stream's
// reader has consumed (recvState.unacked) is under Stream.rmu.
//
// A writer takes window from both its stream and the connection before it
// queues DATA (awaitSendLocked) and waits on its wsig while either is
// empty; received DATA spends recvWin, and reading it returns the window
// to the peer once a quarter of it is due.
type connFlow struct {
	sendWin int64 // connection send window (RFC 9113 §6.9.1)
	recvWin int64 // connection receive window the peer may still use
	// updatesEarned is how many WINDOW_UPDATEs the peer may send without
	// spending frameBudgets.updateBudget: our DATA earns them.
	updatesEarned int
	// connUnacked is bytes read by the application, not yet returned with
	// WINDOW_UPDATE.
	connUnacked atomic.Int64
}

// onWindowUpdate takes the peer's WINDOW_UPDATE (RFC 9113 §6.9): more
// window for the connection or a stream, on the reader goroutine.
func (c *conn) onWindowUpdate(f *http2.WindowUpdateFrame) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.updatesEarned > 0 {
		c.updatesEarned--
	} else if !c.updateBudget.allow(time.Now()) {
		c.stats.WindowUpdateFloods.Add(1)
		return connError{http2.ErrCodeEnhanceYourCalm, "WINDOW_UPDATE flood"}
	}
	inc := int64(f.Increment)
	if f.StreamID == 0 {
		c.sendWin += inc
		if c.sendWin > maxWindow {
			c.stats.ProtocolErrors.Add(1)
			return connError{http2.ErrCodeFlowControl, "connection window overflow"}
		}
		c.wakeBlockedLocked()
		return nil
	}
	s := c.streams[f.StreamID]
	if s == nil {
		if c.idleLocked(f.StreamID) {
			c.stats.ProtocolErrors.Add(1)
			return connError{http2.ErrCodeProtocol, "WINDOW_UPDATE on idle stream"}
		}
		return nil // closed stream: RFC 9113 §6.9 allows it to arrive late
	}
	s.sendWin += inc
	if s.sendWin > maxWindow {
		if err := c.streamErrorBudget(); err != nil {
			return err
		}
		return c.resetLocked(s, http2.ErrCodeFlowControl)
	}
	s.wsig.notify()
	return nil
}

// peerInitialWindowLocked applies the peer's SETTINGS_INITIAL_WINDOW_SIZE:
// RFC 9113 §6.9.2, the change applies to every open stream.
func (c *conn) peerInitialWindowLocked(v uint32) error {
	delta := int64(v) - c.peerInitWin
	c.peerInitWin = int64(v)
	for _, st := range c.streams {
		st.sendWin += delta
		if st.sendWin > maxWindow {
			c.stats.ProtocolErrors.Add(1)
			return connError{http2.ErrCodeFlowControl, "INITIAL_WINDOW_SIZE overflows a stream window"}
		}
		if delta > 0 {
			st.wsig.notify()
		}
	}
	return nil
}

// creditConn returns n bytes of connection window to the peer once enough
// have accumulated to be worth a WINDOW_UPDATE.
func (c *conn) creditConn(n int64) {
	if inc := c.connCredit(n); inc > 0 {
		c.mu.Lock()
		c.sendConnUpdateLocked(inc)
		c.mu.Unlock()
	}
}

func (c *conn) creditConnLocked(n int64) {
	if inc := c.connCredit(n); inc > 0 {
		c.sendConnUpdateLocked(inc)
	}
}

func (c *conn) connCredit(n int64) int64 {
	if n <= 0 || c.connUnacked.Add(n) < int64(c.cfg.ConnWindow/4) {
		return 0
	}
	return c.connUnacked.Swap(0)
}

func (c *conn) sendConnUpdateLocked(inc int64) {
	if inc <= 0 || c.closed {
		return
	}
	c.recvWin += inc
	_ = c.wfr.WriteWindowUpdate(0, uint32(inc))
	c.signalWriter()
}

// consumedLocked counts n bytes read by the application and returns the
// stream window increment to send, once a quarter of the window is due.
func (s *Stream) consumedLocked(n int64) int64 {
	s.unacked += n
	if s.unacked < int64(s.c.cfg.StreamWindow/4) {
		return 0
	}
	inc := s.unacked
	s.unacked = 0
	return inc
}

// credit returns padding, which is never read, to the stream window.
func (s *Stream) credit(n int64) {
	s.rmu.Lock()
	inc := s.consumedLocked(n)
	s.rmu.Unlock()
	s.sendWindowUpdate(inc)
}

func (s *Stream) sendWindowUpdate(inc int64) {
	if inc <= 0 {
		return
	}
	c := s.c
	c.mu.Lock()
	// A stream the peer has finished sending on needs no more window.
	if s.inMap && !s.recvEnded && !c.closed {
		s.recvWin += inc
		_ = c.wfr.WriteWindowUpdate(s.id, uint32(inc))
		c.signalWriter()
	}
	c.mu.Unlock()
}

// awaitSendLocked waits until the stream may send a DATA frame and takes
// flow-control window for up to want bytes (RFC 9113 §6.9). c.mu is held
// on entry and on return.
func (s *Stream) awaitSendLocked(want int) (int, error) {
	c := s.c
	for {
		if err := s.writeErrLocked(); err != nil {
			return 0, err
		}
		room := len(c.pending) < writeBatchSize
		if s.sendWin > 0 && c.sendWin > 0 && room {
			k := min(int64(want), s.sendWin, c.sendWin, int64(c.peerMaxFrame), maxDataFrame)
			s.sendWin -= k
			c.sendWin -= k
			return int(k), nil
		}
		if (c.sendWin <= 0 || !room) && !s.waiting {
			s.waiting = true
			c.blocked = append(c.blocked, s)
		}
		sig, dl := s.wsig.wait(), s.wdl().wait()
		c.mu.Unlock()
		select {
		case <-sig:
		case <-dl:
		}
		c.mu.Lock()
	}
}
