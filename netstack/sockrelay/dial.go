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
// valid, and returns it as a raw non-blocking descriptor with
// SetConnOptions' options, for a Loop. It gives up after timeout (an error that is unix.ETIMEDOUT)
// or when ctx ends. A connect that does not end within its call (any but
// a loopback one) waits in Go's poller. The net package's dialer costs a
// short connection a dozen more system calls, some through the scheduler,
// and a stack that grows twice.
func Dial(ctx context.Context, local netip.Addr, remote netip.AddrPort, timeout time.Duration) (int, error) {
	domain := unix.AF_INET
	if remote.Addr().Is6() {
		domain = unix.AF_INET6
	}
	fd, err := unix.Socket(domain, unix.SOCK_STREAM|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return -1, fmt.Errorf("socket: %w", err)
	}
	SetConnOptions(fd)
	if local.IsValid() {
		if err := Bind(fd, netip.AddrPortFrom(local, 0)); err != nil {
			rawClose(fd)
			return -1, fmt.Errorf("bind %s: %w", local, err)
		}
	}
	if err := Connect(fd, remote); err != nil && !errors.Is(err, unix.EINPROGRESS) {
		rawClose(fd)
		return -1, fmt.Errorf("connect %s: %w", remote, err)
	}
	if fd, err = AwaitConnected(ctx, fd, timeout); err != nil {
		return -1, fmt.Errorf("connect %s: %w", remote, err)
	}
	return fd, nil
}

// AwaitConnected waits for the non-blocking connect of fd, which it takes,
// to end, for timeout at most (then unix.ETIMEDOUT) or until ctx ends
// (ctx's error), and returns the connected socket (fd, or its duplicate
// when it had to wait in Go's poller) or the connect's error (fd closed).
// On loopback the handshake usually ended within connect: no wait.
func AwaitConnected(ctx context.Context, fd int, timeout time.Duration) (int, error) {
	ended, err := Connected(fd)
	if !ended {
		return awaitInPoller(ctx, fd, timeout)
	}
	if err != nil {
		rawClose(fd)
		return -1, err
	}
	return fd, nil
}

// awaitInPoller waits for fd's connect in Go's poller, and returns a
// descriptor of it that is out of the poller (fd is closed).
func awaitInPoller(ctx context.Context, fd int, timeout time.Duration) (int, error) {
	f := os.NewFile(uintptr(fd), "tcp")
	if err := awaitConnect(ctx, f, timeout); err != nil {
		f.Close()
		return -1, err
	}
	dup, err := Detach(f)
	if err != nil {
		f.Close()
	}
	return dup, err
}

// Detach returns a non-blocking duplicate of s's descriptor, which the
// caller owns, and closes s; on an error s stays open. It takes sockets
// out of the os.File or net.Conn they came in (a port helper's, a
// listener's connection) for a Loop.
func Detach(s Socket) (int, error) {
	rc, err := s.SyscallConn()
	if err != nil {
		return -1, fmt.Errorf("take socket: %w", err)
	}
	fd := -1
	var derr error
	err = rc.Control(func(s uintptr) {
		if fd, derr = unix.FcntlInt(s, unix.F_DUPFD_CLOEXEC, 0); derr == nil {
			// The flag is the open file's, which the duplicate
			// shares.
			if derr = unix.SetNonblock(fd, true); derr != nil {
				unix.Close(fd)
				fd = -1
			}
		}
	})
	if err = errors.Join(err, derr); err != nil {
		return -1, fmt.Errorf("take socket: %w", err)
	}
	s.Close()
	return fd, nil
}

// SetConnOptions gives a relayed socket what the net package gives its
// connections: no Nagle delay (a relay's small writes leave at once) and
// keepalive probes after 15 s idle (a peer that vanished ends the
// connection, and the relay resets the other side).
func SetConnOptions(fd int) {
	SetOption(fd, unix.IPPROTO_TCP, unix.TCP_NODELAY, 1)
	SetOption(fd, unix.SOL_SOCKET, unix.SO_KEEPALIVE, 1)
	SetOption(fd, unix.IPPROTO_TCP, unix.TCP_KEEPIDLE, 15)
	SetOption(fd, unix.IPPROTO_TCP, unix.TCP_KEEPINTVL, 15)
}

// SetOption sets an integer socket option with a raw system call (see
// Bind); what fails is left as it was.
func SetOption(fd, level, name, value int) {
	v := int32(value)
	unix.RawSyscall6(unix.SYS_SETSOCKOPT, uintptr(fd), uintptr(level), uintptr(name), uintptr(unsafe.Pointer(&v)), 4, 0)
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

// awaitConnect waits for the non-blocking connect of f (a socket the
// poller has) to end, as AwaitConnected does.
func awaitConnect(ctx context.Context, f *os.File, timeout time.Duration) error {
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
	return result
}
