// Package sockrelay relays bytes between two kernel TCP sockets: the
// kernel TCP path's (a listener's connection in the guest's namespace and a
// host socket) and the published ports' (a host client's and a socket in
// the guest's namespace).
package sockrelay

import (
	"errors"
	"sync"
	"sync/atomic"
	"syscall"

	"golang.org/x/sys/unix"
)

// Bytes go through a pipe with splice(2), so they are never copied into the
// helper; the calls are raw and non-blocking, with Go's netpoller waiting
// for readiness, because the net package's blocking-style calls (io.Copy
// between two TCPConns splices too) tell the scheduler about every system
// call and, when one takes a while (a loopback send runs the receiver's
// TCP, or the VM's CPU is taken), the runtime's monitor hands the P to
// another thread and keeps waking every 20 us. Published ports' 1-byte
// round trips through io.Copy: 3.5 context switches each in the helper,
// three threads busy.

// A pipe starts at the default capacity, which is also the most one splice
// moves. One direction that has carried bulkBytes grows its pipe to
// bulkPipe: a quarter of the splices and wake-ups per byte (2-CPU VM, bulk
// out, alternating runs: 17.5-19.8 -> 19.6-20.1 Gbit/s at 0.21-0.24 ->
// 0.18-0.20 s of helper CPU per GB). Only bulk directions: the kernel counts every pipe's capacity
// against the user's pipe-user-pages-soft (64 MiB by default), past which
// new pipes get two pages, and a thousand idle connections must not use it
// up.
const (
	defaultPipe = 64 << 10
	bulkPipe    = 256 << 10
	bulkBytes   = 1 << 20
)

// socketPipe is one direction's pipe; size is its capacity.
type socketPipe struct{ r, w, size int }

func newSocketPipe() (*socketPipe, error) {
	var p [2]int
	if err := unix.Pipe2(p[:], unix.O_NONBLOCK|unix.O_CLOEXEC); err != nil {
		return nil, err
	}
	return &socketPipe{r: p[0], w: p[1], size: defaultPipe}, nil
}

// grow asks for a bulk direction's capacity; the pipe must be empty. Past
// the user's limits the kernel says no, and the pipe stays as it is.
func (p *socketPipe) grow() {
	if n, err := unix.FcntlInt(uintptr(p.w), unix.F_SETPIPE_SZ, bulkPipe); err == nil {
		p.size = n
	}
}

func (p *socketPipe) close() {
	unix.Close(p.r)
	unix.Close(p.w)
}

func rawSplice(in, out uintptr, n int) (int, unix.Errno) {
	for {
		m, _, errno := unix.RawSyscall6(unix.SYS_SPLICE, in, 0, out, 0, uintptr(n),
			unix.SPLICE_F_NONBLOCK|unix.SPLICE_F_MOVE)
		if errno != unix.EINTR {
			return int(m), errno
		}
	}
}

// pump moves src's bytes to dst until src's end (nil) or an error, and
// returns how many it moved.
func (p *socketPipe) pump(src, dst syscall.RawConn) (int64, error) {
	var total int64
	for {
		var n int
		var errno unix.Errno
		// Each read tries before it waits: RawConn.Read forgets a
		// readiness that came before it, so waiting first could miss
		// data that arrived since the last splice.
		err := src.Read(func(fd uintptr) bool {
			n, errno = rawSplice(fd, uintptr(p.w), p.size)
			return errno != unix.EAGAIN
		})
		switch {
		case err != nil:
			return total, err
		case errno != 0:
			return total, errno
		case n == 0:
			return total, nil
		}
		for left := n; left > 0; {
			var m int
			err := dst.Write(func(fd uintptr) bool {
				m, errno = rawSplice(uintptr(p.r), fd, left)
				return errno != unix.EAGAIN
			})
			switch {
			case err != nil:
				return total, err
			case errno != 0:
				return total, errno
			}
			left -= m
			total += int64(m)
		}
		// The pipe is empty again.
		if p.size < bulkPipe && total >= bulkBytes && total-int64(n) < bulkBytes {
			p.grow()
		}
	}
}

