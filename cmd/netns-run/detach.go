package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/netns-run/netns-run/launcher"
	"github.com/netns-run/netns-run/launcher/safefs"
)

// A detached namespace is served by a daemon copy of netns-run started by
// --detach; its state directory (0700, the user's own: see safefs.OpenDir)
// holds:
//
//	pid, pid.start                the namespace's first process (PID in our
//	                              namespace) and its start time
//	helper.pid, helper.start      the daemon serving its network
//	netns                         the network namespace path, for tools that take one
//	api.sock                      the port-forwarding / stats API
//	log                           the daemon's stderr
//
// The start times make a stale PID harmless (see launcher.ProcessID):
// --stop and --join act only on the very processes that wrote the state.
const (
	daemonEnv = "_NETNS_RUN_DAEMON"
	// readyFD is where the daemon reports "ok" or an error to the
	// netns-run that started it.
	readyFD      = 3
	startTimeout = 30 * time.Second
	stopTimeout  = 10 * time.Second
)

// startDaemon starts the detached daemon and waits until its namespace is
// up; it is what the user's `netns-run --detach` does.
func startDaemon(path string, stderr io.Writer) int {
	dir, err := safefs.OpenDir(path, true)
	if err != nil {
		fmt.Fprintf(stderr, "netns-run: --state-dir %v\n", err)
		return exitSetupFailed
	}
	defer dir.Close()
	if p, err := openRecorded(dir, helperRecord); err == nil {
		p.Close()
		fmt.Fprintf(stderr, "netns-run: %s is in use by a running netns-run (PID %d); stop it with `netns-run --stop %s`\n", path, p.PID, path)
		return exitSetupFailed
	}
	// The daemon holds the directory's lock for its lifetime (one that is
	// starting has not written its records yet); a look at it here spares
	// that one's log.
	if err := dir.TryLock(); err != nil {
		fmt.Fprintf(stderr, "netns-run: --state-dir %v: another netns-run is starting or serving there\n", err)
		return exitSetupFailed
	}
	dir.Unlock()
	logf, err := dir.Create("log")
	if err != nil {
		fmt.Fprintf(stderr, "netns-run: --state-dir: %v\n", err)
		return exitSetupFailed
	}
	defer logf.Close()
	r, w, err := os.Pipe()
	if err != nil {
		fmt.Fprintf(stderr, "netns-run: %v\n", err)
		return exitSetupFailed
	}
	defer r.Close()
	cmd := exec.Command("/proc/self/exe", os.Args[1:]...)
	cmd.Args[0] = os.Args[0]
	cmd.Env = append(os.Environ(), daemonEnv+"=1")
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.ExtraFiles = []*os.File{w}
	// Its own session: no terminal, not killed with our process group.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	err = cmd.Start()
	w.Close()
	if err != nil {
		fmt.Fprintf(stderr, "netns-run: start daemon: %v\n", err)
		return exitSetupFailed
	}
	_ = cmd.Process.Release()
	_ = r.SetReadDeadline(time.Now().Add(startTimeout))
	msg, _ := io.ReadAll(r)
	if strings.TrimSpace(string(msg)) != "ok" {
		fmt.Fprintf(stderr, "netns-run: detached namespace did not start: %s (see %s)\n",
			strings.TrimSpace(string(msg)), filepath.Join(path, "log"))
		return exitSetupFailed
	}
	return 0
}

// daemonReady is the daemon's side: it reports to the starting netns-run.
type daemonReady struct{ f *os.File }

func newDaemonReady() *daemonReady {
	unix.CloseOnExec(readyFD)
	return &daemonReady{f: os.NewFile(readyFD, "ready")}
}

func (d *daemonReady) report(msg string) {
	if d == nil || d.f == nil {
		return
	}
	_, _ = io.WriteString(d.f, msg+"\n")
	d.f.Close()
	d.f = nil
}

// writeState records the running namespace in dir.
func writeState(dir *safefs.Dir, ns launcher.Namespace) error {
	helper, err := launcher.ProcessIDOf(os.Getpid())
	if err != nil {
		return fmt.Errorf("state dir: %w", err)
	}
	first, err := launcher.ProcessIDOf(ns.PID)
	if err != nil {
		return fmt.Errorf("state dir: %w", err)
	}
	files := []struct{ name, content string }{
		{firstRecord.pid, strconv.Itoa(first.PID)},
		{firstRecord.start, strconv.FormatUint(first.Start, 10)},
		{helperRecord.pid, strconv.Itoa(helper.PID)},
		{helperRecord.start, strconv.FormatUint(helper.Start, 10)},
		{"netns", ns.Target().NetNS},
	}
	for _, f := range files {
		if err := dir.WriteFile(f.name, []byte(f.content+"\n")); err != nil {
			return fmt.Errorf("state dir: %w", err)
		}
	}
	return nil
}

