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
)

// A detached namespace is served by a daemon copy of netns-run started by
// --detach; its state directory holds:
//
//	pid         the namespace's first process (PID in our namespace)
//	helper.pid  the daemon serving its network
//	netns       the network namespace path, for tools that take one
//	api.sock    the port-forwarding / stats API
//	log         the daemon's stderr
const (
	daemonEnv = "_NETNS_RUN_DAEMON"
	// readyFD is where the daemon reports "ok" or an error to the
	// netns-run that started it.
	readyFD      = 3
	startTimeout = 30 * time.Second
)

// startDaemon starts the detached daemon and waits until its namespace is
// up; it is what the user's `netns-run --detach` does.
func startDaemon(dir string, stderr io.Writer) int {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		fmt.Fprintf(stderr, "netns-run: --state-dir: %v\n", err)
		return exitSetupFailed
	}
	if pid, err := readPID(dir, "helper.pid"); err == nil && unix.Kill(pid, 0) == nil {
		fmt.Fprintf(stderr, "netns-run: %s is in use by a running netns-run (PID %d); stop it with `netns-run --stop %s`\n", dir, pid, dir)
		return exitSetupFailed
	}
	logf, err := os.OpenFile(filepath.Join(dir, "log"), os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		fmt.Fprintf(stderr, "netns-run: %v\n", err)
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
			strings.TrimSpace(string(msg)), filepath.Join(dir, "log"))
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
func writeState(dir string, ns launcher.Namespace) error {
	files := map[string]string{
		"pid":        strconv.Itoa(ns.PID),
		"helper.pid": strconv.Itoa(os.Getpid()),
		"netns":      ns.Target().NetNS,
	}
	for name, content := range files {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(content+"\n"), 0o600); err != nil {
			return fmt.Errorf("state dir: %w", err)
		}
	}
	return nil
}

func removeState(dir string) {
	for _, name := range []string{"pid", "helper.pid", "netns"} {
		_ = os.Remove(filepath.Join(dir, name))
	}
}

func readPID(dir, name string) (int, error) {
	b, err := os.ReadFile(filepath.Join(dir, name))
	if err != nil {
		return 0, err
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil || pid <= 0 {
		return 0, fmt.Errorf("%s: not a PID", filepath.Join(dir, name))
	}
	return pid, nil
}

// joinState runs args in the namespace recorded in dir.
func joinState(dir string, args []string, opts options, stderr io.Writer) int {
	pid, err := readPID(dir, "pid")
	if err != nil {
		fmt.Fprintf(stderr, "netns-run: --join %s: no running namespace there (%v)\n", dir, err)
		return exitSetupFailed
	}
	code, err := launcher.Join(context.Background(), pid, args, newLoggerFor(opts, stderr))
	if err != nil {
		fmt.Fprintf(stderr, "netns-run: %v\n", err)
		return exitSetupFailed
	}
	return code
}

// stopState ends the namespace recorded in dir and waits for it.
func stopState(dir string, stderr io.Writer) int {
	pid, err := readPID(dir, "helper.pid")
	if err != nil {
		fmt.Fprintf(stderr, "netns-run: --stop %s: no running namespace there (%v)\n", dir, err)
		return exitSetupFailed
	}
	if err := unix.Kill(pid, unix.SIGTERM); err != nil {
		if errors.Is(err, unix.ESRCH) {
			removeState(dir)
			return 0
		}
		fmt.Fprintf(stderr, "netns-run: --stop: %v\n", err)
		return exitSetupFailed
	}
	for i := 0; i < 500; i++ {
		if unix.Kill(pid, 0) != nil {
			return 0
		}
		time.Sleep(20 * time.Millisecond)
	}
	fmt.Fprintf(stderr, "netns-run: --stop: PID %d did not exit within 10s\n", pid)
	return exitSetupFailed
}
