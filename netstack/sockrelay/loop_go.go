package sockrelay

import (
	"errors"
	"fmt"
	"os"
	"sync"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Loop is the relay loop (see loop.go): a goroutine and, with cgo, a C
// thread that takes the pairs that turn out busy.
type Loop struct {
	ep    *os.File
	epfd  int
	pipes *Pipes
	// fast, if not nil, relays busy pairs (cgo: loop_c.go). The loop's
	// goroutine starts it for the first busy pair (noFast: it could
	// not), so that a helper that relays none keeps no thread of it per
	// P; set under mu, for keptPipes.
	fast   *cLoop
	noFast bool

	mu     sync.Mutex
	pairs  map[uint32]*loopPair
	next   uint32
	closed bool
	done   chan struct{}
}

// loopPair is two sockets relayed both ways; dir[0] reads a and writes b.
type loopPair struct {
	id    uint32
	a, b  int
	dir   [2]direction
	busy  func()
	reads int
	// counted: the pair was found busy; with a fast loop it goes there
	// once nothing is pending.
	counted bool
	end     func(up, down int64)
	// outA, outB: the socket is in the set for output too.
	outA, outB bool
}

// direction is one way of a pair: its pipe holds pending bytes read from
// src and not yet written to dst.
type direction struct {
	pipe    *socketPipe
	pending int
	total   int64
	eof     bool // src ended; dst was shut once pending was written
	grown   bool
}

// Event data: the pair's id and which socket (0: a, 1: b).
func eventKey(id uint32, side int) uint64 { return uint64(id)<<1 | uint64(side) }

// NewLoop starts a Loop, which lends pipes from pipes (nil: a pipe per
// use). Close ends it.
func NewLoop(pipes *Pipes) (*Loop, error) {
	fd, err := unix.EpollCreate1(unix.EPOLL_CLOEXEC)
	if err != nil {
		return nil, fmt.Errorf("epoll: %w", err)
	}
	// An epoll descriptor is non-blocking by nature; the flag makes
	// os.NewFile hand it to Go's poller.
	if err := unix.SetNonblock(fd, true); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("epoll: %w", err)
	}
	l := &Loop{ep: os.NewFile(uintptr(fd), "epoll"), epfd: fd, pipes: pipes,
		pairs: make(map[uint32]*loopPair), done: make(chan struct{})}
	go l.run()
	return l, nil
}

// Add relays a and b (connected, non-blocking TCP sockets the Loop then
// owns) both ways until both ended or one failed, closes them, and calls
// end with the bytes each way (a to b: up). busy, if not nil, runs once in
// a goroutine of its own when the pair turns out to be more than one
// request and its answer: a third read, or 64 KiB. An error means the Loop
// is closed: a and b were closed with a reset.
func (l *Loop) Add(a, b int, busy func(), end func(up, down int64)) error {
	p := &loopPair{a: a, b: b, busy: busy, end: end}
	var err error
	if p.dir[0].pipe, err = l.pipes.get(); err == nil {
		p.dir[1].pipe, err = l.pipes.get()
	}
	l.mu.Lock()
	if err == nil && l.closed {
		err = errLoopClosed
	}
	if err == nil {
		l.next++
		for l.pairs[l.next] != nil {
			l.next++
		}
		p.id = l.next
		l.pairs[p.id] = p
		// Registered under the lock, so that Close sees them all.
		err = errors.Join(l.watch(a, eventKey(p.id, 0), unix.EPOLL_CTL_ADD, false),
			l.watch(b, eventKey(p.id, 1), unix.EPOLL_CTL_ADD, false))
		if err != nil {
			delete(l.pairs, p.id)
		}
	}
	l.mu.Unlock()
	if err != nil {
		resetClose(a)
		resetClose(b)
		l.pipes.put(p.dir[0].pipe, true)
		l.pipes.put(p.dir[1].pipe, true)
		return err
	}
	return nil
}