// stateFiles are what writeState leaves; the API socket is removed by its
// owner, or with the rest when the daemon died without cleaning up.
var stateFiles = []string{firstRecord.pid, firstRecord.start, helperRecord.pid, helperRecord.start, "netns"}

func removeState(dir *safefs.Dir, stale bool) {
	names := stateFiles
	if stale {
		names = append(names[:len(names):len(names)], "api.sock")
	}
	for _, name := range names {
		_ = dir.Remove(name)
	}
}

// record names the two files that identify a process in the state dir.
type record struct{ pid, start string }

var (
	firstRecord  = record{"pid", "pid.start"}
	helperRecord = record{"helper.pid", "helper.start"}
)

// recorded reads the identity of a process from dir.
func recorded(dir *safefs.Dir, r record) (launcher.ProcessID, error) {
	b, err := dir.ReadFile(r.pid)
	if err != nil {
		return launcher.ProcessID{}, err
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil || pid <= 0 {
		return launcher.ProcessID{}, fmt.Errorf("%s: not a PID", filepath.Join(dir.Path(), r.pid))
	}
	if b, err = dir.ReadFile(r.start); err != nil {
		return launcher.ProcessID{}, err
	}
	start, err := strconv.ParseUint(strings.TrimSpace(string(b)), 10, 64)
	if err != nil {
		return launcher.ProcessID{}, fmt.Errorf("%s: not a start time", filepath.Join(dir.Path(), r.start))
	}
	return launcher.ProcessID{PID: pid, Start: start}, nil
}

// openRecorded returns a handle on the recorded process if it still runs.
func openRecorded(dir *safefs.Dir, r record) (*launcher.Process, error) {
	id, err := recorded(dir, r)
	if err != nil {
		return nil, err
	}
	return id.Open()
}

// joinState runs args in the namespace recorded in path.
func joinState(path string, args []string, opts options, stderr io.Writer) int {
	dir, err := safefs.OpenDir(path, false)
	if err != nil {
		fmt.Fprintf(stderr, "netns-run: --join %v\n", err)
		return exitSetupFailed
	}
	id, err := recorded(dir, firstRecord)
	dir.Close()
	if err != nil {
		fmt.Fprintf(stderr, "netns-run: --join %s: no running namespace there (%v)\n", path, err)
		return exitSetupFailed
	}
	code, err := launcher.Join(context.Background(), id, args, newLoggerFor(opts, stderr))
	if errors.Is(err, launcher.ErrGone) {
		fmt.Fprintf(stderr, "netns-run: --join %s: no running namespace there (its first process, PID %d, has exited)\n", path, id.PID)
		return exitSetupFailed
	}
	if err != nil {
		fmt.Fprintf(stderr, "netns-run: %v\n", err)
		return exitSetupFailed
	}
	return code
}

// stopState ends the namespace recorded in path and waits for it.
func stopState(path string, stderr io.Writer) int {
	dir, err := safefs.OpenDir(path, false)
	if err != nil {
		fmt.Fprintf(stderr, "netns-run: --stop %v\n", err)
		return exitSetupFailed
	}
	defer dir.Close()
	p, err := openRecorded(dir, helperRecord)
	if errors.Is(err, launcher.ErrGone) {
		removeState(dir, true)
		fmt.Fprintf(stderr, "netns-run: --stop %s: the namespace is gone (the netns-run serving it exited); removed its stale state\n", path)
		return exitSetupFailed
	}
	if err != nil {
		fmt.Fprintf(stderr, "netns-run: --stop %s: no running namespace there (%v)\n", path, err)
		return exitSetupFailed
	}
	defer p.Close()
	if err := p.Signal(unix.SIGTERM); err != nil && !errors.Is(err, launcher.ErrGone) {
		fmt.Fprintf(stderr, "netns-run: --stop: %v\n", err)
		return exitSetupFailed
	}
	if !p.WaitExit(stopTimeout) {
		fmt.Fprintf(stderr, "netns-run: --stop: PID %d did not exit within %v\n", p.PID, stopTimeout)
		return exitSetupFailed
	}
	return 0
}
