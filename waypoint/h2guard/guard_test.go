package h2guard

import (
	"bytes"
	"math/rand/v2"
	"net"
	"testing"

	"golang.org/x/net/http2"
)

// TestScannerSplits: frame boundaries are found however the byte stream
// is cut into reads.
func TestScannerSplits(t *testing.T) {
	var buf bytes.Buffer
	buf.WriteString(clientPreface)
	fr := http2.NewFramer(&buf, nil)
	fr.WriteSettings()
	fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: []byte("abc"), EndHeaders: false})
	fr.WriteContinuation(1, true, []byte("de"))
	fr.WriteData(1, true, bytes.Repeat([]byte("x"), 40000))
	fr.WriteRSTStream(3, http2.ErrCodeProtocol)
	want := []frameHeader{
		{length: 0, typ: 0x4},
		{length: 3, typ: frameHeaders, stream: 1},
		{length: 2, typ: frameContinuation, flags: flagEndHeaders, stream: 1},
		{length: 40000, typ: frameData, flags: flagEndStream, stream: 1},
		{length: 4, typ: frameRSTStream, stream: 3},
	}
	b := buf.Bytes()
	for seed := range uint64(50) {
		r := rand.New(rand.NewPCG(seed, 0))
		s := scanner{skip: len(clientPreface)}
		var got []frameHeader
		var rstCode []byte
		for rest := b; len(rest) > 0; {
			n := min(1+r.IntN(20), len(rest))
			s.feed(rest[:n], func(h frameHeader, p []byte) {
				got = append(got, h)
				if h.typ == frameRSTStream {
					rstCode = append([]byte(nil), p...)
				}
			})
			rest = rest[n:]
		}
		if len(got) != len(want) {
			t.Fatalf("seed %d: %d frames, want %d", seed, len(got), len(want))
		}
		for i := range want {
			if got[i] != want[i] {
				t.Errorf("seed %d frame %d: %+v, want %+v", seed, i, got[i], want[i])
			}
		}
		if !bytes.Equal(rstCode, []byte{0, 0, 0, 1}) {
			t.Errorf("RST_STREAM payload %x", rstCode)
		}
	}
}

// TestPrematureResets: streams reset before their response count;
// streams reset after it, or a minority, do not end the connection.
func TestPrematureResets(t *testing.T) {
	g := &Conn{lim: Limits{PrematureResets: 4}.withDefaults(), open: map[uint32]bool{}}
	g.Conn = nopConn{}
	open := func(id uint32) {
		g.clientFrame(frameHeader{typ: frameHeaders, flags: flagEndHeaders | flagEndStream, stream: id}, nil)
	}
	reset := func(id uint32) { g.clientFrame(frameHeader{typ: frameRSTStream, stream: id, length: 4}, nil) }
	respond := func(id uint32) { g.serverFrame(frameHeader{typ: frameHeaders, flags: flagEndHeaders, stream: id}, nil) }
	// Responded streams reset by the client are fine, however many.
	for id := uint32(1); id < 40; id += 2 {
		open(id)
		respond(id)
		reset(id)
	}
	// Premature resets below half of the streams opened: fine.
	for id := uint32(41); id < 49; id += 2 {
		open(id)
		reset(id)
	}
	if g.abused {
		t.Fatalf("abuse after %d premature resets of %d streams", g.premature, g.opened)
	}
	for id := uint32(49); !g.abused && id < 200; id += 2 {
		open(id)
		reset(id)
	}
	if !g.abused || g.premature*2 < g.opened {
		t.Fatalf("premature %d of %d: abused %v", g.premature, g.opened, g.abused)
	}
}

// nopConn is a connection whose Close does nothing.
type nopConn struct{ net.Conn }

func (nopConn) Close() error { return nil }