// Socket is a connected TCP socket a relay takes over: a *net.TCPConn, or
// the *os.File of a non-blocking socket (os.NewFile hands those to the
// poller). A socket that need not be a net.Conn saves the net package's
// adoption: a dup and a dozen system calls of a short connection's sixty.
type Socket interface {
	SyscallConn() (syscall.RawConn, error)
	Close() error
}

// Relay relays guest and host until both directions ended, and closes
// both; up and down count the bytes each way. An end of stream becomes a
// half-close, an error a reset of both, and a reset of guest after its end
// of stream a reset of host. pipes, if not nil, lends the relay its pipes.
func Relay(guest, host Socket, pipes *Pipes) (up, down int64) {
	defer guest.Close()
	defer host.Close()
	gc, err1 := guest.SyscallConn()
	hc, err2 := host.SyscallConn()
	upPipe, err3 := pipes.get()
	downPipe, err4 := pipes.get()
	if err := errors.Join(err1, err2, err3, err4); err != nil {
		pipes.put(upPipe, true)
		pipes.put(downPipe, true)
		Abort(guest)
		Abort(host)
		return 0, 0
	}
	var wg sync.WaitGroup
	var downDone atomic.Bool
	wg.Add(1)
	go func() {
		defer wg.Done()
		var ended bool
		down, ended = pumpHalf(downPipe, hc, gc, host, guest)
		pipes.put(downPipe, !ended)
		downDone.Store(true)
	}()
	up, ended := pumpHalf(upPipe, gc, hc, guest, host)
	pipes.put(upPipe, !ended)
	// A guest that closed its side may still reset the connection (and
	// the host must then see a reset, not the clean end it saw so far)
	// while the host keeps sending, or not. Once the host's side ended
	// too there is nothing left to reset: no goroutine to watch (the
	// common close of a short connection).
	var watch sync.WaitGroup
	if ended && !downDone.Load() {
		watch.Add(1)
		go func() {
			defer watch.Done()
			watchReset(gc, guest, host)
		}()
	}
	wg.Wait()
	guest.Close()
	watch.Wait()
	return up, down
}

// Abort closes s with a reset.
func Abort(s Socket) {
	if rc, err := s.SyscallConn(); err == nil {
		_ = rc.Control(func(fd uintptr) {
			_ = unix.SetsockoptLinger(int(fd), unix.SOL_SOCKET, unix.SO_LINGER, &unix.Linger{Onoff: 1})
		})
	}
	s.Close()
}

// watchReset waits, after the guest's end of stream, for an error on its
// socket (the guest's reset) and resets host then; it returns once guest is
// closed.
func watchReset(gc syscall.RawConn, guest, host Socket) {
	// The error is looked at before each wait: RawConn.Read forgets a
	// readiness that came before it.
	soErr := 0
	err := gc.Read(func(fd uintptr) bool {
		soErr, _ = unix.GetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_ERROR)
		return soErr != 0
	})
	if err != nil || soErr == 0 {
		// Closed: the relay ended.
		return
	}
	Abort(host)
	guest.Close()
}

// pumpHalf runs one direction: at src's end it shuts dst's sending side, as
// src's peer did, and reports true; on an error it resets dst and closes
// both, which also ends the other direction.
func pumpHalf(p *socketPipe, src, dst syscall.RawConn, srcConn, dstConn Socket) (int64, bool) {
	n, err := p.pump(src, dst)
	if err != nil {
		// Both sides see a reset: the error may be the write's (the
		// destination reset), and the kernel then cleared what a
		// later look at the source's error would find.
		Abort(dstConn)
		Abort(srcConn)
		return n, false
	}
	// Raw: on loopback the FIN runs the peer's receive path within the
	// call, long enough for the runtime's monitor to take notice and
	// hand the P around when it goes through the scheduler.
	_ = dst.Control(func(fd uintptr) {
		unix.RawSyscall(unix.SYS_SHUTDOWN, fd, unix.SHUT_WR, 0)
	})
	return n, true
}
