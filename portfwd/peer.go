package portfwd

import (
	"errors"
	"fmt"
	"net"
	"os"
	"strconv"
	"syscall"

	"golang.org/x/sys/unix"
)

// UserNS identifies a user namespace by its nsfs inode.
type UserNS struct{ Dev, Ino uint64 }

// pidfdGetUserNamespace is the pidfd ioctl that returns the process's user
// namespace (PIDFD_GET_USER_NAMESPACE, _IO(0xFF, 9), Linux 6.11), here until
// x/sys/unix has it. The helper's seccomp allow-list admits it.
const pidfdGetUserNamespace = 0xff09

// maxUserNSDepth is the kernel's nesting limit for user namespaces.
const maxUserNSDepth = 33

// GuestUserNS identifies the user namespace a guest runs in: the one at
// userNSPath (/proc/PID/ns/user), or if that is empty the owner of the
// network namespace at netNSPath. below reports whether it is nested in
// our own user namespace; same, whether it is our own.
func GuestUserNS(userNSPath, netNSPath string) (ns UserNS, below, same bool, err error) {
	var fd int
	if userNSPath != "" {
		fd, err = unix.Open(userNSPath, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	} else {
		fd, err = userNSOwning(netNSPath)
	}
	if err != nil {
		return UserNS{}, false, false, fmt.Errorf("guest's user namespace: %w", err)
	}
	defer func() { unix.Close(fd) }()
	own, err := userNSAt("/proc/self/ns/user")
	if err != nil {
		return UserNS{}, false, false, err
	}
	if ns, err = userNSOfFD(fd); err != nil {
		return UserNS{}, false, false, err
	}
	// Up from the guest's namespace: below ours if we meet it.
	for depth := 0; depth < maxUserNSDepth && !below; depth++ {
		parent, err := unix.IoctlRetInt(fd, unix.NS_GET_PARENT)
		if err != nil {
			break
		}
		unix.Close(fd)
		fd = parent
		p, err := userNSOfFD(fd)
		below = err == nil && p == own
	}
	return ns, below, ns == own, nil
}

func userNSAt(path string) (UserNS, error) {
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		return UserNS{}, fmt.Errorf("user namespace %s: %w", path, err)
	}
	return UserNS{Dev: st.Dev, Ino: st.Ino}, nil
}

// userNSOwning opens the user namespace that owns the network namespace at
// path.
func userNSOwning(netnsPath string) (int, error) {
	f, err := os.Open(netnsPath)
	if err != nil {
		return -1, err
	}
	defer f.Close()
	fd, err := unix.IoctlRetInt(int(f.Fd()), unix.NS_GET_USERNS)
	if err != nil {
		return -1, fmt.Errorf("owner of network namespace %s: %w", netnsPath, err)
	}
	return fd, nil
}

func userNSOfFD(fd int) (UserNS, error) {
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return UserNS{}, err
	}
	return UserNS{Dev: st.Dev, Ino: st.Ino}, nil
}

// errGuestCaller is the refusal of a request from inside the guest.
var errGuestCaller = errors.New("the API is not available from inside the namespace it configures")

// errUninspectable: the kernel would not show us the caller's namespace
// (ptrace access mode read: another user's process, or a non-dumpable
// one we hold no CAP_SYS_PTRACE over).
var errUninspectable = errors.New("cannot see the caller's user namespace")

// guestFilter refuses the guest's processes the API's requests.
type guestFilter struct {
	userNS     UserNS
	seesGuests bool
}

// check returns why conn's caller is refused, or nil.
func (g *guestFilter) check(conn net.Conn, ownNetns uint64) error {
	err := checkPeer(conn, g.userNS)
	if !errors.Is(err, errUninspectable) {
		return err
	}
	if g.seesGuests {
		return nil // not one of the guest's: we could inspect all of those
	}
	// A socket is made in its maker's network namespace (for a Unix
	// connection, our end is made in the caller's), and no guest process
	// can enter ours: the guest's network is the one we serve.
	if c := netnsCookie(conn); c != 0 && c == ownNetns {
		return nil
	}
	return fmt.Errorf("%w, and it is in another network namespace", err)
}

// netnsCookie identifies the network namespace a socket was made in (0:
// unknown).
func netnsCookie(c any) uint64 {
	sc, ok := c.(syscall.Conn)
	if !ok {
		return 0
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return 0
	}
	var cookie uint64
	_ = rc.Control(func(fd uintptr) {
		v, err := unix.GetsockoptUint64(int(fd), unix.SOL_SOCKET, unix.SO_NETNS_COOKIE)
		if err == nil {
			cookie = v
		}
	})
	return cookie
}

