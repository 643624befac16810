package netstack

import (
	"errors"
	"io"
	"sync"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
)

// The TCP relay does I/O on host sockets with raw system calls, inside the
// callbacks of the socket's syscall.RawConn (which keep the descriptor open
// and wait in Go's netpoller when the socket is not ready).
//
// The net package tells the scheduler about every read and write. On a
// helper that runs on one P, a socket write that takes a while (a loopback
// write runs the receiver's TCP in our thread) then makes the runtime hand
// the P to another thread, and keeps its monitor thread waking every 20 µs
// to look (strace of 1-byte request/response: 3051 nanosleep and 406 futex
// calls per 5120 round trips). The sockets are non-blocking, so raw calls
// never sleep.

// streamWriter is the io.Writer gVisor's Endpoint.Read hands the guest's
// data to, view by view, while it holds the endpoint's lock: small views
// are gathered in stage, a large one goes to the socket at once together
// with what is staged, so the data is copied out of gVisor's buffers
// only by the kernel. Write never waits: when the socket is full, what
// fits is kept in stage and Write reports errStreamFull, which ends the
// read; flush then waits for room outside the lock.
type streamWriter struct {
	rc    syscall.RawConn
	stage []byte
	// full is set once the socket took less than offered; flush clears it.
	full bool
	err  error
	// The current send, for the netpoller callbacks.
	iov   [2]unix.Iovec
	niov  int
	n     int
	errno syscall.Errno
	// sendOnce and sendWait are bound once: closures made per call would
	// allocate.
	sendOnce, sendWait func(fd uintptr) bool
}

// streamStageSize holds the small views of several segments, and the
// rest of a large one the socket would not take.
const streamStageSize = 64 << 10

// streamDirectMin is the size from which a view is sent rather than
// staged: with readSizes, the large buffer of a big frame.
const streamDirectMin = 4 << 10

var errStreamFull = errors.New("host socket full")

var streamStages = sync.Pool{New: func() any {
	b := make([]byte, 0, streamStageSize)
	return &b
}}

func newStreamWriter(rc syscall.RawConn) *streamWriter {
	w := &streamWriter{rc: rc, stage: (*streamStages.Get().(*[]byte))[:0]}
	w.sendOnce = func(fd uintptr) bool { w.send(fd); return true }
	w.sendWait = func(fd uintptr) bool { w.send(fd); return w.errno != unix.EAGAIN }
	return w
}

func (w *streamWriter) release() {
	b := w.stage[:0]
	w.stage = nil
	streamStages.Put(&b)
}

func (w *streamWriter) setIov(parts ...[]byte) {
	w.niov = 0
	for _, p := range parts {
		if len(p) == 0 {
			continue
		}
		w.iov[w.niov].Base = &p[0]
		w.iov[w.niov].SetLen(len(p))
		w.niov++
	}
}

func (w *streamWriter) send(fd uintptr) {
	w.n, w.errno = sendIovecs(fd, w.iov[:w.niov])
}

// sendIovecs sends iov on the socket fd without waiting, and never raises
// SIGPIPE (a peer that reset the connection gives EPIPE).
func sendIovecs(fd uintptr, iov []unix.Iovec) (int, unix.Errno) {
	var msg unix.Msghdr
	if len(iov) > 0 {
		msg.Iov = &iov[0]
		msg.SetIovlen(len(iov))
	}
	for {
		n, _, errno := unix.RawSyscall(unix.SYS_SENDMSG, fd, uintptr(unsafe.Pointer(&msg)), unix.MSG_DONTWAIT|unix.MSG_NOSIGNAL)
		if errno == unix.EINTR {
			continue
		}
		if errno != 0 {
			return 0, errno
		}
		return int(n), 0
	}
}

// Write implements io.Writer for Endpoint.Read: it takes what it can,
// and reports an error whenever it took less than all of p.
func (w *streamWriter) Write(p []byte) (int, error) {
	if w.full || w.err != nil {
		return 0, errStreamFull
	}
	if len(p) < streamDirectMin && len(w.stage)+len(p) <= cap(w.stage) {
		w.stage = append(w.stage, p...)
		return len(p), nil
	}
	w.setIov(w.stage, p)
	err := w.rc.Write(w.sendOnce)
	if err == nil && w.errno != 0 && w.errno != unix.EAGAIN {
		err = w.errno
	}
	if err != nil {
		w.err = err
		return 0, err
	}
	sent := w.n
	if sent < len(w.stage) {
		w.stage = w.stage[:copy(w.stage, w.stage[sent:])]
		sent = 0
	} else {
		sent -= len(w.stage)
		w.stage = w.stage[:0]
	}
	if sent == len(p) {
		return sent, nil
	}
	// The socket is full: keep what fits for flush.
	w.full = true
	c := copy(w.stage[len(w.stage):cap(w.stage)], p[sent:])
	w.stage = w.stage[:len(w.stage)+c]
	if sent+c < len(p) {
		return sent + c, errStreamFull
	}
	return sent + c, nil
}

// flush sends everything staged, waiting for room as needed.
func (w *streamWriter) flush() error {
	for len(w.stage) > 0 && w.err == nil {
		w.setIov(w.stage)
		err := w.rc.Write(w.sendWait)
		if err == nil && w.errno != 0 {
			err = w.errno
		}
		if err != nil {
			w.err = err
			break
		}
		w.stage = w.stage[:copy(w.stage, w.stage[w.n:])]
	}
	w.full = false
	return w.err
}

// socketPayloader is the tcpip.Payloader that hands gVisor a host socket's
// data: gVisor sizes its buffer by Len and reads into it, so the only copy
// is the kernel's. It never reports an error to gVisor, which would drop
// what was read: a failed read ends the payload, and errno says why.
type socketPayloader struct {
	fd    uintptr
	left  int
	errno syscall.Errno
}

// socketInq says how many bytes a socket holds.
func socketInq(fd uintptr) (int, syscall.Errno) {
	var avail int32
	if _, _, errno := unix.RawSyscall(unix.SYS_IOCTL, fd, unix.SIOCINQ, uintptr(unsafe.Pointer(&avail))); errno != 0 {
		return 0, errno
	}
	return int(avail), 0
}

// readRaw reads what fd holds into b without waiting.
func readRaw(fd uintptr, b []byte) (int, syscall.Errno) {
	for {
		n, _, errno := unix.RawSyscall(unix.SYS_READ, fd, uintptr(unsafe.Pointer(&b[0])), uintptr(len(b)))
		if errno == unix.EINTR {
			continue
		}
		if errno != 0 {
			return 0, errno
		}
		return int(n), 0
	}
}

// Len implements tcpip.Payloader.
func (p *socketPayloader) Len() int { return p.left }

// Read implements io.Reader.
func (p *socketPayloader) Read(b []byte) (int, error) {
	if p.left == 0 {
		return 0, io.EOF
	}
	if len(b) == 0 {
		// gVisor asks this way whether there is more.
		return 0, nil
	}
	if len(b) > p.left {
		b = b[:p.left]
	}
	n, errno := readRaw(p.fd, b)
	switch {
	case errno == unix.EAGAIN || (errno == 0 && n == 0):
		p.left = 0
		return 0, io.EOF
	case errno != 0:
		p.errno, p.left = errno, 0
		return 0, io.EOF
	}
	p.left -= n
	return n, nil
}
