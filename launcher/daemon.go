package launcher

import (
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/netns-run/netns-run/launcher/safefs"
)

// daemonEnv marks a copy started by StartDaemon; its value is the
// descriptor of the pipe the copy reports on.
const daemonEnv = "_NETNS_RUN_DAEMON_FD"

// daemonReady is what a copy writes once it serves.
const daemonReady = "ready\n"

// daemonSetupTimeout bounds how long the foreground waits for the copy;
// setting up takes milliseconds unless something is badly wrong.
const daemonSetupTimeout = 60 * time.Second

// StartDaemon runs the program again with args as a background copy, the
// way a C daemon forks (Go cannot): the copy sets everything up, reports
// ready and keeps serving, while the caller, once the copy is ready, may
// exit. The copy is in a session of its own (setsid) and has /dev/null as
// stdin, stdout and stderr, so a caller reading our output (podman's and
// rootlesskit's CombinedOutput) sees its end when we exit. An error carries
// the copy's own message when it failed to set up.
func StartDaemon(args []string) error {
	r, w, err := os.Pipe()
	if err != nil {
		return fmt.Errorf("daemon: %w", err)
	}
	defer r.Close()
	null, err := os.OpenFile(os.DevNull, os.O_RDWR, 0)
	if err != nil {
		w.Close()
		return fmt.Errorf("daemon: %w", err)
	}
	defer null.Close()
	cmd := exec.Command("/proc/self/exe")
	cmd.Args = append([]string{os.Args[0]}, args...)
	cmd.Env = append(os.Environ(), daemonEnv+"=3")
	cmd.Stdin, cmd.Stdout, cmd.Stderr = null, null, null
	cmd.ExtraFiles = []*os.File{w}
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	err = cmd.Start()
	w.Close()
	if err != nil {
		return fmt.Errorf("daemon: start: %w", err)
	}
	_ = r.SetReadDeadline(time.Now().Add(daemonSetupTimeout))
	msg, rerr := io.ReadAll(io.LimitReader(r, 64<<10))
	if string(msg) == daemonReady {
		// Reaped by init (or a subreaper) from now on.
		_ = cmd.Process.Release()
		return nil
	}
	if rerr != nil {
		_ = cmd.Process.Kill()
	}
	werr := cmd.Wait()
	if len(msg) > 0 {
		return errors.New(strings.TrimSuffix(string(msg), "\n"))
	}
	return fmt.Errorf("daemon: exited before it was ready: %w", errors.Join(rerr, werr))
}

// DaemonReport is the copy's end of StartDaemon's pipe.
type DaemonReport struct{ f *os.File }

// DaemonCopy returns the report pipe when this process is a copy started by
// StartDaemon, and nil otherwise.
func DaemonCopy() *DaemonReport {
	v, ok := os.LookupEnv(daemonEnv)
	if !ok {
		return nil
	}
	os.Unsetenv(daemonEnv)
	fd, err := strconv.Atoi(v)
	if err != nil || fd < 3 {
		return nil
	}
	syscall.CloseOnExec(fd)
	return &DaemonReport{f: os.NewFile(uintptr(fd), "daemon-report")}
}

// Ready tells the foreground that we serve; it may exit now.
func (d *DaemonReport) Ready() error {
	defer d.f.Close()
	if _, err := io.WriteString(d.f, daemonReady); err != nil {
		return fmt.Errorf("daemon: report ready: %w", err)
	}
	return nil
}

// Fail hands err to the foreground, which prints it and exits 1.
func (d *DaemonReport) Fail(err error) {
	defer d.f.Close()
	_, _ = io.WriteString(d.f, err.Error()+"\n")
}

// WritePIDFile writes our PID and a newline to path (as pasta's --pid
// does), never through a symlink nor over another user's file.
func WritePIDFile(path string) error {
	f, err := safefs.CreateFile(path)
	if err != nil {
		return fmt.Errorf("PID file: %w", err)
	}
	_, err = fmt.Fprintf(f, "%d\n", os.Getpid())
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("PID file: %w", err)
	}
	return nil
}
