package netstack

import (
	"io"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
)

// The relays do I/O on host sockets with raw system calls, waiting in Go's
// netpoller only when a socket is not ready.
//
// The net package tells the scheduler about every read and write. On a
// helper that runs on one P, a socket write that takes a while (a loopback
// write runs the receiver's TCP in our thread) then makes the runtime hand
// the P to another thread, and keeps its monitor thread waking every 20 µs
// to look. The sockets are non-blocking, so raw calls never sleep.
//
// A socket has one hostReader and one hostWriter, used by one goroutine
// each.

// hostReader reads a host socket.
type hostReader struct {
	rc syscall.RawConn
	// try is r.tryRead bound once: a closure made per call would
	// allocate.
	try   func(fd uintptr) bool
	buf   []byte
	n     int
	errno syscall.Errno
}

func newHostReader(rc syscall.RawConn) *hostReader {
	r := &hostReader{rc: rc}
	r.try = r.tryRead
	return r
}

// tryRead is the netpoller's callback. A short read is no sign that the
// socket is empty: a FIN that arrived with the data is only reported by the
// next read, and its wake-up has been spent, so every wait starts with a
// read that may return EAGAIN.
func (r *hostReader) tryRead(fd uintptr) bool {
	for {
		n, _, errno := unix.RawSyscall(unix.SYS_READ, fd, uintptr(unsafe.Pointer(&r.buf[0])), uintptr(len(r.buf)))
		if errno == unix.EINTR {
			continue
		}
		r.n, r.errno = int(n), errno
		return errno != unix.EAGAIN
	}
}

// Read reads what the socket holds into p, waiting for data if there is
// none; it returns io.EOF once the peer has finished sending.
func (r *hostReader) Read(p []byte) (int, error) {
	if len(p) == 0 {
		return 0, nil
	}
	r.buf = p
	err := r.rc.Read(r.try)
	r.buf = nil
	switch {
	case err != nil:
		return 0, err
	case r.errno != 0:
		return 0, r.errno
	case r.n == 0:
		return 0, io.EOF
	}
	return r.n, nil
}

// hostWriter writes a host socket.
type hostWriter struct {
	rc    syscall.RawConn
	try   func(fd uintptr) bool
	buf   []byte
	n     int
	errno syscall.Errno
}

func newHostWriter(rc syscall.RawConn) *hostWriter {
	w := &hostWriter{rc: rc}
	w.try = w.tryWrite
	return w
}

func (w *hostWriter) tryWrite(fd uintptr) bool {
	// send(2) with MSG_NOSIGNAL: a peer that reset the connection gives
	// EPIPE, never SIGPIPE.
	for {
		n, _, errno := unix.RawSyscall6(unix.SYS_SENDTO, fd, uintptr(unsafe.Pointer(&w.buf[0])), uintptr(len(w.buf)),
			unix.MSG_NOSIGNAL|unix.MSG_DONTWAIT, 0, 0)
		if errno == unix.EINTR {
			continue
		}
		w.n, w.errno = int(n), errno
		return errno != unix.EAGAIN
	}
}

// Write writes all of p, waiting for room in the socket as often as needed.
func (w *hostWriter) Write(p []byte) (int, error) {
	done := 0
	for done < len(p) {
		w.buf = p[done:]
		err := w.rc.Write(w.try)
		w.buf = nil
		if err != nil {
			return done, err
		}
		if w.errno != 0 {
			return done, w.errno
		}
		done += w.n
	}
	return done, nil
}
