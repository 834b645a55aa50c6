package relay

import (
	"testing"
	"testing/synctest"
	"time"
)

// TestIdleTimer: the expiry comes exactly d after the last touch, not
// before, and never after Stop.
func TestIdleTimer(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		expired := make(chan time.Time, 1)
		it := NewIdleTimer(time.Minute, func() { expired <- time.Now() })
		time.Sleep(time.Hour) // not started: no expiry
		it.Start()
		start := time.Now()
		time.Sleep(50 * time.Second)
		it.Touch()
		time.Sleep(50 * time.Second)
		it.Touch()
		synctest.Wait()
		if len(expired) != 0 {
			t.Fatal("expired while touched")
		}
		if at := <-expired; at.Sub(start) != 100*time.Second+time.Minute {
			t.Errorf("expired %v after the start, want %v", at.Sub(start), 100*time.Second+time.Minute)
		}

		it = NewIdleTimer(time.Minute, func() { expired <- time.Now() })
		it.Start()
		time.Sleep(30 * time.Second)
		it.Stop()
		time.Sleep(time.Hour)
		if len(expired) != 0 {
			t.Error("expired after Stop")
		}
		var none *IdleTimer
		none.Start()
		none.Touch()
		none.Stop()
	})
}
