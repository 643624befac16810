package sockrelay

import (
	"sync"
	"time"
)

// maxFreePipes bounds what Pipes keeps: the kernel counts each pipe's
// capacity (16 pages) against the user's pipe-user-pages-soft, 16384
// pages by default, so 32 idle pipes take a thirty-second of it.
const maxFreePipes = 32

// pipesIdle is how long kept pipes wait for a relay: after a burst of
// connections the helper goes back to the descriptors it had.
const pipesIdle = 2 * time.Second

// Pipes keeps the empty pipes of ended relays for later ones: making and
// closing a relay's two pipes takes six system calls, a tenth of a short
// published connection's. The zero value is ready; a nil *Pipes makes a
// pipe for each use.
type Pipes struct {
	mu      sync.Mutex
	free    []*socketPipe
	lastGet time.Time
	trim    *time.Timer
	closed  bool
}

func (ps *Pipes) get() (*socketPipe, error) {
	if ps != nil {
		ps.mu.Lock()
		ps.lastGet = time.Now()
		if n := len(ps.free); n > 0 {
			p := ps.free[n-1]
			ps.free = ps.free[:n-1]
			ps.mu.Unlock()
			return p, nil
		}
		ps.mu.Unlock()
	}
	return newSocketPipe()
}

// put takes p back; a dirty one (it may hold bytes: its relay ended with
// an error) or a grown one is closed instead.
func (ps *Pipes) put(p *socketPipe, dirty bool) {
	if p == nil {
		return
	}
	if ps != nil && !dirty && p.size == defaultPipe {
		ps.mu.Lock()
		if !ps.closed && len(ps.free) < maxFreePipes {
			ps.free = append(ps.free, p)
			if ps.trim == nil {
				ps.trim = time.AfterFunc(pipesIdle, ps.trimIdle)
			}
			ps.mu.Unlock()
			return
		}
		ps.mu.Unlock()
	}
	p.close()
}

// trimIdle closes the kept pipes once no relay asked for one in pipesIdle.
func (ps *Pipes) trimIdle() {
	ps.mu.Lock()
	defer ps.mu.Unlock()
	if ps.closed {
		return
	}
	if wait := pipesIdle - time.Since(ps.lastGet); wait > 0 {
		ps.trim.Reset(wait)
		return
	}
	for _, p := range ps.free {
		p.close()
	}
	ps.free = nil
	ps.trim = nil
}

// Close closes the pipes kept; later ones are closed when their relay
// ends.
func (ps *Pipes) Close() {
	ps.mu.Lock()
	defer ps.mu.Unlock()
	ps.closed = true
	if ps.trim != nil {
		ps.trim.Stop()
	}
	for _, p := range ps.free {
		p.close()
	}
	ps.free = nil
}
