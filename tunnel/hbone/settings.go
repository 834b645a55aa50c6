package hbone

import (
	"time"

	"golang.org/x/net/http2"
)

// Settings are the HTTP/2 parameters of one side of HBONE connections. The
// zero value gives ztunnel's values.
type Settings struct {
	// StreamWindow is the receive flow-control window of each stream,
	// advertised as SETTINGS_INITIAL_WINDOW_SIZE. Zero means 4 MiB.
	StreamWindow uint32
	// ConnWindow is the receive window of a whole connection. Zero means
	// 16 MiB.
	ConnWindow uint32
	// MaxFrameSize is the largest frame payload accepted, advertised as
	// SETTINGS_MAX_FRAME_SIZE. Zero means 1 MiB.
	MaxFrameSize uint32
	// MaxHeaderListSize bounds a received header list as RFC 9113 §6.5.2
	// counts it. Zero means 16 KiB.
	MaxHeaderListSize uint32
	// PingInterval is how often a keepalive PING is sent. Zero means 10s;
	// negative disables keepalive.
	PingInterval time.Duration
	// PingTimeout is how long a PING may stay unanswered before the
	// connection is closed. Zero means 20s.
	PingTimeout time.Duration
}

const (
	defaultStreamWindow      = 4 << 20
	defaultConnWindow        = 16 << 20
	defaultMaxFrameSize      = 1 << 20
	defaultMaxHeaderListSize = 16 << 10
	defaultPingInterval      = 10 * time.Second
	defaultPingTimeout       = 20 * time.Second

	// RFC 9113 §6.5.2 and §6.9.2 bounds.
	initialWindow = 65535
	maxWindow     = 1<<31 - 1
	minFrameSize  = 1 << 14
	maxFrameSize  = 1<<24 - 1
)

// resolved returns s with defaults filled in and values clamped to what
// RFC 9113 allows.
func (s Settings) resolved() Settings {
	if s.StreamWindow == 0 {
		s.StreamWindow = defaultStreamWindow
	}
	s.StreamWindow = min(s.StreamWindow, maxWindow)
	if s.ConnWindow == 0 {
		s.ConnWindow = defaultConnWindow
	}
	s.ConnWindow = min(max(s.ConnWindow, initialWindow), maxWindow)
	if s.MaxFrameSize == 0 {
		s.MaxFrameSize = defaultMaxFrameSize
	}
	s.MaxFrameSize = min(max(s.MaxFrameSize, minFrameSize), maxFrameSize)
	if s.MaxHeaderListSize == 0 {
		s.MaxHeaderListSize = defaultMaxHeaderListSize
	}
	if s.PingInterval == 0 {
		s.PingInterval = defaultPingInterval
	}
	if s.PingTimeout <= 0 {
		s.PingTimeout = defaultPingTimeout
	}
	return s
}

// maxHeaderBlock is the most header block bytes (HEADERS plus
// CONTINUATION payloads) read for one request or response. Anything bigger
// is a flood: the block must be decoded to keep HPACK state in sync, so it
// cannot be skipped, only refused with GOAWAY.
func (s Settings) maxHeaderBlock() int {
	return 2*int(s.MaxHeaderListSize) + 4<<10
}

func (s Settings) frames(server bool, maxStreams uint32) []http2.Setting {
	st := []http2.Setting{
		{ID: http2.SettingInitialWindowSize, Val: s.StreamWindow},
		{ID: http2.SettingMaxFrameSize, Val: s.MaxFrameSize},
		{ID: http2.SettingMaxHeaderListSize, Val: s.MaxHeaderListSize},
	}
	if server {
		st = append(st, http2.Setting{ID: http2.SettingMaxConcurrentStreams, Val: maxStreams})
	} else {
		// RFC 9113 §8.4: a client that cannot take pushes says so.
		st = append(st, http2.Setting{ID: http2.SettingEnablePush, Val: 0})
	}
	return st
}
