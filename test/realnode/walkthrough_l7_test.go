package realnode_test

import (
	"testing"

	"github.com/amber-mesh/amber/test/realnode"
)

// TestBinomialBounds: the split's acceptance interval, against values
// computed exactly (Python's math.comb).
func TestBinomialBounds(t *testing.T) {
	for _, tc := range []struct {
		n      int
		p, a   float64
		lo, hi int
	}{
		{100, 0.9, 1e-4, 77, 99},
		{100, 0.9, 1e-6, 73, 100},
		{100, 0.5, 1e-4, 31, 69},
	} {
		lo, hi := realnode.BinomialBounds(tc.n, tc.p, tc.a)
		if lo != tc.lo || hi != tc.hi {
			t.Errorf("BinomialBounds(%d, %v, %v) = [%d, %d], want [%d, %d]", tc.n, tc.p, tc.a, lo, hi, tc.lo, tc.hi)
		}
	}
}
