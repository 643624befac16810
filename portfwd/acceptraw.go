package portfwd

import (
	"encoding/binary"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"unsafe"

	"golang.org/x/sys/unix"
)

// rawGuest is a Guest that takes accepted connections as raw descriptors
// (KernelPath, whose relay loop has them so): its forwards accept without
// the net package, which wraps each connection in a pollable descriptor
// and, per connection, makes calls through the scheduler that keep the
// runtime's monitor awake (see sockrelay.Loop).
type rawGuest interface {
	Guest
	// forwardRawTCP owns fd, the non-blocking socket of client.
	forwardRawTCP(fd int, client, guest netip.AddrPort) error
}

var _ rawGuest = (*KernelPath)(nil)

// listenerFile turns ln into a pollable file of the listening socket (a
// net.Listener's raw connection cannot wait) and closes ln.
func listenerFile(ln *net.TCPListener) (*os.File, error) {
	defer ln.Close()
	f, err := ln.File()
	if err != nil {
		return nil, fmt.Errorf("listener: %w", err)
	}
	// The duplicate shares the non-blocking flag, so the poller takes
	// it; Fd, which would clear the flag, is never called.
	return f, nil
}

// acceptRaw is acceptTCP for a rawGuest, on the listener lf.
func (f *forward) acceptRaw(lf *os.File, guest rawGuest, log *slog.Logger) {
	rc, err := lf.SyscallConn()
	if err != nil {
		log.Warn("published port stopped accepting", "rule", f.rule.String(), "err", err)
		return
	}
	for {
		fd, client, errno := -1, netip.AddrPort{}, unix.Errno(0)
		err := rc.Read(func(lfd uintptr) bool {
			fd, client, errno = accept(lfd)
			return errno != unix.EAGAIN
		})
		switch {
		case err != nil:
			if !f.stopping.Load() {
				log.Warn("published port stopped accepting", "rule", f.rule.String(), "err", err)
			}
			return
		case errno == unix.ECONNABORTED:
			continue
		case errno != 0:
			log.Warn("published port stopped accepting", "rule", f.rule.String(), "err", errno)
			return
		}
		setAcceptedOptions(fd)
		target := f.rule.guestFor(client.Addr())
		// As acceptTCP's: the Guest owns the connection.
		go func() {
			if err := guest.forwardRawTCP(fd, client, target); err != nil {
				log.Debug("published tcp connection", "rule", f.rule.String(), "client", client, "err", err)
			}
		}()
	}
}

// accept takes a connection from the listener lfd with raw system calls.
func accept(lfd uintptr) (int, netip.AddrPort, unix.Errno) {
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

// setAcceptedOptions gives an accepted socket what the net package's
// listener gives its connections: no Nagle delay (a relay's small writes
// leave at once) and keepalive probes after 15 s idle (a vanished client's
// connection ends).
func setAcceptedOptions(fd int) {
	for _, o := range [...]struct{ level, name, value int32 }{
		{unix.IPPROTO_TCP, unix.TCP_NODELAY, 1},
		{unix.SOL_SOCKET, unix.SO_KEEPALIVE, 1},
		{unix.IPPROTO_TCP, unix.TCP_KEEPIDLE, 15},
		{unix.IPPROTO_TCP, unix.TCP_KEEPINTVL, 15},
	} {
		v := o.value
		unix.RawSyscall6(unix.SYS_SETSOCKOPT, uintptr(fd), uintptr(o.level), uintptr(o.name),
			uintptr(unsafe.Pointer(&v)), 4, 0)
	}
}
