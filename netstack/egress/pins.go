package egress

import (
	"net/netip"
	"slices"
	"sync"
	"time"
)

// Pins: the names each address was resolved from, through the forwarder.
// A pin lasts max(TTL, minPinTTL), and while a flow allowed through it is
// open; clients keep using an address past its TTL (short-TTL object
// stores are the classic case), and a flow must never lose its right to
// reconnect in the middle of a transfer.

const (
	// minPinTTL is the least time an answer's addresses stay pinned.
	minPinTTL = 60 * time.Second
	// maxPins bounds the (address, name) pairs held: a guest resolving
	// endless names below an allowed wildcard evicts the pins that expire
	// soonest, never those of open flows.
	maxPins = 1 << 16
	// sweepEvery is how often pinning also drops what has expired.
	sweepEvery = 30 * time.Second
	// maxNamesPerAddr bounds the names one address holds. Names below an
	// allowed wildcard that all answer one address (a CDN's, *.github.io)
	// would otherwise grow its list without end while a flow to it stays
	// open (which keeps them all alive, and outside maxPins' eviction),
	// and every pin and decision walks the list.
	maxNamesPerAddr = 64
)

type pinTable struct {
	mu        sync.RWMutex
	byAddr    map[netip.Addr]*pinned
	n         int // names pinned, over all addresses
	max       int
	lastSweep time.Time
}

// pinned is one address: the names it was resolved from and the flows
// allowed through them that are open.
type pinned struct {
	names []pinName
	flows int
}

type pinName struct {
	name  string
	until time.Time
}

func newPinTable(max int) *pinTable {
	return &pinTable{byAddr: map[netip.Addr]*pinned{}, max: max}
}

// pin records that name resolved to a until "until" (extended, never
// shortened, by a later answer).
func (t *pinTable) pin(a netip.Addr, name string, until, now time.Time) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if now.Sub(t.lastSweep) > sweepEvery {
		t.sweepLocked(now)
	}
	if p := t.byAddr[a]; p != nil {
		soonest := 0
		for i := range p.names {
			if p.names[i].name == name {
				if until.After(p.names[i].until) {
					p.names[i].until = until
				}
				return
			}
			if p.names[i].until.Before(p.names[soonest].until) {
				soonest = i
			}
		}
		if len(p.names) >= maxNamesPerAddr {
			// The name due to expire first makes room; a flow it
			// allowed stays open, and asking again pins it again.
			p.names[soonest] = pinName{name, until}
			return
		}
	}
	if t.n >= t.max {
		t.sweepLocked(now)
		if t.n >= t.max {
			t.evictLocked()
		}
	}
	// Looked up again: making room may have dropped the address.
	p := t.byAddr[a]
	if p == nil {
		p = &pinned{}
		t.byAddr[a] = p
	}
	p.names = append(p.names, pinName{name, until})
	t.n++
}

// live reports whether p's names are usable: not expired, or an allowed
// flow to the address is open.
func (p *pinned) live(pn pinName, now time.Time) bool {
	return p.flows > 0 || pn.until.After(now)
}

// each calls fn with the live names pinned to a until fn returns false.
func (t *pinTable) each(a netip.Addr, now time.Time, fn func(name string) bool) {
	t.mu.RLock()
	defer t.mu.RUnlock()
	p := t.byAddr[a]
	if p == nil {
		return
	}
	for _, pn := range p.names {
		if p.live(pn, now) && !fn(pn.name) {
			return
		}
	}
}

// has reports whether name is pinned to a and live.
func (t *pinTable) has(a netip.Addr, name string, now time.Time) bool {
	found := false
	t.each(a, now, func(n string) bool {
		found = n == name
		return !found
	})
	return found
}

// hold keeps a's pins alive until release is called.
func (t *pinTable) hold(a netip.Addr) (release func()) {
	t.mu.Lock()
	p := t.byAddr[a]
	if p == nil {
		p = &pinned{}
		t.byAddr[a] = p
	}
	p.flows++
	t.mu.Unlock()
	var once sync.Once
	return func() {
		once.Do(func() {
			t.mu.Lock()
			defer t.mu.Unlock()
			p.flows--
			if p.flows == 0 && len(p.names) == 0 && t.byAddr[a] == p {
				delete(t.byAddr, a)
			}
		})
	}
}

// sweepLocked drops expired names of addresses without open flows.
func (t *pinTable) sweepLocked(now time.Time) {
	t.lastSweep = now
	t.dropLocked(now)
}

// evictLocked drops the eighth of the pins (of addresses without open
// flows) that expire soonest, so that a full table costs one sort per
// many new pins.
func (t *pinTable) evictLocked() {
	var untils []time.Time
	for _, p := range t.byAddr {
		if p.flows == 0 {
			for _, pn := range p.names {
				untils = append(untils, pn.until)
			}
		}
	}
	if len(untils) == 0 {
		return
	}
	slices.SortFunc(untils, func(a, b time.Time) int { return a.Compare(b) })
	t.dropLocked(untils[min(len(untils)-1, max(t.max/8, 1)-1)])
}

// dropLocked drops the names pinned until "until" or earlier, of
// addresses without open flows.
func (t *pinTable) dropLocked(until time.Time) {
	for a, p := range t.byAddr {
		if p.flows > 0 {
			continue
		}
		kept := p.names[:0]
		for _, pn := range p.names {
			if pn.until.After(until) {
				kept = append(kept, pn)
			}
		}
		t.n -= len(p.names) - len(kept)
		p.names = kept
		if len(kept) == 0 {
			delete(t.byAddr, a)
		}
	}
}

// size is the number of (address, name) pins held.
func (t *pinTable) size() int {
	t.mu.RLock()
	defer t.mu.RUnlock()
	return t.n
}
