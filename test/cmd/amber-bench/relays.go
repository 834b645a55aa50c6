package main

import (
	"crypto/aes"
	"crypto/cipher"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"

	"github.com/amber-mesh/amber/bpf"
	"github.com/amber-mesh/amber/test/tproxy"
)

// Reference relays for the proxy pair, a ladder from the splice pair to
// amber that shows where a tunnel's cost goes on the machine the benchmark
// runs on:
//
//   - copyRelay moves every byte through a user-space buffer: one read and
//     one write per hop, what any user-space proxy pays beyond splice;
//   - aeadRelay also seals each byte on the client's node and opens it on
//     the server's, in TLS 1.3's record sizes with TLS's default cipher
//     (AES-128-GCM), with no handshake, no HTTP/2 and no copy beyond that
//     read and write. It bounds what any proxy that encrypts in user space
//     can reach here; amber adds TLS's record layer and HTTP/2 on top.

const (
	recordPlain = 16 << 10 // TLS's largest record
	recordHead  = 4
	relayChunk  = 256 << 10
)

var benchKey = make([]byte, 16) // fixed: this measures cost, not secrecy

func newAEAD() cipher.AEAD {
	b, err := aes.NewCipher(benchKey)
	if err != nil {
		panic(err)
	}
	a, err := cipher.NewGCM(b)
	if err != nil {
		panic(err)
	}
	return a
}

// copyRelay copies both ways through user-space buffers.
func copyRelay(_ bpf.Listener, down, up *net.TCPConn) {
	tproxy.Relay(down, up, userCopy, userCopy)
}

func userCopy(dst, src *net.TCPConn) error {
	b := make([]byte, relayChunk)
	for {
		n, err := src.Read(b)
		if n > 0 {
			if _, werr := dst.Write(b[:n]); werr != nil {
				return werr
			}
		}
		if err == io.EOF {
			return nil
		}
		if err != nil {
			return err
		}
	}
}

// aeadRelay seals what leaves towards the other node and opens what comes
// from it: the outbound listener's upstream and the inbound listener's
// downstream are the node-to-node legs.
func aeadRelay(kind bpf.Listener, down, up *net.TCPConn) {
	if kind == bpf.Outbound {
		tproxy.Relay(down, up, sealCopy, openCopy)
	} else {
		tproxy.Relay(down, up, openCopy, sealCopy)
	}
}

func sealCopy(dst, src *net.TCPConn) error {
	a := newAEAD()
	plain := make([]byte, relayChunk)
	out := make([]byte, 0, relayChunk+(relayChunk/recordPlain+1)*(recordHead+a.Overhead()))
	nonce := make([]byte, a.NonceSize())
	var seq uint64
	for {
		n, err := src.Read(plain)
		if n > 0 {
			out = out[:0]
			for p := plain[:n]; len(p) > 0; {
				m := min(len(p), recordPlain)
				binary.BigEndian.PutUint64(nonce[4:], seq)
				seq++
				out = binary.BigEndian.AppendUint32(out, uint32(m+a.Overhead()))
				out = a.Seal(out, nonce, p[:m], nil)
				p = p[m:]
			}
			if _, werr := dst.Write(out); werr != nil {
				return werr
			}
		}
		if err == io.EOF {
			return nil
		}
		if err != nil {
			return err
		}
	}
}

func openCopy(dst, src *net.TCPConn) error {
	a := newAEAD()
	buf := make([]byte, 2*relayChunk)
	nonce := make([]byte, a.NonceSize())
	var seq uint64
	r, w := 0, 0
	var plain net.Buffers
	for {
		if w == len(buf) {
			return errors.New("record larger than the buffer")
		}
		n, err := src.Read(buf[w:])
		w += n
		plain = plain[:0]
		for w-r >= recordHead {
			l := int(binary.BigEndian.Uint32(buf[r:]))
			if l > recordPlain+a.Overhead() {
				return fmt.Errorf("record of %d bytes", l)
			}
			if w-r-recordHead < l {
				break
			}
			ct := buf[r+recordHead : r+recordHead+l]
			binary.BigEndian.PutUint64(nonce[4:], seq)
			seq++
			pt, oerr := a.Open(ct[:0], nonce, ct, nil)
			if oerr != nil {
				return oerr
			}
			plain = append(plain, pt)
			r += recordHead + l
		}
		if len(plain) > 0 {
			bufs := plain
			if _, werr := bufs.WriteTo(dst); werr != nil {
				return werr
			}
		}
		if r == w {
			r, w = 0, 0
		} else if w > relayChunk {
			w = copy(buf, buf[r:w])
			r = 0
		}
		if err == io.EOF {
			if r != w {
				return errors.New("truncated record")
			}
			return nil
		}
		if err != nil {
			return err
		}
	}
}
