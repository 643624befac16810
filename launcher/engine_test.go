package launcher

import (
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"
)

// TestEngineSandbox starts a copy of the test binary the way StartEngine
// starts the engine and checks, from inside, what the engine may do: see
// no file, hold no capability, exec nothing, see no other process.
func TestEngineSandbox(t *testing.T) {
	if IsEngine() {
		engineSandboxChild()
		return
	}
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	// A directory handed over by accident must not arrive.
	dir, err := os.Open("/")
	if err != nil {
		t.Fatal(err)
	}
	defer dir.Close()
	if _, err := unix.FcntlInt(dir.Fd(), unix.F_SETFD, 0); err != nil {
		t.Fatal(err)
	}
	p, err := startEngine([]string{os.Args[0], "-test.run=^TestEngineSandbox$"}, map[string]int{"x": 1}, []*os.File{w})
	w.Close()
	if errors.Is(err, unix.EPERM) || errors.Is(err, unix.EACCES) || errors.Is(err, unix.ENOSPC) {
		t.Skipf("cannot create user namespaces here: %v", err)
	}
	if err != nil {
		t.Fatal(err)
	}
	report, _ := io.ReadAll(r)
	if err := p.Stop(); err != nil {
		t.Errorf("engine copy: %v", err)
	}
	if got := strings.TrimSpace(string(report)); got != "ok" {
		t.Errorf("inside the engine sandbox:\n%s", got)
	}
}

// engineSandboxChild runs in the sandboxed copy and writes "ok" or what is
// wrong to its first file.
func engineSandboxChild() {
	var state map[string]int
	files, err := EngineSetup(&state)
	if len(files) != 1 {
		os.Exit(3)
	}
	out := files[0]
	var problems []string
	check := func(ok bool, format string, args ...any) {
		if !ok {
			problems = append(problems, fmt.Sprintf(format, args...))
		}
	}
	check(err == nil && state["x"] == 1, "setup: %v, state %v", err, state)
	entries, err := os.ReadDir("/")
	check(err == nil && len(entries) == 0, "root holds %v (%v)", entries, err)
	check(os.Getpid() == 1, "PID %d, want 1 (own PID namespace)", os.Getpid())
	check(os.Getppid() == 0, "parent PID %d is visible", os.Getppid())
	check(unix.Kill(-1, 0) == unix.ESRCH, "other processes can be signalled")
	for fd := 0; fd < 64; fd++ {
		var st unix.Stat_t
		if unix.Fstat(fd, &st) == nil && st.Mode&unix.S_IFMT == unix.S_IFDIR {
			check(false, "descriptor %d is a directory", fd)
		}
	}
	nnp, _ := unix.PrctlRetInt(unix.PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0)
	check(nnp == 1, "no_new_privs %d", nnp)
	dumpable, _ := unix.PrctlRetInt(unix.PR_GET_DUMPABLE, 0, 0, 0, 0)
	check(dumpable == 0, "dumpable %d", dumpable)
	hdr := unix.CapUserHeader{Version: unix.LINUX_CAPABILITY_VERSION_3}
	var data [2]unix.CapUserData
	check(unix.Capget(&hdr, &data[0]) == nil && data[0].Effective|data[0].Permitted|data[1].Effective|data[1].Permitted == 0,
		"capabilities left: %+v", data)
	if err := LoadSeccomp(false); err != nil {
		check(false, "seccomp: %v", err)
	}
	err = syscall.Exec("/bin/true", []string{"true"}, nil)
	check(errors.Is(err, unix.EPERM), "execve: %v, want EPERM", err)
	if len(problems) == 0 {
		problems = []string{"ok"}
	}
	fmt.Fprintln(out, strings.Join(problems, "\n"))
	os.Exit(0)
}
