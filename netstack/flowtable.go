package netstack

import (
	"container/list"
	"context"
	"net"
	"sync"
	"sync/atomic"
	"time"
)

// A flowTable bounds a set of datagram flows (UDP, ping) the way a NAT's
// connection tracking does: each flow expires after a timeout that depends
// on what it has exchanged, and a new flow at the cap evicts the least
// recently used one instead of being refused, so a guest spraying ports
// cannot lock everyone else out.
//
// The table does not carry datagrams. Whatever does calls touch on each one
// (or wraps its sockets with watch), and the table calls the flow's evict
// function, which must close the flow without blocking, when it expires or
// is pushed out.
type flowTable struct {
	ctx      context.Context
	flows    *flowGroup
	max      int
	timeouts flowTimeouts
	interval time.Duration
	epoch    time.Time
	// evictions counts flows pushed out by a new one at the cap.
	evictions atomic.Uint64

	mu sync.Mutex
	// Least recently used first, lazily: touch only stamps the flow, and
	// a flow found at the front with a newer stamp is moved to the back
	// then (a second chance), so the packet path never takes this lock.
	// Flows that only ever exchanged once are evicted before assured
	// ones, as conntrack's early drop does.
	fresh, assured list.List
	sweeping       bool
}

// flowTimeouts are the idle timeouts of a flow by what it has exchanged.
type flowTimeouts struct {
	// unreplied: nothing came back yet.
	unreplied time.Duration
	// replied: an answer came, but nothing since (a request and its
	// response, such as most DNS, NTP or STUN exchanges).
	replied time.Duration
	// assured: still active assuredAfter after the first answer.
	assured time.Duration
}

// assuredAfter is how long after its first answer a flow must still be
// active to count as a conversation rather than one exchange (conntrack
// uses the same 2 s for UDP).
const assuredAfter = 2 * time.Second

// sweepInterval is how often expired flows are looked for (more often if a
// timeout is shorter than two of it).
const sweepInterval = time.Second

// tableFlow is one flow's entry.
type tableFlow struct {
	t     *flowTable
	evict func()
	// last and firstReply are nanoseconds since t.epoch (firstReply 0:
	// none yet), written on the packet path.
	last, firstReply atomic.Int64

	// Guarded by t.mu.
	elem      *list.Element
	inAssured bool
	seen      int64 // last, when the flow was (re)queued
	gone      bool
}

func newFlowTable(ctx context.Context, flows *flowGroup, max int, timeouts flowTimeouts) *flowTable {
	interval := min(sweepInterval, timeouts.unreplied/2, timeouts.replied/2, timeouts.assured/2)
	return &flowTable{ctx: ctx, flows: flows, max: max, timeouts: timeouts, interval: interval, epoch: time.Now()}
}

func (t *flowTable) now() int64 { return int64(time.Since(t.epoch)) }

// add enters a new flow, evicting the least recently used one if the table
// is full. evict is called at most once, from another flow's add or from
// the sweeper, never with the table's lock held.
func (t *flowTable) add(evict func()) *tableFlow {
	f := &tableFlow{t: t, evict: evict}
	now := t.now()
	f.last.Store(now)
	var victim *tableFlow
	t.mu.Lock()
	if t.fresh.Len()+t.assured.Len() >= t.max {
		victim = t.lruLocked()
		t.dropLocked(victim)
	}
	f.seen = now
	f.elem = t.fresh.PushBack(f)
	startSweeper := !t.sweeping && t.flows.enter()
	if startSweeper {
		t.sweeping = true
	}
	t.mu.Unlock()
	if victim != nil {
		t.evictions.Add(1)
		victim.evict()
	}
	if startSweeper {
		go func() {
			defer t.flows.leave()
			t.sweep()
		}()
	}
	return f
}

// lruLocked finds the least recently used flow, fresh ones first.
func (t *flowTable) lruLocked() *tableFlow {
	for _, l := range []*list.List{&t.fresh, &t.assured} {
		// Each flow moves back at most once per call, so two rounds
		// end the search; a flow touched meanwhile still goes then.
		for i := 2*l.Len() + 1; i > 0 && l.Len() > 0; i-- {
			f := l.Front().Value.(*tableFlow)
			if last := f.last.Load(); last != f.seen && i > 1 {
				f.seen = last
				t.requeueLocked(f)
				continue
			}
			return f
		}
	}
	return nil
}

// requeueLocked moves f to the back of the list its state belongs in.
func (t *flowTable) requeueLocked(f *tableFlow) {
	l := &t.fresh
	if f.inAssured {
		l = &t.assured
	}
	l.Remove(f.elem)
	if !f.inAssured && f.state() == flowAssured {
		f.inAssured = true
		l = &t.assured
	}
	f.elem = l.PushBack(f)
}

func (t *flowTable) dropLocked(f *tableFlow) {
	if f == nil || f.gone {
		return
	}
	f.gone = true
	if f.inAssured {
		t.assured.Remove(f.elem)
	} else {
		t.fresh.Remove(f.elem)
	}
}

// sweep evicts expired flows every t.interval until the table is empty or
// the stack stops.
func (t *flowTable) sweep() {
	tick := time.NewTicker(t.interval)
	defer tick.Stop()
	for {
		select {
		case <-t.ctx.Done():
			return
		case <-tick.C:
		}
		now := t.now()
		var expired []*tableFlow
		t.mu.Lock()
		for _, l := range []*list.List{&t.fresh, &t.assured} {
			for e := l.Front(); e != nil; {
				f := e.Value.(*tableFlow)
				e = e.Next()
				if time.Duration(now-f.last.Load()) >= t.timeouts.of(f.state()) {
					t.dropLocked(f)
					expired = append(expired, f)
				}
			}
		}
		empty := t.fresh.Len()+t.assured.Len() == 0
		if empty {
			t.sweeping = false
		}
		t.mu.Unlock()
		for _, f := range expired {
			f.evict()
		}
		if empty {
			return
		}
	}
}

// len is the number of flows in the table.
func (t *flowTable) len() int {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.fresh.Len() + t.assured.Len()
}

type flowState int

const (
	flowUnreplied flowState = iota
	flowReplied
	flowAssured
)

func (f *tableFlow) state() flowState {
	first := f.firstReply.Load()
	switch {
	case first == 0:
		return flowUnreplied
	case time.Duration(f.last.Load()-first) >= assuredAfter:
		return flowAssured
	}
	return flowReplied
}

func (ts flowTimeouts) of(s flowState) time.Duration {
	return [...]time.Duration{ts.unreplied, ts.replied, ts.assured}[s]
}

// touch records activity: reply is true for a datagram from the far side.
func (f *tableFlow) touch(reply bool) {
	now := f.t.now()
	f.last.Store(now)
	if reply && f.firstReply.Load() == 0 {
		f.firstReply.CompareAndSwap(0, now)
	}
}

// remove takes a flow that ended by itself out of the table; its evict
// function is not called.
func (f *tableFlow) remove() {
	f.t.mu.Lock()
	defer f.t.mu.Unlock()
	f.t.dropLocked(f)
}

// watch wraps c so that each datagram read from it touches f.
func (f *tableFlow) watch(c net.Conn, reply bool) net.Conn {
	return &watchedConn{Conn: c, f: f, reply: reply}
}

type watchedConn struct {
	net.Conn
	f     *tableFlow
	reply bool
}

func (c *watchedConn) Read(b []byte) (int, error) {
	n, err := c.Conn.Read(b)
	if err == nil {
		c.f.touch(c.reply)
	}
	return n, err
}
