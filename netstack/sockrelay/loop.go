package sockrelay

import (
	"errors"
	"sync/atomic"
	"unsafe"

	"golang.org/x/sys/unix"
)

// A Loop relays many pairs of sockets in one thread, as pasta does: the
// sockets are raw descriptors in an epoll set of the Loop's own. With cgo
// (loop_c.go) the thread is a C one, outside the Go runtime: a goroutine
// that blocks in the kernel either parks through the scheduler, a few
// microseconds per wake-up (a request and its answer wake the relay
// twice), or holds a P the rest of the helper then lacks. Without cgo
// (loop_go.go) it is a goroutine, with only the epoll set in Go's poller.
//
// Either way, against Relay's two goroutines per connection, their poller
// registrations, the os.File or net.Conn around each descriptor and its
// close through the scheduler (which, after an idle spell, sets the
// runtime's monitor waking every 20 µs for a millisecond): a short
// published connection cost a third more of the helper's CPU.
//
// Each socket is in the set for input only (edge-triggered); a direction
// whose destination is full asks for output until it drained, so that
// acknowledgements do not wake the loop for nothing.

var errLoopClosed = errors.New("relay loop closed")

// A pair is busy, more than one request and its answer, at its third read
// or its 64th KiB in one direction.
const (
	busyReads = 3
	busyBytes = 64 << 10
)

var lingerReset = unix.Linger{Onoff: 1}

// resetClose closes a socket so that its peer sees a reset.
func resetClose(fd int) {
	unix.RawSyscall6(unix.SYS_SETSOCKOPT, uintptr(fd), unix.SOL_SOCKET, unix.SO_LINGER,
		uintptr(unsafe.Pointer(&lingerReset)), unsafe.Sizeof(lingerReset), 0)
	rawClose(fd)
}

// rawClose closes fd without the scheduler (see Loop).
func rawClose(fd int) { unix.RawSyscall(unix.SYS_CLOSE, uintptr(fd), 0, 0) }

// Loops spreads pairs over several Loops in turn, so that relays use more
// than one CPU.
type Loops struct {
	all  []*Loop
	next atomic.Uint32
}

// NewLoops starts n Loops (at least one) that share pipes.
func NewLoops(n int, pipes *Pipes) (*Loops, error) {
	ls := &Loops{}
	for range max(n, 1) {
		l, err := NewLoop(pipes)
		if err != nil {
			ls.Close()
			return nil, err
		}
		ls.all = append(ls.all, l)
	}
	return ls, nil
}

// Add hands a and b to the next Loop (see Loop.Add).
func (ls *Loops) Add(a, b int, busy func(), end func(up, down int64)) error {
	i := ls.next.Add(1) % uint32(len(ls.all))
	return ls.all[i].Add(a, b, busy, end)
}

// Close closes every Loop.
func (ls *Loops) Close() {
	for _, l := range ls.all {
		l.Close()
	}
}
