package hbone

import "io"

// Write sends p as DATA frames, each taking flow-control window from the
// stream and the connection first (awaitSendLocked, flow.go) and queued on
// the connection's writeQueue. Writers take writeMu, so DATA stays in
// order.
func (s *Stream) Write(p []byte) (int, error) {
	s.writeMu.Lock()
	defer s.writeMu.Unlock()
	return s.write(p)
}

func (s *Stream) write(p []byte) (int, error) {
	c := s.c
	n := 0
	for len(p) > 0 {
		c.mu.Lock()
		k, err := s.awaitSendLocked(len(p))
		if err != nil {
			c.mu.Unlock()
			return n, err
		}
		c.appendDataLocked(s, false, p[:k])
		if err := c.flushLocked(); err != nil {
			return n, err
		}
		n += k
		p = p[k:]
	}
	return n, nil
}

// ReadFrom sends what r yields until io.EOF (it does not CloseWrite) and
// returns the bytes it sent; bytes read from r that could not be sent are
// not counted. Its
// read buffer starts small and grows only while reads fill it, and while
// reads are small it waits for a socket to become readable before taking
// a buffer, so a tunnel that mostly waits holds none.
func (s *Stream) ReadFrom(r io.Reader) (int64, error) {
	s.writeMu.Lock()
	defer s.writeMu.Unlock()
	var total int64
	class := 0
	readable := readableFunc(r)
	for {
		if class == 0 && readable != nil {
			readable()
		}
		ch := getChunk(chunkSizes[class])
		n, err := r.Read(ch.b)
		if n > 0 {
			// Count what was sent, not what was read: a write cut off
			// by a reset or the connection's end sent less.
			w, werr := s.write(ch.b[:n])
			putChunk(ch)
			total += int64(w)
			if werr != nil {
				return total, werr
			}
			if n == len(ch.b) && class < len(chunkSizes)-1 {
				class++
			} else if n < len(ch.b)/8 && class > 0 {
				class--
			}
		} else {
			putChunk(ch)
		}
		if err == io.EOF {
			return total, nil
		}
		if err != nil {
			return total, err
		}
	}
}
