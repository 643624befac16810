package test

import (
	"bytes"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

// Helpers that drive usernet the way runtimes do.

// sandboxProc is a process in fresh user and network namespaces, standing
// in for a container that a runtime hands to slirp4netns by PID.
type sandboxProc struct {
	pid int
}

// startSandbox starts `unshare --user --map-root-user --net` as the
// unprivileged user inside W, the way rootless runtimes do.
func (wd *world) startSandbox() *sandboxProc {
	wd.t.Helper()
	token := fmt.Sprintf("sandbox-%d-%d", os.Getpid(), worldSeq.Add(1))
	cmd := exec.Command("ip", "netns", "exec", wd.w,
		"setpriv", fmt.Sprintf("--reuid=%d", unprivUID), fmt.Sprintf("--regid=%d", unprivUID), "--clear-groups", "--",
		"unshare", "--user", "--map-root-user", "--net", bins.nettool, "sleep", token)
	cmd.Stdout, cmd.Stderr = io.Discard, io.Discard
	if err := cmd.Start(); err != nil {
		wd.t.Fatal(err)
	}
	wd.t.Cleanup(func() { _ = cmd.Process.Kill(); _ = cmd.Wait() })
	// unshare(2) happens after exec: wait until the process is in its new
	// namespaces, or nsenter would join ours.
	own, err := os.Readlink("/proc/self/ns/user")
	if err != nil {
		wd.t.Fatal(err)
	}
	for i := 0; ; i++ {
		ns, err := os.Readlink(fmt.Sprintf("/proc/%d/ns/net", cmd.Process.Pid))
		user, uerr := os.Readlink(fmt.Sprintf("/proc/%d/ns/user", cmd.Process.Pid))
		if err == nil && uerr == nil && user != own && ns != "" {
			break
		}
		if i == 1000 {
			wd.t.Fatalf("sandbox process never entered its namespaces")
		}
		time.Sleep(5 * time.Millisecond)
	}
	return &sandboxProc{pid: cmd.Process.Pid}
}

// inSandbox runs CMD inside the sandbox's namespaces as the unprivileged
// user (root inside) and returns its output; it fails the test on error.
func (wd *world) inSandbox(sb *sandboxProc, cmdline ...string) string {
	wd.t.Helper()
	out, err := wd.sandboxCommand(sb, cmdline...).CombinedOutput()
	if err != nil {
		wd.t.Fatalf("in sandbox: %v: %v\n%s", cmdline, err, out)
	}
	return string(out)
}

// startInSandbox runs a nettool server inside the sandbox in the
// background until the test ends, and returns once it listens.
func (wd *world) startInSandbox(sb *sandboxProc, cmdline ...string) {
	wd.t.Helper()
	cmd := wd.sandboxCommand(sb, cmdline...)
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		wd.t.Fatal(err)
	}
	var stderr syncBuffer
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		wd.t.Fatal(err)
	}
	wd.t.Cleanup(func() { _ = cmd.Process.Kill(); _ = cmd.Wait() })
	// A client started next must find it listening.
	if err := awaitListening(stdout); err != nil {
		wd.t.Fatalf("%v in the sandbox: %v\n%s", cmdline, err, stderr.String())
	}
}

func (wd *world) sandboxCommand(sb *sandboxProc, cmdline ...string) *exec.Cmd {
	args := []string{fmt.Sprintf("--reuid=%d", unprivUID), fmt.Sprintf("--regid=%d", unprivUID), "--clear-groups", "--",
		"nsenter", "-t", fmt.Sprint(sb.pid), "-U", "-n", "--preserve-credentials", "--"}
	return exec.Command("setpriv", append(args, cmdline...)...)
}

// usernetProc is a running usernet with the ready and exit pipes a runtime
// would hold.
type usernetProc struct {
	cmd            *exec.Cmd
	exitW          *os.File
	stdout, stderr syncBuffer
	done           chan error
}

// syncBuffer is a bytes.Buffer safe to read while exec's copier writes.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// waitFor polls until the buffer contains want (stdout arrives through a
// pipe and a copier goroutine, after the ready byte may have).
func (s *syncBuffer) waitFor(want string, d time.Duration) bool {
	deadline := time.Now().Add(d)
	for !strings.Contains(s.String(), want) {
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(10 * time.Millisecond)
	}
	return true
}

// startUsernet runs usernet ARGS... -r 3 -e 4 as the unprivileged user in W
// and waits for the ready byte.
func (wd *world) startUsernet(args ...string) *usernetProc {
	wd.t.Helper()
	return wd.startUsernetVia(nil, args...)
}

