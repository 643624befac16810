package sockrelay

import (
	"encoding/binary"
	"fmt"
	"net"
	"net/netip"
	"os"
	"syscall"
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