// Close resets every pair's sockets (their end functions are not called)
// and ends the Loop.
func (l *Loop) Close() {
	l.mu.Lock()
	if l.closed {
		l.mu.Unlock()
		return
	}
	l.closed = true
	l.mu.Unlock()
	// Close waits for the loop's pass in progress: no pair is touched
	// after it returns.
	l.ep.Close()
	<-l.done
	l.mu.Lock()
	pairs := l.pairs
	l.pairs = nil
	// After the goroutine ended: it hands pairs to fast. Taken under mu:
	// keptPipes must not reach a freed C loop.
	fast := l.fast
	l.fast = nil
	l.mu.Unlock()
	for _, p := range pairs {
		resetClose(p.a)
		resetClose(p.b)
		l.pipes.put(p.dir[0].pipe, true)
		l.pipes.put(p.dir[1].pipe, true)
	}
	if fast != nil {
		fast.close()
	}
}

func (l *Loop) watch(fd int, key uint64, op int, out bool) error {
	ev := unix.EpollEvent{Events: unix.EPOLLIN | unix.EPOLLRDHUP | unix.EPOLLET}
	if out {
		ev.Events |= unix.EPOLLOUT
	}
	*(*uint64)(unsafe.Pointer(&ev.Fd)) = key
	_, _, errno := unix.RawSyscall6(unix.SYS_EPOLL_CTL, uintptr(l.epfd), uintptr(op), uintptr(fd),
		uintptr(unsafe.Pointer(&ev)), 0, 0)
	if errno != 0 {
		return errno
	}
	return nil
}

func (l *Loop) run() {
	defer close(l.done)
	rc, err := l.ep.SyscallConn()
	if err != nil {
		return
	}
	var events [64]unix.EpollEvent
	// The function is called at once and after each wake-up of Go's
	// poller; it takes what the epoll set has and reports false (wait)
	// once it took less than a full batch: anything later wakes the
	// poller again.
	_ = rc.Read(func(fd uintptr) bool {
		for {
			n, _, errno := unix.RawSyscall6(unix.SYS_EPOLL_PWAIT, fd, uintptr(unsafe.Pointer(&events[0])),
				uintptr(len(events)), 0, 0, 0)
			if errno == unix.EINTR {
				continue
			}
			if errno != 0 {
				return true
			}
			for i := range int(n) {
				l.event(&events[i])
			}
			if int(n) < len(events) {
				return false
			}
		}
	})
}

func (l *Loop) event(ev *unix.EpollEvent) {
	key := *(*uint64)(unsafe.Pointer(&ev.Fd))
	l.mu.Lock()
	p := l.pairs[uint32(key>>1)]
	l.mu.Unlock()
	if p == nil {
		return
	}
	side := int(key & 1)
	// Input on a socket moves its direction; output drains the other's.
	var err error
	if ev.Events&(unix.EPOLLIN|unix.EPOLLRDHUP|unix.EPOLLHUP|unix.EPOLLERR) != 0 {
		err = l.pump(p, side)
	}
	if err == nil && ev.Events&(unix.EPOLLOUT|unix.EPOLLHUP|unix.EPOLLERR) != 0 {
		err = l.pump(p, 1-side)
	}
	if err == nil && ev.Events&unix.EPOLLERR != 0 {
		// A reset after the socket's end of stream: nothing left to
		// read reports it.
		fd := p.a
		if side == 1 {
			fd = p.b
		}
		if soErr, gerr := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_ERROR); gerr == nil && soErr != 0 {
			err = unix.Errno(soErr)
		}
	}
	switch {
	case err != nil:
		l.finish(p, true)
	case p.dir[0].eof && p.dir[1].eof && p.dir[0].pending == 0 && p.dir[1].pending == 0:
		l.finish(p, false)
	case p.counted && !p.dir[0].eof && !p.dir[1].eof && p.dir[0].pending == 0 && p.dir[1].pending == 0:
		l.handOver(p)
	}
}

// startFast starts the fast loop unless it runs, or could not start (or
// needs cgo), and says whether it runs. Only the loop's goroutine calls it.
func (l *Loop) startFast() bool {
	if l.fast != nil || l.noFast {
		return l.fast != nil
	}
	fast, err := newCLoop()
	l.mu.Lock()
	l.fast, l.noFast = fast, err != nil || fast == nil
	l.mu.Unlock()
	return fast != nil
}

