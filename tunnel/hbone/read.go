package hbone

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"
	"time"

	"golang.org/x/net/http2"

	"github.com/amber-mesh/amber/internal/logkey"
)

// readLoop reads and handles frames until the connection fails.
func (c *conn) readLoop() {
	defer close(c.readDone)
	err := c.readFrames()
	var ce connError
	if errors.As(err, &ce) {
		c.mu.Lock()
		last := c.maxPeerID
		c.mu.Unlock()
		c.shutdown(ce.code, ce.reason, &GoAwayError{Code: ce.code, LastStreamID: last, Debug: ce.reason}, true)
		c.log.Debug("hbone: connection error", logkey.Remote, c.nc.RemoteAddr(), logkey.Error, err)
		return
	}
	c.teardown(err)
}

// readFrames runs the receive side of the connection (RFC 9113 §4-6).
func (c *conn) readFrames() error {
	if err := c.side.readPreface(); err != nil {
		return err
	}
	for {
		fh, err := c.fr.ReadFrameHeader()
		if err != nil {
			if c.isServer && !c.sawSettings && errors.Is(err, os.ErrDeadlineExceeded) {
				c.stats.HandshakeTimeouts.Add(1)
			}
			return c.readError(err)
		}
		if !c.sawSettings {
			// RFC 9113 §3.4: the preface ends with a SETTINGS frame.
			if fh.Type != http2.FrameSettings || fh.Flags.Has(http2.FlagSettingsAck) {
				return c.protocolError(http2.ErrCodeProtocol, "first frame is not SETTINGS")
			}
		}
		switch fh.Type {
		case http2.FrameData:
			err = c.onData(fh)
		case http2.FrameHeaders:
			err = c.onHeaders(fh)
		case http2.FrameContinuation:
			err = c.onContinuation(fh)
		case http2.FramePriority, http2.FrameRSTStream, http2.FrameSettings, http2.FramePing,
			http2.FrameGoAway, http2.FrameWindowUpdate, http2.FramePushPromise:
			err = c.onControl(fh)
		default:
			// RFC 9113 §5.5: unknown frame types are ignored.
			_, err = io.CopyN(io.Discard, c.br, int64(fh.Length))
		}
		if err != nil {
			return err
		}
	}
}

func (c *conn) readError(err error) error {
	var ce http2.ConnectionError
	switch {
	case errors.Is(err, http2.ErrFrameTooLarge):
		return c.protocolError(http2.ErrCodeFrameSize, "frame larger than SETTINGS_MAX_FRAME_SIZE")
	case errors.As(err, &ce):
		reason := "invalid frame"
		if d := c.fr.ErrorDetail(); d != nil {
			reason = d.Error()
		}
		return c.protocolError(http2.ErrCode(ce), reason)
	case errors.Is(err, io.EOF):
		return ErrConnClosed
	}
	return fmt.Errorf("hbone: read: %w", err)
}

func (c *conn) protocolError(code http2.ErrCode, reason string) error {
	c.stats.ProtocolErrors.Add(1)
	return connError{code, reason}
}

// onControl handles the frames that carry no stream data.
func (c *conn) onControl(fh http2.FrameHeader) error {
	// Fixed-size frames are checked before their payload is read, so a
	// lying length cannot make the Framer buffer a megabyte.
	switch fh.Type {
	case http2.FramePing:
		if fh.Length != 8 {
			return c.protocolError(http2.ErrCodeFrameSize, "PING length")
		}
	case http2.FrameRSTStream, http2.FrameWindowUpdate:
		if fh.Length != 4 {
			return c.protocolError(http2.ErrCodeFrameSize, fh.Type.String()+" length")
		}
	case http2.FramePriority:
		if fh.Length != 5 {
			return c.protocolError(http2.ErrCodeFrameSize, "PRIORITY length")
		}
	case http2.FrameSettings:
		if fh.Length > maxSettingsFrame {
			c.stats.SettingsFloods.Add(1)
			return connError{http2.ErrCodeEnhanceYourCalm, "SETTINGS frame too large"}
		}
	case http2.FramePushPromise:
		// RFC 9113 §8.4: clients never push, and our client disables push.
		return c.protocolError(http2.ErrCodeProtocol, "PUSH_PROMISE")
	case http2.FrameGoAway:
		if fh.Length > 8+maxGoAwayDebug {
			return c.onLongGoAway(fh)
		}
	}
	f, err := c.fr.ReadFrameForHeader(fh)
	if err != nil {
		var se http2.StreamError
		if errors.As(err, &se) {
			return c.streamError(se.StreamID, se.Code)
		}
		return c.readError(err)
	}
	switch f := f.(type) {
	case *http2.SettingsFrame:
		return c.onSettings(f)
	case *http2.PingFrame:
		return c.onPing(f)
	case *http2.WindowUpdateFrame:
		return c.onWindowUpdate(f)
	case *http2.RSTStreamFrame:
		return c.onReset(f)
	case *http2.GoAwayFrame:
		return c.onGoAway(f.LastStreamID, f.ErrCode, f.DebugData())
	case *http2.PriorityFrame:
		if f.StreamDep == f.StreamID {
			// RFC 9113 §5.3.1: a stream cannot depend on itself.
			return c.streamError(f.StreamID, http2.ErrCodeProtocol)
		}
		// RFC 9113 §5.3.2 deprecates priority signalling; we ignore it,
		// and a peer that keeps sending it is flooding.
		if c.prioritiesEarn > 0 {
			c.prioritiesEarn--
		} else if !c.priorityBudget.allow(time.Now()) {
			c.stats.PriorityFloods.Add(1)
			return connError{http2.ErrCodeEnhanceYourCalm, "PRIORITY flood"}
		}
	}
	return nil
}