// startUsernetVia is startUsernet with usernet started through the command
// prefix (e.g. nsenter into a user namespace, as podman runs it), which
// must exec it in place so that its PID is usernet's.
func (wd *world) startUsernetVia(prefix []string, args ...string) *usernetProc {
	wd.t.Helper()
	readyR, readyW, err := os.Pipe()
	if err != nil {
		wd.t.Fatal(err)
	}
	defer readyR.Close()
	exitR, exitW, err := os.Pipe()
	if err != nil {
		wd.t.Fatal(err)
	}
	full := append([]string{"netns", "exec", wd.w,
		"setpriv", fmt.Sprintf("--reuid=%d", unprivUID), fmt.Sprintf("--regid=%d", unprivUID), "--clear-groups", "--"}, prefix...)
	// Above the descriptors usernet's own children get (3 and 4 closed):
	// those would hide a pipe that leaked into them.
	full = append(append(full, bins.usernet, "-r", "5", "-e", "6"), args...)
	u := &usernetProc{cmd: exec.Command("ip", full...), exitW: exitW, done: make(chan error, 1)}
	u.cmd.Stdout, u.cmd.Stderr = &u.stdout, &u.stderr
	u.cmd.ExtraFiles = []*os.File{nil, nil, readyW, exitR}
	err = u.cmd.Start()
	readyW.Close()
	exitR.Close()
	if err != nil {
		wd.t.Fatal(err)
	}
	go func() { u.done <- u.cmd.Wait() }()
	wd.t.Cleanup(func() {
		u.exitW.Close()
		select {
		case <-u.done:
		case <-time.After(5 * time.Second):
			_ = u.cmd.Process.Kill()
			<-u.done
		}
	})
	got := make(chan string, 1)
	go func() {
		b, _ := io.ReadAll(readyR)
		got <- string(b)
	}()
	select {
	case b := <-got:
		if b != "1" {
			// Wait for its output, and leave the status for the
			// clean-up, which waits for it too.
			err := <-u.done
			u.done <- err
			wd.t.Fatalf("ready fd gave %q, want \"1\"\nstdout:\n%s\nstderr:\n%s", b, &u.stdout, &u.stderr)
		}
	case <-time.After(20 * time.Second):
		wd.t.Fatalf("usernet not ready\nstdout:\n%s\nstderr:\n%s", &u.stdout, &u.stderr)
	}
	return u
}

// stop closes the exit fd and returns usernet's exit status.
func (u *usernetProc) stop(t *testing.T) int {
	t.Helper()
	u.exitW.Close()
	select {
	case err := <-u.done:
		u.done <- err
		if ee, ok := err.(*exec.ExitError); ok {
			return ee.ExitCode()
		}
		if err != nil {
			t.Fatal(err)
		}
		return 0
	case <-time.After(2 * time.Second):
		t.Fatalf("usernet did not exit within 2s of the exit fd hang-up")
	}
	return -1
}

func apiSocketPath(t *testing.T) string {
	return filepath.Join(userDir(t, "usernet-api-"), "api.sock")
}

// apiCall sends one request like podman does (write, half-close, read).
func apiCall(t *testing.T, sock, req string) string {
	t.Helper()
	reply, err := apiRequest(sock, req)
	if err != nil {
		t.Fatal(err)
	}
	return reply
}

// apiRequest is apiCall for goroutines other than the test's.
func apiRequest(sock, req string) (string, error) {
	c, err := net.DialUnix("unix", nil, &net.UnixAddr{Name: sock, Net: "unix"})
	if err != nil {
		return "", fmt.Errorf("api dial: %w", err)
	}
	defer c.Close()
	if _, err := c.Write([]byte(req)); err != nil {
		return "", err
	}
	_ = c.CloseWrite()
	_ = c.SetDeadline(time.Now().Add(10 * time.Second))
	b, err := io.ReadAll(c)
	return string(b), err
}

// addSubIDs gives user a subordinate id range for the test's duration.
func addSubIDs(t *testing.T, user string, start, count int) {
	t.Helper()
	line := fmt.Sprintf("%s:%d:%d\n", user, start, count)
	for _, path := range []string{"/etc/subuid", "/etc/subgid"} {
		old, err := os.ReadFile(path)
		if err != nil && !os.IsNotExist(err) {
			t.Fatal(err)
		}
		existed := err == nil
		if err := os.WriteFile(path, append(append([]byte(nil), old...), line...), 0o644); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() {
			if existed {
				_ = os.WriteFile(path, old, 0o644)
			} else {
				_ = os.Remove(path)
			}
		})
	}
}
