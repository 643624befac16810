package launcher

import (
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// ErrGone means the process a ProcessID named has exited; its PID may
// belong to another process by now.
var ErrGone = errors.New("process has exited")

// ProcessID names one process for its whole life, for state that outlives
// the process that wrote it (a detached namespace's state directory).
//
// A PID alone does not: once the process exits the kernel hands the number
// to the next process that starts, and whoever acts on a stale PID file
// signals or joins a stranger. The start time (/proc/PID/stat field 22,
// clock ticks after boot) cannot be shared by two processes that had the
// same PID one after the other. Open checks it while holding a pidfd: the
// pidfd pins the process that had the PID when it was opened, and a start
// time read after that which still matches proves the pidfd's process is
// the recorded one; every later action goes through the pidfd, which a new
// process cannot take over.
type ProcessID struct {
	PID   int
	Start uint64
}

// ProcessIDOf reads the identity of the process pid is now.
func ProcessIDOf(pid int) (ProcessID, error) {
	start, err := startTime(pid)
	if err != nil {
		return ProcessID{}, err
	}
	return ProcessID{PID: pid, Start: start}, nil
}

// startTime reads field 22 of /proc/PID/stat. The second field (the
// command name) may hold spaces and parentheses, so fields are counted
// from the last ')'.
func startTime(pid int) (uint64, error) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return 0, ErrGone
		}
		return 0, fmt.Errorf("start time of PID %d: %w", pid, err)
	}
	i := strings.LastIndexByte(string(b), ')')
	if i < 0 {
		return 0, fmt.Errorf("start time of PID %d: malformed stat", pid)
	}
	// After ')' come field 3 (state), 4, ...: field 22 is the 20th.
	f := strings.Fields(string(b[i+1:]))
	if len(f) < 20 {
		return 0, fmt.Errorf("start time of PID %d: malformed stat", pid)
	}
	start, err := strconv.ParseUint(f[19], 10, 64)
	if err != nil {
		return 0, fmt.Errorf("start time of PID %d: %w", pid, err)
	}
	return start, nil
}

// Process is a handle on a process that Open proved to be the one a
// ProcessID names.
type Process struct {
	PID int
	fd  int
}

// Open returns a handle on the process p names, or ErrGone if that process
// has exited.
func (p ProcessID) Open() (*Process, error) {
	if p.PID <= 0 {
		return nil, fmt.Errorf("PID %d: not a process", p.PID)
	}
	fd, err := unix.PidfdOpen(p.PID, 0)
	if errors.Is(err, unix.ESRCH) {
		return nil, ErrGone
	}
	if err != nil {
		return nil, fmt.Errorf("open PID %d: %w", p.PID, err)
	}
	start, err := startTime(p.PID)
	if err == nil && start != p.Start {
		err = ErrGone // the PID was reused before the pidfd was opened
	}
	if err == nil && exited(fd) {
		err = ErrGone // a zombie, or the stat above was of a newer process
	}
	if err != nil {
		unix.Close(fd)
		return nil, err
	}
	return &Process{PID: p.PID, fd: fd}, nil
}

// exited reports whether the pidfd's process has exited (a pidfd polls
// readable then).
func exited(fd int) bool {
	fds := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}
	n, err := unix.Poll(fds, 0)
	return err == nil && n > 0
}

// Alive reports whether the process is still running.
func (p *Process) Alive() bool { return !exited(p.fd) }

// Signal sends sig to the process, never to a later holder of its PID.
func (p *Process) Signal(sig unix.Signal) error {
	if err := unix.PidfdSendSignal(p.fd, sig, nil, 0); err != nil {
		if errors.Is(err, unix.ESRCH) {
			return ErrGone
		}
		return fmt.Errorf("signal PID %d: %w", p.PID, err)
	}
	return nil
}

// WaitExit waits up to timeout for the process to exit and reports
// whether it did.
func (p *Process) WaitExit(timeout time.Duration) bool {
	deadline := time.Now().Add(timeout)
	fds := []unix.PollFd{{Fd: int32(p.fd), Events: unix.POLLIN}}
	for {
		left := time.Until(deadline)
		if left < 0 {
			left = 0
		}
		n, err := unix.Poll(fds, int(left.Milliseconds()))
		if err == nil && n > 0 {
			return true
		}
		if (err != nil && !errors.Is(err, unix.EINTR)) || left == 0 {
			return false
		}
	}
}

// Close releases the handle.
func (p *Process) Close() error { return unix.Close(p.fd) }
