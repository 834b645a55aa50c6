package hbone

import (
	"encoding/binary"
	"time"

	"golang.org/x/net/http2"
)

// keepaliveState is a connection's keepalive: a PING every PingInterval,
// and the connection closed when one stays unanswered for PingTimeout.
// Its fields are guarded by conn.mu; the timer's function takes conn.mu.
type keepaliveState struct {
	pingOut   bool    // a PING of ours awaits its ACK
	pingData  [8]byte // its payload
	pingSent  time.Time
	pingSeq   uint64
	keepTimer *time.Timer
}

// startKeepaliveLocked arms the keepalive timer, unless keepalive is off.
func (c *conn) startKeepaliveLocked() {
	if c.cfg.PingInterval > 0 {
		c.keepTimer = time.AfterFunc(c.cfg.PingInterval, c.keepalive)
	}
}

// keepalive sends a PING every PingInterval and closes a connection whose
// PING stays unanswered for PingTimeout.
func (c *conn) keepalive() {
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return
	}
	now := time.Now()
	if c.pingOut {
		if now.Sub(c.pingSent) >= c.cfg.PingTimeout {
			c.mu.Unlock()
			c.stats.KeepaliveTimeouts.Add(1)
			c.teardown(ErrKeepaliveTimeout)
			return
		}
	} else {
		c.pingSeq++
		binary.BigEndian.PutUint64(c.pingData[:], c.pingSeq)
		c.pingOut = true
		c.pingSent = now
		_ = c.wfr.WritePing(false, c.pingData)
		c.signalWriter()
	}
	c.keepTimer.Reset(min(c.cfg.PingInterval, c.cfg.PingTimeout))
	c.mu.Unlock()
}

func (c *conn) onPing(f *http2.PingFrame) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if f.IsAck() {
		if c.pingOut && f.Data == c.pingData {
			c.pingOut = false
		}
		return nil
	}
	if !c.pingBudget.allow(time.Now()) {
		c.stats.PingFloods.Add(1)
		return connError{http2.ErrCodeEnhanceYourCalm, "PING flood"}
	}
	if !c.controlRoomLocked() {
		return c.controlFlood()
	}
	_ = c.wfr.WritePing(true, f.Data)
	c.signalWriter()
	return nil
}
