//go:build cgo

package sockrelay

import (
	"testing"
	"time"

	"github.com/netns-run/netns-run/netstack/sockrelay/relaytest"
)

// An ended pair's note may wait while its slot in the C loop takes a new
// pair: the note still runs the ended pair's end function, and only its.
func TestCLoopNoteOutlivesSlot(t *testing.T) {
	cl, err := newCLoop()
	if err != nil {
		t.Fatal(err)
	}
	defer cl.close()
	ends := make(chan string, 128)
	add := func(name string) (closePeers func()) {
		a, peerA := relaytest.TCPPair(t)
		b, peerB := relaytest.TCPPair(t)
		if err := cl.add(rawOf(t, a), rawOf(t, b), 0, 0, func(up, down int64) { ends <- name }); err != nil {
			t.Fatal(err)
		}
		return func() { peerA.Close(); peerB.Close() }
	}
	add("first")()
	// The thread ends the first pair at once; its note waits up to 50 ms
	// for others. Meanwhile the slots fill up, and the first one free
	// again takes the last pair.
	time.Sleep(5 * time.Millisecond)
	for range 63 {
		add("filler")
	}
	add("last")
	select {
	case name := <-ends:
		if name != "first" {
			t.Errorf("the first pair's note ran the end of %q", name)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the first pair's end never ran")
	}
	select {
	case name := <-ends:
		t.Errorf("the end of %q ran, its pair still open", name)
	case <-time.After(200 * time.Millisecond):
	}
}
