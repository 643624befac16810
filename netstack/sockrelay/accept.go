package sockrelay

import (
	"encoding/binary"
	"fmt"
	"net"
	"net/netip"
	"os"
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

// Accept takes a connection from the listener lfd with raw system calls:
// a non-blocking descriptor and its peer's address.
func Accept(lfd uintptr) (int, netip.AddrPort, unix.Errno) {
	var sa unix.RawSockaddrAny
	n := uint32(unsafe.Sizeof(sa))
	for {
		r, _, errno := unix.RawSyscall6(unix.SYS_ACCEPT4, lfd, uintptr(unsafe.Pointer(&sa)), uintptr(unsafe.Pointer(&n)),
			unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, 0, 0)
		if errno == unix.EINTR {
			continue
		}
		if errno != 0 {
			return -1, netip.AddrPort{}, errno
		}
		return int(r), addrPortOf(&sa), 0
	}
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
