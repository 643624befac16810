package sockrelay

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"syscall"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Dial connects a new TCP socket to remote, from local's address if it is
// valid, and returns it as a Socket: the *os.File of a non-blocking socket
// with TCP_NODELAY. It gives up after timeout (an error that is
// unix.ETIMEDOUT) or when ctx ends. The net package's dialer costs a short
// connection a dozen more system calls and a stack deep enough to grow a
// new goroutine's twice.
func Dial(ctx context.Context, local netip.Addr, remote netip.AddrPort, timeout time.Duration) (*os.File, error) {
	domain := unix.AF_INET
	if remote.Addr().Is6() {
		domain = unix.AF_INET6
	}
	fd, err := unix.Socket(domain, unix.SOCK_STREAM|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("socket: %w", err)
	}
	if err := unix.SetsockoptInt(fd, unix.IPPROTO_TCP, unix.TCP_NODELAY, 1); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("socket option: %w", err)
	}
	if local.IsValid() {
		var sa unix.Sockaddr = &unix.SockaddrInet4{Addr: local.As4()}
		if local.Is6() {
			sa = &unix.SockaddrInet6{Addr: local.As16()}
		}
		if err := unix.Bind(fd, sa); err != nil {
			unix.Close(fd)
			return nil, fmt.Errorf("bind %s: %w", local, err)
		}
	}
	if err := Connect(fd, remote); err != nil && !errors.Is(err, unix.EINPROGRESS) {
		unix.Close(fd)
		return nil, fmt.Errorf("connect %s: %w", remote, err)
	}
	f := os.NewFile(uintptr(fd), "tcp")
	if err := AwaitConnect(ctx, f, timeout); err != nil {
		f.Close()
		return nil, fmt.Errorf("connect %s: %w", remote, err)
	}
	return f, nil
}

// Connect starts a non-blocking connect of fd to remote without telling the
// scheduler: on loopback the whole handshake runs within the call, long
// enough for the runtime's monitor to hand the P to another thread (and
// then keep waking every 20 µs) when it goes through syscall.Syscall.
func Connect(fd int, remote netip.AddrPort) error {
	return sockaddrCall(unix.SYS_CONNECT, fd, remote)
}

// Bind binds fd to local, without the scheduler either: any call through
// it wakes the runtime's monitor from its idle sleep, for a millisecond of
// waking every 20 µs.
func Bind(fd int, local netip.AddrPort) error {
	return sockaddrCall(unix.SYS_BIND, fd, local)
}

func sockaddrCall(trap uintptr, fd int, ap netip.AddrPort) error {
	var sa unsafe.Pointer
	var n uintptr
	if ap.Addr().Is4() {
		raw := unix.RawSockaddrInet4{Family: unix.AF_INET, Addr: ap.Addr().As4()}
		binary.BigEndian.PutUint16((*[2]byte)(unsafe.Pointer(&raw.Port))[:], ap.Port())
		sa, n = unsafe.Pointer(&raw), unsafe.Sizeof(raw)
	} else {
		raw := unix.RawSockaddrInet6{Family: unix.AF_INET6, Addr: ap.Addr().As16()}
		binary.BigEndian.PutUint16((*[2]byte)(unsafe.Pointer(&raw.Port))[:], ap.Port())
		sa, n = unsafe.Pointer(&raw), unsafe.Sizeof(raw)
	}
	for {
		_, _, errno := unix.RawSyscall(trap, uintptr(fd), uintptr(sa), n)
		switch errno {
		case 0:
			return nil
		case unix.EINTR:
			continue
		}
		return errno
	}
}

// Connected says whether fd's non-blocking connect ended, and with what
// error. Raw, as Bind: x/sys/unix's Getpeername asks for the protocol
// through the scheduler.
func Connected(fd int) (bool, error) {
	var sa unix.RawSockaddrAny
	n := uint32(unsafe.Sizeof(sa))
	_, _, errno := unix.RawSyscall(unix.SYS_GETPEERNAME, uintptr(fd), uintptr(unsafe.Pointer(&sa)), uintptr(unsafe.Pointer(&n)))
	if errno == 0 {
		return true, nil
	}
	var soErr int32
	n = 4
	_, _, errno = unix.RawSyscall6(unix.SYS_GETSOCKOPT, uintptr(fd), unix.SOL_SOCKET, unix.SO_ERROR,
		uintptr(unsafe.Pointer(&soErr)), uintptr(unsafe.Pointer(&n)), 0)
	switch {
	case errno != 0:
		return true, errno
	case soErr != 0:
		return true, syscall.Errno(soErr)
	}
	return false, nil
}

// AwaitConnect waits for the non-blocking connect of f (a socket the poller
// has) to end, for timeout at most (then unix.ETIMEDOUT) or until ctx ends
// (ctx's error), and returns the connect's error.
func AwaitConnect(ctx context.Context, f *os.File, timeout time.Duration) error {
	rc, err := f.SyscallConn()
	if err != nil {
		return err
	}
	var result error
	done := func(fd uintptr) bool {
		var ended bool
		ended, result = Connected(int(fd))
		return ended
	}
	// On loopback the handshake usually ended within connect: no
	// deadline to set and clear.
	var ended bool
	if err := rc.Control(func(fd uintptr) { ended = done(fd) }); err != nil {
		return err
	}
	if ended {
		return result
	}
	if err := f.SetWriteDeadline(time.Now().Add(timeout)); err != nil {
		return err
	}
	stop := context.AfterFunc(ctx, func() { _ = f.SetWriteDeadline(time.Unix(1, 0)) })
	werr := rc.Write(done)
	if !stop() && ctx.Err() != nil {
		return ctx.Err()
	}
	if errors.Is(werr, os.ErrDeadlineExceeded) {
		return unix.ETIMEDOUT
	}
	if werr != nil {
		return werr
	}
	if err := f.SetWriteDeadline(time.Time{}); err != nil {
		return err
	}
	return result
}