// checkPeer refuses a connection from a process in user namespace guest or
// one nested in it. The socket's mode does not keep the guest out: it runs
// as the same user, and with the same filesystem it can reach the socket.
//
// The peer is the process that connected (SO_PEERPIDFD, pinned; else the
// PID of SO_PEERCRED), its user namespace found through the pidfd (Linux
// 6.11) or /proc, then walked up with NS_GET_PARENT until the guest's is
// met or the kernel refuses to go higher (outside our own namespace's
// view). A peer whose namespace the kernel will not show us is reported
// as errUninspectable; one that has exited is refused.
func checkPeer(conn net.Conn, guest UserNS) error {
	uc, ok := conn.(*net.UnixConn)
	if !ok {
		return nil // not a Unix socket: not reachable from the guest's filesystem
	}
	rc, err := uc.SyscallConn()
	if err != nil {
		return fmt.Errorf("identify the caller: %w", err)
	}
	var nsfd int
	var cerr error
	err = rc.Control(func(fd uintptr) { nsfd, cerr = peerUserNS(int(fd)) })
	if err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("identify the caller: %w", err)
	}
	for depth := 0; depth < maxUserNSDepth; depth++ {
		ns, err := userNSOfFD(nsfd)
		if err != nil {
			unix.Close(nsfd)
			return fmt.Errorf("identify the caller: %w", err)
		}
		if ns == guest {
			unix.Close(nsfd)
			return errGuestCaller
		}
		parent, err := unix.IoctlRetInt(nsfd, unix.NS_GET_PARENT)
		unix.Close(nsfd)
		if err != nil {
			// EPERM: above our own view, so not below the guest's.
			return nil
		}
		nsfd = parent
	}
	unix.Close(nsfd)
	return errors.New("identify the caller: user namespaces nested too deep")
}

// peerUserNS opens the user namespace of the process at the other end of
// the connected Unix socket fd.
func peerUserNS(fd int) (int, error) {
	cred, err := unix.GetsockoptUcred(fd, unix.SOL_SOCKET, unix.SO_PEERCRED)
	if err != nil {
		return -1, err
	}
	pidfd, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_PEERPIDFD)
	if err != nil {
		// Before Linux 6.5: the PID alone, which the peer would have to
		// give up and a stranger take between connect and now to fool.
		return procUserNS(int(cred.Pid))
	}
	defer unix.Close(pidfd)
	nsfd, err := unix.IoctlRetInt(pidfd, pidfdGetUserNamespace)
	if err == nil || !errors.Is(err, unix.ENOTTY) && !errors.Is(err, unix.EINVAL) {
		return nsfd, inspectErr(err)
	}
	// Before Linux 6.11: through /proc, while the pidfd pins the peer.
	nsfd, err = procUserNS(int(cred.Pid))
	if err != nil {
		return -1, err
	}
	// Still running now, the peer was the process /proc showed.
	if pidfdExited(pidfd) {
		unix.Close(nsfd)
		return -1, errors.New("the caller has exited")
	}
	return nsfd, nil
}

// pidfdExited reports whether a pidfd's process has exited (or cannot be
// told to be running).
func pidfdExited(pidfd int) bool {
	fds := []unix.PollFd{{Fd: int32(pidfd), Events: unix.POLLIN}}
	n, err := unix.Poll(fds, 0)
	return err != nil || n > 0
}

func procUserNS(pid int) (int, error) {
	if pid <= 0 {
		return -1, errors.New("no peer process")
	}
	fd, err := unix.Open("/proc/"+strconv.Itoa(pid)+"/ns/user", unix.O_RDONLY|unix.O_CLOEXEC, 0)
	var st unix.Stat_t
	if errors.Is(err, unix.ENOENT) && errors.Is(unix.Stat("/proc/self/ns/user", &st), unix.ENOENT) {
		// No /proc here (usernet's sandbox): not the peer's absence.
		return -1, fmt.Errorf("%w: no /proc", errUninspectable)
	}
	return fd, inspectErr(err)
}

// inspectErr tells a refusal to show the peer (errUninspectable) from
// the peer being gone (ESRCH, ENOENT) and other failures.
func inspectErr(err error) error {
	switch {
	case err == nil:
		return nil
	case errors.Is(err, unix.EACCES), errors.Is(err, unix.EPERM):
		return fmt.Errorf("%w: %w", errUninspectable, err)
	case errors.Is(err, unix.ESRCH), errors.Is(err, unix.ENOENT):
		return errors.New("the caller has exited")
	}
	return err
}
