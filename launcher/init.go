package launcher

import (
	"errors"
	"fmt"
	"os"
	"os/signal"
	"strconv"
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/netns-run/netns-run/tap"
)

// runInit is PID 1 of a new PID namespace: it starts the command, forwards
// the signals it is sent, reaps every orphan that lands on it and exits
// with the command's status (128+N for a signal). A command that were PID
// 1 itself would ignore SIGTERM without a handler and leave zombies.
func runInit(args []string) int {
	// First: until it is called, a signal sent to init would end it
	// (the runtime's default, which as PID 1 it cannot die of, falls
	// back to exit 2) and the command with it.
	sigs := make(chan os.Signal, 16)
	signal.Notify(sigs, unix.SIGTERM, unix.SIGHUP, unix.SIGINT, unix.SIGQUIT, unix.SIGUSR1, unix.SIGUSR2, unix.SIGWINCH)
	stops := initStops()
	path, code := lookCommand(args[0])
	if code != 0 {
		return code
	}
	// "exe" (from /proc/self/exe) would tell ps users nothing. The main
	// thread's comm is the process name; this goroutine may run on
	// another thread, so name it through /proc: /proc/self/comm is the
	// main thread's, whatever PID namespace the mounted /proc counts in
	// (task/<getpid()> is not: getpid() is 1 here).
	_ = os.WriteFile("/proc/self/comm", []byte("netns-run-init"), 0)
	// No capabilities of the setup here: execInit dropped them before
	// this copy of the binary started, so the command inherits none.
	attr := &os.ProcAttr{Env: os.Environ(), Files: []*os.File{os.Stdin, os.Stdout, os.Stderr}, Sys: &syscall.SysProcAttr{}}
	if term := foregroundTerminal(); term != nil {
		// The command takes the terminal: keyboard signals reach it
		// alone, and what init is sent it passes on once.
		attr.Sys.Foreground, attr.Sys.Ctty = true, 0
	}
	proc, err := os.StartProcess(path, args, attr)
	if err != nil {
		fmt.Fprintf(os.Stderr, "netns-run: exec %s: %v\n", path, err)
		if errors.Is(err, unix.ENOENT) {
			return 127
		}
		return 126
	}
	if stops != nil {
		_ = stops.send(message{Kind: kindStarted})
	}
	go func() {
		for s := range sigs {
			_ = unix.Kill(proc.Pid, s.(unix.Signal))
		}
	}()
	for {
		var ws unix.WaitStatus
		pid, err := unix.Wait4(-1, &ws, unix.WUNTRACED, nil)
		if errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil {
			return 125
		}
		if pid != proc.Pid {
			continue // an orphan, reaped, or one that stopped
		}
		if ws.Stopped() {
			// Init, as PID 1, cannot stop with the command: the
			// parent, which the user's shell waits for, does.
			if stops != nil {
				_ = stops.send(message{Kind: kindStopped})
			}
			continue
		}
		if ws.Signaled() {
			return 128 + int(ws.Signal())
		}
		return ws.ExitStatus()
	}
}

// initStopsEnv names the descriptor of the parent's handshake socket, on
// which init says that the command runs, and when it stops.
const initStopsEnv = "_NETNS_RUN_INIT_STOPS"

// initStops takes the socket execInit left open (nil: none), as a channel
// whose descriptor the command does not inherit.
func initStops() *channel {
	v, ok := os.LookupEnv(initStopsEnv)
	os.Unsetenv(initStopsEnv)
	fd, err := strconv.Atoi(v)
	if !ok || err != nil || fd < 3 {
		return nil
	}
	conn, err := tap.UnixConn(os.NewFile(uintptr(fd), "init-stops"))
	if err != nil {
		return nil
	}
	return &channel{conn: conn}
}
