//go:build cgo

package sockrelay

/*
#include "cloop.h"
*/
import "C"

import (
	"fmt"
	"os"
	"sync"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
)

// cLoop is a Loop's fast loop: a C thread (cloop.c) that relays the pairs
// found busy. A goroutine that blocks in the kernel parks through the
// scheduler, a few microseconds per wake-up, and a request and its answer
// wake a relay twice; a C thread wakes straight from epoll_wait. For short
// connections the goroutine is cheaper: their few wake-ups then stay on the
// helper's own thread instead of waking another. Its notes (a pair ended)
// come back through an eventfd in Go's poller, read by one goroutine that
// runs the pairs' end functions.
type cLoop struct {
	c    *C.struct_cl_loop
	note *os.File

	mu   sync.Mutex
	ends map[uint64]func(up, down int64)
	// next names the last pair added: the C loop's own ids are slots,
	// reused while an ended pair's note may still wait.
	next   uint64
	closed bool
	done   chan struct{}
}

func newCLoop() (*cLoop, error) {
	efd, err := unix.Eventfd(0, unix.EFD_NONBLOCK|unix.EFD_CLOEXEC)
	if err != nil {
		return nil, fmt.Errorf("relay loop: eventfd: %w", err)
	}
	var cerr C.int
	c := C.cl_new(C.int(efd), &cerr)
	if c == nil {
		unix.Close(efd)
		return nil, fmt.Errorf("relay loop: %w", syscall.Errno(cerr))
	}
	l := &cLoop{c: c, note: os.NewFile(uintptr(efd), "relay-notes"), ends: make(map[uint64]func(up, down int64)), done: make(chan struct{})}
	go l.notes()
	return l, nil
}

// add relays a and b as Loop.Add does, counting on from up and down. An
// error means a and b were closed with a reset.
func (l *cLoop) add(a, b int, up, down int64, end func(up, down int64)) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.closed {
		resetClose(a)
		resetClose(b)
		return errLoopClosed
	}
	// Under the lock: the pair's end waits for its function.
	l.next++
	if rc := C.cl_add(l.c, C.int(a), C.int(b), C.int64_t(up), C.int64_t(down), C.uint64_t(l.next)); rc < 0 {
		return fmt.Errorf("relay loop: %w", syscall.Errno(-rc))
	}
	l.ends[l.next] = end
	return nil
}

// close resets every pair's sockets (their end functions are not called)
// and ends the thread.
func (l *cLoop) close() {
	l.mu.Lock()
	if l.closed {
		l.mu.Unlock()
		return
	}
	l.closed = true
	l.ends = nil
	l.mu.Unlock()
	// The thread first: it writes to the eventfd until stopped.
	C.cl_stop(l.c)
	l.note.Close()
	<-l.done
	C.cl_free(l.c)
}

// notes runs the end functions of the pairs the C thread noted, until
// close.
func (l *cLoop) notes() {
	defer close(l.done)
	rc, err := l.note.SyscallConn()
	if err != nil {
		return
	}
	var buf [64]C.struct_cl_note
	_ = rc.Read(func(fd uintptr) bool {
		var v [8]byte
		unix.RawSyscall(unix.SYS_READ, fd, uintptr(unsafe.Pointer(&v[0])), 8)
		for {
			n := int(C.cl_take_notes(l.c, &buf[0], C.size_t(len(buf))))
			for _, note := range buf[:n] {
				l.ended(note)
			}
			if n < len(buf) {
				return false
			}
		}
	})
}

func (l *cLoop) ended(note C.struct_cl_note) {
	key := uint64(note.key)
	l.mu.Lock()
	end := l.ends[key]
	delete(l.ends, key)
	l.mu.Unlock()
	if end != nil {
		end(int64(note.up), int64(note.down))
	}
}

// keptPipes counts the pipes kept for later pairs.
func (l *cLoop) keptPipes() int { return int(C.cl_kept_pipes(l.c)) }