// remove takes p out of the Loop's pairs, and says whether it was there.
func (l *Loop) remove(p *loopPair) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.pairs == nil || l.pairs[p.id] != p {
		return false
	}
	delete(l.pairs, p.id)
	return true
}

// handOver moves p, busy and with nothing pending, to the fast loop, if
// there is one.
func (l *Loop) handOver(p *loopPair) {
	if !l.startFast() || !l.remove(p) {
		return
	}
	for _, fd := range []int{p.a, p.b} {
		unix.RawSyscall6(unix.SYS_EPOLL_CTL, uintptr(l.epfd), unix.EPOLL_CTL_DEL, uintptr(fd), 0, 0, 0)
	}
	l.pipes.put(p.dir[0].pipe, false)
	l.pipes.put(p.dir[1].pipe, false)
	// Whatever arrived since is reported when the fast loop adds the
	// sockets (they are edge-triggered, and ready).
	if err := l.fast.add(p.a, p.b, p.dir[0].total, p.dir[1].total, p.end); err != nil && p.end != nil {
		// The fast loop reset both.
		p.end(p.dir[0].total, p.dir[1].total)
	}
}

// pump moves direction d of p (0: a to b) until its source has nothing
// more or its destination is full.
func (l *Loop) pump(p *loopPair, d int) error {
	src, dst := p.a, p.b
	if d == 1 {
		src, dst = p.b, p.a
	}
	dir := &p.dir[d]
	for {
		if dir.pending > 0 {
			n, errno := rawSplice(uintptr(dir.pipe.r), uintptr(dst), dir.pending)
			if errno == unix.EAGAIN {
				return l.wantOutput(p, 1-d, true)
			}
			if errno != 0 {
				return errno
			}
			dir.pending -= n
			dir.total += int64(n)
			if dir.pending > 0 {
				continue
			}
			if err := l.wantOutput(p, 1-d, false); err != nil {
				return err
			}
			// The pipe is empty again: a bulk direction's grows once.
			if !dir.grown && dir.total >= bulkBytes {
				dir.grown = true
				dir.pipe.grow()
			}
		}
		if dir.eof {
			return nil
		}
		n, errno := rawSplice(uintptr(src), uintptr(dir.pipe.w), dir.pipe.size)
		switch {
		case errno == unix.EAGAIN:
			return nil
		case errno != 0:
			return errno
		case n == 0:
			dir.eof = true
			unix.RawSyscall(unix.SYS_SHUTDOWN, uintptr(dst), unix.SHUT_WR, 0)
			return nil
		}
		dir.pending = n
		if !p.counted {
			p.reads++
			if p.reads >= busyReads || dir.total+int64(n) >= busyBytes {
				p.counted = true
				if p.busy != nil {
					go p.busy()
				}
			}
		}
	}
}

// wantOutput adds or removes output readiness of p's socket side (0: a).
func (l *Loop) wantOutput(p *loopPair, side int, want bool) error {
	has, fd := &p.outA, p.a
	if side == 1 {
		has, fd = &p.outB, p.b
	}
	if *has == want {
		return nil
	}
	*has = want
	return l.watch(fd, eventKey(p.id, side), unix.EPOLL_CTL_MOD, want)
}

// finish ends p: closed (reset after an error), its pipes returned, its end
// called.
func (l *Loop) finish(p *loopPair, failed bool) {
	if !l.remove(p) {
		return
	}
	if failed {
		resetClose(p.a)
		resetClose(p.b)
	} else {
		rawClose(p.a)
		rawClose(p.b)
	}
	l.pipes.put(p.dir[0].pipe, failed)
	l.pipes.put(p.dir[1].pipe, failed)
	if p.end != nil {
		p.end(p.dir[0].total, p.dir[1].total)
	}
}

// keptPipes counts the pipes kept for later pairs.
func (l *Loop) keptPipes() int {
	n := 0
	l.mu.Lock()
	if l.fast != nil {
		n = l.fast.keptPipes()
	}
	l.mu.Unlock()
	if l.pipes != nil {
		l.pipes.mu.Lock()
		n += len(l.pipes.free)
		l.pipes.mu.Unlock()
	}
	return n
}
