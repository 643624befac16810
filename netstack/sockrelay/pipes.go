package sockrelay

import "sync"

// maxFreePipes bounds what Pipes keeps: the kernel counts each pipe's
// capacity (16 pages) against the user's pipe-user-pages-soft, 16384
// pages by default, so 64 idle pipes take a sixteenth of it.
const maxFreePipes = 64

// Pipes keeps the empty pipes of ended relays for later ones: making and
// closing a relay's two pipes takes six system calls, a tenth of a short
// published connection's. The zero value is ready; a nil *Pipes makes a
// pipe for each use.
type Pipes struct {
	mu     sync.Mutex
	free   []*socketPipe
	closed bool
}

func (ps *Pipes) get() (*socketPipe, error) {
	if ps != nil {
		ps.mu.Lock()
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
			ps.mu.Unlock()
			return
		}
		ps.mu.Unlock()
	}
	p.close()
}

// Close closes the pipes kept; later ones are closed when their relay
// ends.
func (ps *Pipes) Close() {
	ps.mu.Lock()
	defer ps.mu.Unlock()
	ps.closed = true
	for _, p := range ps.free {
		p.close()
	}
	ps.free = nil
}
