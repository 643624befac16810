package launcher

import (
	"errors"
	"fmt"
	"os"

	"golang.org/x/sys/unix"
)

// NotifyReady writes the single byte "1" to fd and closes it: the readiness
// signal podman and rootlesskit wait for on a slirp4netns ready fd.
func NotifyReady(fd int) error {
	f := os.NewFile(uintptr(fd), "ready-fd")
	if f == nil {
		return fmt.Errorf("ready-fd %d: not a valid descriptor", fd)
	}
	defer f.Close()
	if _, err := f.Write([]byte("1")); err != nil {
		return fmt.Errorf("ready-fd %d: %w", fd, err)
	}
	return nil
}

// WaitHangup blocks until fd reports a hang-up, an error, or is not an open
// descriptor at all, as slirp4netns's exit fd does. Data waiting on fd does
// not count. It holds an OS thread while it waits; it is meant to run for
// the life of the process.
func WaitHangup(fd int) error {
	fds := []unix.PollFd{{Fd: int32(fd), Events: 0}}
	for {
		_, err := unix.Poll(fds, -1)
		if errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil {
			return fmt.Errorf("exit-fd %d: %w", fd, err)
		}
		if fds[0].Revents != 0 {
			return nil
		}
	}
}

// WatchExit returns a channel closed when process pid exits, and a stop
// function that releases the watch. It uses a pidfd, so a reused PID cannot
// fool it. A process that is gone already (ESRCH: exited and reaped) gives
// a closed channel.
func WatchExit(pid int) (<-chan struct{}, func(), error) {
	fd, err := unix.PidfdOpen(pid, unix.PIDFD_NONBLOCK)
	if errors.Is(err, unix.ESRCH) {
		gone := make(chan struct{})
		close(gone)
		return gone, func() {}, nil
	}
	if err != nil {
		return nil, nil, fmt.Errorf("watch PID %d: %w", pid, err)
	}
	f := os.NewFile(uintptr(fd), "pidfd")
	rc, err := f.SyscallConn()
	if err != nil {
		f.Close()
		return nil, nil, fmt.Errorf("watch PID %d: %w", pid, err)
	}
	exited := make(chan struct{})
	go func() {
		// A pidfd polls readable once the process has exited. Each
		// call looks before the poller waits: RawConn.Read forgets a
		// readiness that came before it (the process may have exited
		// since the pidfd was opened, and no edge would follow).
		err := rc.Read(func(fd uintptr) bool {
			p := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}
			n, err := unix.Poll(p, 0)
			return err == nil && n > 0
		})
		if err == nil {
			close(exited)
		}
	}()
	return exited, func() { f.Close() }, nil
}
