package hbone

import "sync"

// Receive buffers come in three sizes so that a trickle of small frames
// does not pin large buffers while a bulk transfer still gets few, large
// chunks to hand to the next socket write. Buffers are pooled and returned
// as soon as the application has read them: an idle stream holds none.
var chunkSizes = [...]int{4 << 10, 32 << 10, 256 << 10}

var chunkPools [len(chunkSizes)]sync.Pool

// chunk is a pooled receive buffer: b[r:w] holds unread bytes.
type chunk struct {
	b     []byte
	r, w  int
	class int
}

// getChunk returns an empty chunk suited to n bytes.
func getChunk(n int) *chunk {
	class := len(chunkSizes) - 1
	for i, sz := range chunkSizes {
		if n <= sz {
			class = i
			break
		}
	}
	if v := chunkPools[class].Get(); v != nil {
		ch := v.(*chunk)
		ch.r, ch.w = 0, 0
		return ch
	}
	return &chunk{b: make([]byte, chunkSizes[class]), class: class}
}

func putChunk(ch *chunk) {
	chunkPools[ch.class].Put(ch)
}

// Write batches: frames queued for one connection are appended to a batch
// the connection's writer goroutine hands to the TLS connection in one
// Write. writeBatchSize bounds how much DATA may queue before writers wait
// for the socket; control frames may go over it (see maxControlBacklog).
const (
	writeBatchSize = 256 << 10
	// maxDataFrame caps DATA frames this side writes: big enough that the
	// 9-byte header is noise, small enough to interleave streams fairly.
	maxDataFrame  = 64 << 10
	batchCapacity = writeBatchSize + maxDataFrame + 4<<10
	// maxControlBacklog is how far replies to the peer (PING and SETTINGS
	// acknowledgements, RST_STREAM, refusals) may push the batch past
	// batchCapacity while the peer does not read: beyond it the peer is
	// flooding us (CVE-2019-9512, CVE-2019-9515) and the connection is
	// closed. 64 KiB is thousands of control frames.
	maxControlBacklog = 64 << 10
	// inlineMax is the largest batch a stream writes itself (see
	// flushLocked). Small writes are where the hand-off to the writer
	// goroutine shows, as latency; bulk writes gain more from the writer
	// encrypting one batch while the stream copies the next (measured:
	// BenchmarkStreamThroughput ≈ 20% slower with every write inline).
	inlineMax = 16 << 10
)

// batchPool holds batches, each in a *[]byte (a slice put in a
// sync.Pool as itself allocates its header on every Put); holders keeps
// the emptied *[]byte for the next Put, so a batch taken and returned per
// write, as an idle-between-requests connection does, allocates nothing.
var batchPool, holders sync.Pool

func getBatch() []byte {
	h, _ := batchPool.Get().(*[]byte)
	if h == nil {
		return make([]byte, 0, batchCapacity)
	}
	b := (*h)[:0]
	*h = nil
	holders.Put(h)
	return b
}

func putBatch(b []byte) {
	if cap(b) != batchCapacity {
		return // grown by a control backlog: let it go
	}
	h, _ := holders.Get().(*[]byte)
	if h == nil {
		h = new([]byte)
	}
	*h = b[:0]
	batchPool.Put(h)
}