// onLongGoAway reads a GOAWAY whose debug data is longer than we keep.
func (c *conn) onLongGoAway(fh http2.FrameHeader) error {
	var p [8 + maxGoAwayDebug]byte
	if _, err := io.ReadFull(c.br, p[:]); err != nil {
		return c.readError(err)
	}
	if _, err := io.CopyN(io.Discard, c.br, int64(fh.Length)-int64(len(p))); err != nil {
		return c.readError(err)
	}
	if fh.StreamID != 0 {
		return c.protocolError(http2.ErrCodeProtocol, "GOAWAY on a stream")
	}
	return c.onGoAway(binary.BigEndian.Uint32(p[:4])&maxStreamID,
		http2.ErrCode(binary.BigEndian.Uint32(p[4:8])), p[8:])
}

func (c *conn) onSettings(f *http2.SettingsFrame) error {
	if f.IsAck() {
		return nil
	}
	if c.sawSettings && !c.settingsBudget.allow(time.Now()) {
		c.stats.SettingsFloods.Add(1)
		return connError{http2.ErrCodeEnhanceYourCalm, "SETTINGS flood"}
	}
	if !c.sawSettings {
		c.sawSettings = true
		c.side.prefaceDone()
	}
	for i := range f.NumSettings() {
		if err := f.Setting(i).Valid(); err != nil {
			var ce http2.ConnectionError
			if errors.As(err, &ce) {
				return c.protocolError(http2.ErrCode(ce), "invalid "+f.Setting(i).ID.String())
			}
			return c.protocolError(http2.ErrCodeProtocol, "invalid setting")
		}
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	for i := range f.NumSettings() {
		s := f.Setting(i)
		switch s.ID {
		case http2.SettingHeaderTableSize:
			c.henc.SetMaxDynamicTableSize(s.Val)
		case http2.SettingEnablePush:
			if !c.isServer && s.Val != 0 {
				// RFC 9113 §6.5.2: a server MUST NOT set ENABLE_PUSH to 1.
				c.stats.ProtocolErrors.Add(1)
				return connError{http2.ErrCodeProtocol, "server enabled push"}
			}
		case http2.SettingMaxConcurrentStreams:
			c.peerMaxStreams = s.Val
		case http2.SettingInitialWindowSize:
			if err := c.peerInitialWindowLocked(s.Val); err != nil {
				return err
			}
		case http2.SettingMaxFrameSize:
			c.peerMaxFrame = s.Val
		case http2.SettingMaxHeaderListSize:
			c.peerMaxHeaderList = s.Val
		}
	}
	if !c.controlRoomLocked() {
		return c.controlFlood()
	}
	_ = c.wfr.WriteSettingsAck()
	c.signalWriter()
	return nil
}

func (c *conn) onReset(f *http2.RSTStreamFrame) error {
	c.mu.Lock()
	s := c.streams[f.StreamID]
	if s == nil {
		idle := c.idleLocked(f.StreamID)
		c.mu.Unlock()
		if idle {
			return c.protocolError(http2.ErrCodeProtocol, "RST_STREAM on idle stream")
		}
		return nil
	}
	answered := s.responded
	if s.inBatch > 0 {
		c.dropStreamDataLocked(s)
	}
	var err error = &StreamError{Code: f.ErrCode, Remote: true}
	if f.ErrCode == http2.ErrCodeRefusedStream {
		// RFC 9113 §8.7: a refused stream was not processed; it may be retried.
		c.stats.StreamsRefused.Add(1)
		err = retryableError{err}
	}
	s.reset = true
	s.resetErr = err
	c.removeLocked(s)
	c.mu.Unlock()
	c.stats.StreamsReset.Add(1)
	c.creditConn(s.abort(err))
	// Only a server starts work (a handler) per stream the peer opens.
	if c.isServer && !answered && !c.resetBudget.allow(time.Now()) {
		c.stats.RapidResets.Add(1)
		return connError{http2.ErrCodeEnhanceYourCalm, "too many streams reset"}
	}
	return nil
}

func (c *conn) onGoAway(last uint32, code http2.ErrCode, debug []byte) error {
	c.stats.GoAwaysReceived.Add(1)
	ge := &GoAwayError{Code: code, LastStreamID: last, Debug: string(debug[:min(len(debug), maxGoAwayDebug)]), Remote: true}
	return c.side.peerGoAway(ge)
}

// streamError answers a stream error (RFC 9113 §5.4.2) with RST_STREAM.
func (c *conn) streamError(id uint32, code http2.ErrCode) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if err := c.streamErrorBudget(); err != nil {
		return err
	}
	s := c.streams[id]
	if s == nil {
		if c.idleLocked(id) {
			c.stats.ProtocolErrors.Add(1)
			return connError{http2.ErrCodeProtocol, "frame on idle stream"}
		}
		_ = c.wfr.WriteRSTStream(id, code)
		c.signalWriter()
		if !c.controlRoomLocked() {
			return c.controlFlood()
		}
		return nil
	}
	return c.resetLocked(s, code)
}

