package sockrelay

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"syscall"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// ListenerFile turns ln into a pollable file of the listening socket (a
// net.Listener's raw connection cannot wait) and closes ln.
func ListenerFile(ln *net.TCPListener) (*os.File, error) {
	defer ln.Close()
	f, err := ln.File()
	if err != nil {
		return nil, fmt.Errorf("listener: %w", err)
	}
	// The duplicate shares the non-blocking flag, so the poller takes
	// it; Fd, which would clear the flag, is never called.
	return f, nil
}

// Accept waits for a connection on the listener of rc (ListenerFile's) and
// takes it with raw system calls: a non-blocking descriptor and its peer's
// address. The error is the wait's (the listener closed) or accept's (a
// unix.Errno: out of descriptors, say); a connection aborted before it was
// taken is skipped.
func Accept(rc syscall.RawConn) (int, netip.AddrPort, error) {
	var sa unix.RawSockaddrAny
	fd, errno := -1, unix.Errno(0)
	err := rc.Read(func(lfd uintptr) bool {
		for {
			n := uint32(unsafe.Sizeof(sa))
			r, _, e := unix.RawSyscall6(unix.SYS_ACCEPT4, lfd, uintptr(unsafe.Pointer(&sa)), uintptr(unsafe.Pointer(&n)),
				unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, 0, 0)
			switch e {
			case unix.EINTR, unix.ECONNABORTED:
				continue
			case unix.EAGAIN:
				return false
			}
			fd, errno = int(r), e
			return true
		}
	})
	switch {
	case err != nil:
		return -1, netip.AddrPort{}, err
	case errno != 0:
		return -1, netip.AddrPort{}, errno
	}
	return fd, addrPortOf(&sa), nil
}

// AcceptBackoff paces an accept loop through the errors that pass: the
// kernel out of descriptors or memory for a moment, or a connection's own
// failure. A listener that stops at the first one is dead until the helper
// restarts. The zero value is ready.
type AcceptBackoff struct{ delay time.Duration }

// Wait returns false if err ends the loop (the listener closed, or is no
// listener); else it waits, twice as long as the time before while errors
// come in a row (5 ms to 1 s), and returns true.
func (b *AcceptBackoff) Wait(err error) bool {
	var errno syscall.Errno
	if !errors.As(err, &errno) || errors.Is(err, net.ErrClosed) || errors.Is(err, os.ErrClosed) {
		return false
	}
	switch errno {
	case unix.EBADF, unix.EINVAL, unix.ENOTSOCK, unix.EFAULT:
		return false
	}
	b.delay = min(max(2*b.delay, 5*time.Millisecond), time.Second)
	time.Sleep(b.delay)
	return true
}

// Reset starts the next run of errors from the shortest wait.
func (b *AcceptBackoff) Reset() { b.delay = 0 }

func addrPortOf(sa *unix.RawSockaddrAny) netip.AddrPort {
	switch sa.Addr.Family {
	case unix.AF_INET:
		in := (*unix.RawSockaddrInet4)(unsafe.Pointer(sa))
		port := binary.BigEndian.Uint16((*[2]byte)(unsafe.Pointer(&in.Port))[:])
		return netip.AddrPortFrom(netip.AddrFrom4(in.Addr), port)
	case unix.AF_INET6:
		in := (*unix.RawSockaddrInet6)(unsafe.Pointer(sa))
		port := binary.BigEndian.Uint16((*[2]byte)(unsafe.Pointer(&in.Port))[:])
		return netip.AddrPortFrom(netip.AddrFrom16(in.Addr).Unmap(), port)
	}
	return netip.AddrPort{}
}
