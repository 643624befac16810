package launcher

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"time"

	"golang.org/x/sys/unix"
)

// terminal is the controlling terminal on stdin when netns-run runs in its
// foreground process group.
type terminal struct {
	fd   int
	pgrp int
}

func foregroundTerminal() *terminal {
	fg, err := unix.IoctlGetInt(0, unix.TIOCGPGRP)
	if err != nil {
		return nil
	}
	if own := unix.Getpgrp(); fg == own {
		return &terminal{fd: 0, pgrp: own}
	}
	return nil
}

// giveTo makes pgrp the terminal's foreground process group. A background
// process calling tcsetpgrp gets SIGTTOU, so it is ignored for the call.
func (t *terminal) giveTo(pgrp int) {
	if t == nil {
		return
	}
	signal.Ignore(unix.SIGTTOU)
	defer signal.Reset(unix.SIGTTOU)
	_ = unix.IoctlSetPointerInt(t.fd, unix.TIOCSPGRP, pgrp)
}

// childProcess is the namespace child, later the command itself.
type childProcess struct {
	pid  int
	term *terminal
	// stops, with --pid, says the command stopped (Ctrl-Z): init, as
	// PID 1, cannot stop with it, so waiting for init shows nothing.
	stops <-chan struct{}
	// netns identifies the child's network namespace, recorded while the
	// child is alive, to find what it leaves behind.
	netns *unix.Stat_t
}

type waitResult struct {
	status unix.WaitStatus
	err    error
}

// supervise forwards signals to the command and follows it through job
// control stops until it exits; it returns the exit status to propagate.
// If the network fails first, it kills the command and returns that error.
func (c *childProcess) supervise(sigs <-chan os.Signal, netFailed <-chan error, log *slog.Logger) (int, error) {
	c.recordNetns()
	events := make(chan waitResult, 1)
	next := func() {
		go func() {
			var ws unix.WaitStatus
			for {
				_, err := unix.Wait4(c.pid, &ws, unix.WUNTRACED, nil)
				if errors.Is(err, unix.EINTR) {
					continue
				}
				events <- waitResult{ws, err}
				return
			}
		}()
	}
	next()
	var netErr error
	for {
		select {
		case err := <-netFailed:
			log.Debug("the network failed; killing the command", "err", err)
			netErr, netFailed = fmt.Errorf("the network stopped, so the command was killed: %w", err), nil
			_ = unix.Kill(c.pid, unix.SIGKILL)
		case _, ok := <-c.stops:
			if !ok {
				c.stops = nil
				continue
			}
			if c.term != nil {
				// The terminal names the command's group, as
				// our PID namespace numbers it.
				if fg, err := unix.IoctlGetInt(c.term.fd, unix.TIOCGPGRP); err == nil && fg != c.term.pgrp {
					c.suspendWith(fg)
				}
			}
		case s := <-sigs:
			log.Debug("forwarding signal", "signal", s)
			_ = unix.Kill(c.pid, s.(unix.Signal))
		case r := <-events:
			if r.err != nil {
				log.Warn("waiting for command", "err", r.err)
				return 125, netErr
			}
			switch ws := r.status; {
			case ws.Stopped():
				c.suspendWith(c.pid)
				next()
			case ws.Signaled():
				c.term.giveTo(c.termOwner())
				return 128 + int(ws.Signal()), netErr
			default:
				c.term.giveTo(c.termOwner())
				return ws.ExitStatus(), netErr
			}
		}
	}
}

func (c *childProcess) termOwner() int {
	if c.term == nil {
		return 0
	}
	return c.term.pgrp
}

// suspendWith mirrors a job-control stop of the command (Ctrl-Z) onto
// netns-run, so the user's shell sees its job stop; on SIGCONT the terminal
// and the continue go back to the command's process group, group.
func (c *childProcess) suspendWith(group int) {
	if c.term == nil {
		return
	}
	c.term.giveTo(c.term.pgrp)
	_ = unix.Kill(os.Getpid(), unix.SIGSTOP)
	// Running again: the shell continued us (fg or bg).
	if fg, err := unix.IoctlGetInt(c.term.fd, unix.TIOCGPGRP); err == nil && fg == c.term.pgrp {
		c.term.giveTo(group)
	}
	_ = unix.Kill(-group, unix.SIGCONT)
}

// commandStops passes on init's notes (--pid) that the command stopped,
// until conn ends; the channel closes then.
func commandStops(conn *net.UnixConn) <-chan struct{} {
	stops := make(chan struct{}, 1)
	go func() {
		defer close(stops)
		for {
			if _, _, err := (channel{conn: conn}).recv(kindStopped); err != nil {
				return
			}
			select {
			case stops <- struct{}{}:
			default:
			}
		}
	}()
	return stops
}

// awaitStarted waits for the word that the command runs (see handshake.go):
// the channel's end, or init's "started" under --pid. It returns why not,
// if the child said so; a command slow to start counts as started after
// handshakeTimeout.
func awaitStarted(ch channel, pid bool) error {
	_ = ch.conn.SetReadDeadline(time.Now().Add(handshakeTimeout))
	defer func() { _ = ch.conn.SetReadDeadline(time.Time{}) }()
	_, _, err := ch.recv(kindStarted)
	switch {
	case errors.Is(err, os.ErrDeadlineExceeded):
		return nil
	case !pid && errors.Is(err, errChannelClosed):
		return nil
	}
	return err
}

// killAndWait ends a child that never reached the command and reports its
// exit code (0 if it was killed).
func (c *childProcess) killAndWait() (int, error) {
	_ = unix.Kill(c.pid, unix.SIGKILL)
	var ws unix.WaitStatus
	for {
		_, err := unix.Wait4(c.pid, &ws, 0, nil)
		if errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil {
			return 0, err
		}
		c.term.giveTo(c.termOwner())
		if ws.Exited() {
			return ws.ExitStatus(), nil
		}
		return 0, nil
	}
}

func (c *childProcess) recordNetns() {
	var st unix.Stat_t
	if err := unix.Stat(filepath.Join("/proc", strconv.Itoa(c.pid), "ns", "net"), &st); err == nil {
		c.netns = &st
	}
}

// killLeftovers kills every process still in the command's network
// namespace (daemons it started in the background): without the helper
// their network is gone anyway, and nothing may outlive netns-run.
func (c *childProcess) killLeftovers(log *slog.Logger) {
	if c.netns == nil {
		return
	}
	for round := 0; round < 10; round++ {
		pids := c.pidsInNetns()
		if len(pids) == 0 {
			return
		}
		for _, pid := range pids {
			log.Debug("killing leftover process", "pid", pid)
			_ = unix.Kill(pid, unix.SIGKILL)
		}
		// SIGKILL is delivered asynchronously; give the victims a moment
		// to leave the namespace before looking again.
		time.Sleep(10 * time.Millisecond)
	}
	log.Warn("processes keep appearing in the namespace after the command exited")
}

func (c *childProcess) pidsInNetns() []int {
	entries, err := os.ReadDir("/proc")
	if err != nil {
		return nil
	}
	self := os.Getpid()
	var pids []int
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == self {
			continue
		}
		var st unix.Stat_t
		if unix.Stat(filepath.Join("/proc", e.Name(), "ns", "net"), &st) != nil {
			continue
		}
		if st.Dev == c.netns.Dev && st.Ino == c.netns.Ino {
			pids = append(pids, pid)
		}
	}
	return pids
}
