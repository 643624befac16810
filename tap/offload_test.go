package tap

import (
	"os"
	"testing"

	"github.com/netns-run/netns-run/tap/taptest"
)

// A TAP opened with offloads says so to whoever holds a queue, and one
// without says it has no header.
func TestOffloadQueueReportsVnetHdr(t *testing.T) {
	taptest.InFreshNetns(t, func() {
		for _, c := range []struct {
			offload bool
			want    int
		}{{true, VnetHdrSize}, {false, 0}} {
			dev, err := Create("tap0", Options{Offload: c.offload})
			if err != nil {
				t.Errorf("create (offload %v): %v", c.offload, err)
				continue
			}
			if got := VnetHdrLen(dev.Queues()[0]); got != c.want {
				t.Errorf("offload %v: VnetHdrLen %d, want %d", c.offload, got, c.want)
			}
			dev.Close()
		}
		r, w, err := os.Pipe()
		if err != nil {
			t.Error(err)
			return
		}
		defer r.Close()
		defer w.Close()
		if got := VnetHdrLen(r); got != 0 {
			t.Errorf("a pipe: VnetHdrLen %d, want 0", got)
		}
	})
}