// onData handles a DATA frame, reading its payload straight into the
// stream's receive buffer.
func (c *conn) onData(fh http2.FrameHeader) error {
	id, n := fh.StreamID, int64(fh.Length)
	if id == 0 {
		return c.protocolError(http2.ErrCodeProtocol, "DATA on stream 0")
	}
	c.mu.Lock()
	if n > c.recvWin {
		c.mu.Unlock()
		return c.protocolError(http2.ErrCodeFlowControl, "connection window exceeded")
	}
	c.recvWin -= n
	s := c.streams[id]
	var rstCode http2.ErrCode
	switch {
	case s == nil:
		if c.idleLocked(id) {
			c.mu.Unlock()
			return c.protocolError(http2.ErrCodeProtocol, "DATA on idle stream")
		}
		// A stream we closed or reset: data in flight is dropped, but it
		// still counts against the connection window (RFC 9113 §6.9).
	case s.recvEnded:
		rstCode = http2.ErrCodeStreamClosed // RFC 9113 §5.1 half-closed (remote)
	case !s.responded && !c.isServer:
		rstCode = http2.ErrCodeProtocol // RFC 9113 §8.1: a response starts with HEADERS
	case n > s.recvWin:
		rstCode = http2.ErrCodeFlowControl
	default:
		s.recvWin -= n
	}
	if rstCode != 0 {
		if err := c.streamErrorBudget(); err != nil {
			c.mu.Unlock()
			return err
		}
		if err := c.resetLocked(s, rstCode); err != nil {
			c.mu.Unlock()
			return err
		}
		s = nil
	}
	c.mu.Unlock()

	data := n
	if fh.Flags.Has(http2.FlagDataPadded) {
		var pad [1]byte
		if data == 0 {
			return c.protocolError(http2.ErrCodeFrameSize, "padded DATA without pad length")
		}
		if _, err := io.ReadFull(c.br, pad[:]); err != nil {
			return c.readError(err)
		}
		data -= 1 + int64(pad[0])
		if data < 0 {
			// RFC 9113 §6.1: padding as long as the payload is a connection error.
			return c.protocolError(http2.ErrCodeProtocol, "DATA padding exceeds payload")
		}
	}
	if data == 0 && !fh.Flags.Has(http2.FlagDataEndStream) && !c.emptyBudget.allow(time.Now()) {
		c.stats.EmptyFrameFloods.Add(1)
		return connError{http2.ErrCodeEnhanceYourCalm, "empty DATA flood"}
	}
	if s == nil {
		if _, err := io.CopyN(io.Discard, c.br, n-boolInt(fh.Flags.Has(http2.FlagDataPadded))); err != nil {
			return c.readError(err)
		}
		c.creditConn(n)
		return nil
	}
	if data > 0 {
		if err := s.receive(c.br, int(data)); err != nil {
			return c.readError(err)
		}
	}
	if padded := n - data; padded > 0 {
		if _, err := io.CopyN(io.Discard, c.br, padded-1); err != nil {
			return c.readError(err)
		}
		// Padding is flow controlled but never read: return it now.
		c.creditConn(padded)
		s.credit(padded)
	}
	if fh.Flags.Has(http2.FlagDataEndStream) {
		c.onEndStream(s)
	}
	return nil
}

func boolInt(b bool) int64 {
	if b {
		return 1
	}
	return 0
}

// onEndStream records the peer's END_STREAM: reads see io.EOF once the
// buffered data is consumed.
func (c *conn) onEndStream(s *Stream) {
	c.mu.Lock()
	if s.recvEnded || !s.inMap {
		c.mu.Unlock()
		return
	}
	s.recvEnded = true
	if s.sendEnded {
		c.removeLocked(s)
	}
	c.mu.Unlock()
	s.rmu.Lock()
	if s.rerr == nil {
		s.rerr = io.EOF
	}
	s.rmu.Unlock()
	s.wakeRead()
}
