package hbone

import (
	"time"

	"golang.org/x/net/http2"
)

// The abuse limits: what a peer can make a connection do for frames that
// cost us work and carry no data, and how large the state it makes us keep
// may grow. The reader goroutine enforces them; a peer over one gets
// GOAWAY ENHANCE_YOUR_CALM (the write side's own bound, on replies the
// peer does not read, is controlRoomLocked in writer.go).
const (
	// Budgets for frames that cost us work but carry no data. Legitimate
	// peers send a PING every few seconds and SETTINGS once or twice.
	pingBurst, pingRate         = 100, 20
	settingsBurst, settingsRate = 20, 2
	// Streams the client resets before they were answered: the shape of
	// the HTTP/2 rapid reset attack (CVE-2023-44487), where each reset
	// stream costs the server a handler start.
	resetBurst, resetRate = 200, 50
	// Stream errors the peer provokes (malformed requests, frames on
	// half-closed streams, window overflows) each cost us a reply.
	streamErrBurst, streamErrRate = 200, 20
	// Frames that cost us a frame's work and carry nothing (CVE-2019-9518,
	// CVE-2019-9513): DATA without data or END_STREAM, WINDOW_UPDATEs no
	// DATA of ours prompted, PRIORITY frames beyond one per stream the
	// peer opened. No HBONE client sends the first, and the others come
	// from what we did: each DATA frame we send earns the peer
	// updatesPerData WINDOW_UPDATEs (one for the stream and one for the
	// connection, twice over for peers that return window in pieces), and
	// each stream it opens one PRIORITY. Earned frames are free up to
	// maxEarned; the rest spend from a budget like PING's.
	emptyBurst, emptyRate       = 100, 20
	updateBurst, updateRate     = 100, 20
	priorityBurst, priorityRate = 100, 20
	updatesPerData              = 4
	maxEarned                   = 4096
	// maxSettingsFrame bounds one SETTINGS frame: 64 settings, several
	// times as many as are defined.
	maxSettingsFrame = 64 * 6
	// maxGoAwayDebug bounds the GOAWAY debug data kept.
	maxGoAwayDebug = 256
	// maxContinuations bounds the CONTINUATION frames of one header block
	// (CVE-2024-27316 and relatives).
	maxContinuations = 64
)

// frameBudgets bound the work a peer can make a connection do with
// frames that carry no data (see the constants above). They belong to the
// reader goroutine, which spends them, and take no lock.
type frameBudgets struct {
	pingBudget     rateLimit
	settingsBudget rateLimit
	resetBudget    rateLimit
	streamErrs     rateLimit
	emptyBudget    rateLimit
	updateBudget   rateLimit // spent when connFlow.updatesEarned is 0
	priorityBudget rateLimit
	prioritiesEarn int // PRIORITY frames the peer may send without spending priorityBudget
}

func newFrameBudgets() frameBudgets {
	return frameBudgets{
		pingBudget:     newRateLimit(pingBurst, pingRate),
		settingsBudget: newRateLimit(settingsBurst, settingsRate),
		resetBudget:    newRateLimit(resetBurst, resetRate),
		streamErrs:     newRateLimit(streamErrBurst, streamErrRate),
		emptyBudget:    newRateLimit(emptyBurst, emptyRate),
		updateBudget:   newRateLimit(updateBurst, updateRate),
		priorityBudget: newRateLimit(priorityBurst, priorityRate),
	}
}

// streamErrorBudget spends one stream error the peer caused. Peers that
// keep causing them are answered with GOAWAY rather than an RST each.
// Called on the reader goroutine.
func (c *conn) streamErrorBudget() error {
	if c.streamErrs.allow(time.Now()) {
		return nil
	}
	c.stats.StreamErrorFloods.Add(1)
	return connError{http2.ErrCodeEnhanceYourCalm, "too many stream errors"}
}

// rateLimit is a token bucket: burst events at once, refilled at rate per
// second. It belongs to one goroutine (a connection's reader) and takes no
// lock.
type rateLimit struct {
	tokens float64
	last   time.Time
	rate   float64
	burst  float64
}

func newRateLimit(burst, perSecond float64) rateLimit {
	return rateLimit{tokens: burst, rate: perSecond, burst: burst}
}

// allow spends one token and reports whether there was one.
func (r *rateLimit) allow(now time.Time) bool {
	if !r.last.IsZero() {
		r.tokens = min(r.burst, r.tokens+now.Sub(r.last).Seconds()*r.rate)
	}
	r.last = now
	if r.tokens < 1 {
		return false
	}
	r.tokens--
	return true
}
