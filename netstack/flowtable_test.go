package netstack

import (
	"context"
	"testing"
	"time"
)

// testTable is a flow table whose evictions the test can watch.
type testTable struct {
	*flowTable
	evicted chan string
}

func newTestTable(t *testing.T, max int, timeouts flowTimeouts) *testTable {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	var flows flowGroup
	t.Cleanup(func() {
		cancel()
		flows.closeAndWait()
	})
	tt := &testTable{flowTable: newFlowTable(ctx, &flows, max, timeouts), evicted: make(chan string, 16)}
	// Flows "assured" need 2 s of history: start the clock an hour ago.
	tt.epoch = time.Now().Add(-time.Hour)
	return tt
}

func (tt *testTable) add(name string) *tableFlow {
	return tt.flowTable.add(func() { tt.evicted <- name })
}

func (tt *testTable) wantEvicted(t *testing.T, want string) {
	t.Helper()
	select {
	case got := <-tt.evicted:
		if got != want {
			t.Fatalf("evicted %s, want %s", got, want)
		}
	case <-time.After(10 * time.Second):
		t.Fatalf("%s was not evicted", want)
	}
}

func (tt *testTable) wantNoEviction(t *testing.T) {
	t.Helper()
	select {
	case got := <-tt.evicted:
		t.Fatalf("%s evicted", got)
	default:
	}
}

var longTimeouts = flowTimeouts{unreplied: time.Hour, replied: time.Hour, assured: time.Hour}

// At the cap a new flow evicts the least recently used one.
func TestFlowTableEvictsLeastRecentlyUsed(t *testing.T) {
	tt := newTestTable(t, 3, longTimeouts)
	a := tt.add("a")
	tt.add("b")
	tt.add("c")
	time.Sleep(time.Millisecond) // let the clock move on
	a.touch(false)
	tt.add("d")
	tt.wantEvicted(t, "b")
	tt.add("e")
	tt.wantEvicted(t, "c")
	tt.wantNoEviction(t)
	if n := tt.len(); n != 3 {
		t.Errorf("%d flows in a table of 3", n)
	}
}

// Flows that exchanged once go before conversations, however recent.
func TestFlowTableEvictsFreshBeforeAssured(t *testing.T) {
	tt := newTestTable(t, 2, longTimeouts)
	a := tt.add("a")
	a.firstReply.Store(tt.now() - int64(3*time.Second))
	a.touch(false)
	if a.state() != flowAssured {
		t.Fatal("a flow active 3 s after its first reply is not assured")
	}
	tt.add("b")
	time.Sleep(time.Millisecond)
	tt.add("c")
	tt.wantEvicted(t, "b")
}

// A flow that never got a reply expires after the unreplied timeout; an
// assured one keeps its longer timeout.
func TestFlowTableExpiresByState(t *testing.T) {
	tt := newTestTable(t, 10, flowTimeouts{unreplied: 100 * time.Millisecond, replied: 100 * time.Millisecond, assured: time.Hour})
	b := tt.add("assured")
	b.firstReply.Store(tt.now() - int64(3*time.Second))
	b.touch(true)
	tt.add("unreplied")
	tt.wantEvicted(t, "unreplied")
	tt.wantNoEviction(t)
	if n := tt.len(); n != 1 {
		t.Errorf("%d flows left, want the assured one", n)
	}
	b.remove()
	if n := tt.len(); n != 0 {
		t.Errorf("%d flows left after remove", n)
	}
}
