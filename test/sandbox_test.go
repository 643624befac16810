package test

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"
)

// TestUsernetSandboxNotTraceable: root in the container's user namespace,
// which the sandboxed helper joined, can neither ptrace the helper nor read
// its memory.
func TestUsernetSandboxNotTraceable(t *testing.T) {
	if os.Getenv("USERNET_UNDER_TEST") != "" {
		t.Skip("our sandbox, not slirp4netns's")
	}
	wd := newWorld(t)
	sb := wd.startSandbox()
	u := wd.startUsernet("-c", "--enable-sandbox", "--enable-seccomp", fmt.Sprint(sb.pid), "tap0")
	out := wd.inSandbox(sb, bins.nettool, "ptrace-probe", fmt.Sprint(u.cmd.Process.Pid))
	t.Logf("as the namespace's root: %s", out)
	for _, f := range strings.Fields(out) {
		if strings.HasSuffix(f, "=ok") {
			t.Errorf("the container's root succeeded at %s on the sandboxed helper: %s", strings.TrimSuffix(f, "=ok"), out)
		}
	}
	status, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", u.cmd.Process.Pid))
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(status), "NoNewPrivs:\t1") {
		t.Errorf("helper status lacks NoNewPrivs:\n%s", status)
	}
}

// checkNoHostPaths fails if process pid holds a descriptor that could name
// the host's filesystem from inside its sandbox: a directory, or any O_PATH
// handle (openat(fd, "../..") walks out of a pivot_root).
func checkNoHostPaths(t *testing.T, pid int) {
	t.Helper()
	dir := fmt.Sprintf("/proc/%d/fd", pid)
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range entries {
		target, _ := os.Readlink(dir + "/" + e.Name())
		if st, err := os.Stat(dir + "/" + e.Name()); err == nil && st.IsDir() {
			t.Errorf("descriptor %s is the directory %s", e.Name(), target)
		}
		info, err := os.ReadFile(fmt.Sprintf("/proc/%d/fdinfo/%s", pid, e.Name()))
		if err != nil {
			continue // closed meanwhile
		}
		for _, line := range strings.Split(string(info), "\n") {
			var flags uint64
			if _, err := fmt.Sscanf(line, "flags:\t%o", &flags); err == nil && flags&0o10000000 != 0 {
				t.Errorf("descriptor %s is an O_PATH handle on %s", e.Name(), target)
			}
		}
	}
}

// TestUsernetSandboxHoldsNoHostPath: nothing that names the host's
// filesystem crosses into the sandbox; the API socket is still removed at
// exit, by a process outside, even when the helper is killed.
func TestUsernetSandboxHoldsNoHostPath(t *testing.T) {
	if os.Getenv("USERNET_UNDER_TEST") != "" {
		t.Skip("our sandbox, not slirp4netns's")
	}
	wd := newWorld(t)
	sb := wd.startSandbox()
	sock := apiSocketPath(t)
	u := wd.startUsernet("-c", "--enable-sandbox", "--enable-seccomp", "-a", sock, fmt.Sprint(sb.pid), "tap0")
	checkNoHostPaths(t, u.cmd.Process.Pid)
	if got := apiCall(t, sock, `{"execute":"list_hostfwd"}`); got != `{"entries":[]}` {
		t.Errorf("api in sandbox: %s", got)
	}
	if err := u.cmd.Process.Kill(); err != nil {
		t.Fatal(err)
	}
	for i := 0; ; i++ {
		if _, err := os.Lstat(sock); os.IsNotExist(err) {
			break
		}
		if i == 200 {
			t.Fatalf("api socket left behind by the killed sandboxed helper")
		}
		time.Sleep(10 * time.Millisecond)
	}
	// The remover is gone too.
	for i := 0; len(processesWithEnv("_NETNS_RUN_REMOVER_FILE=")) > 0; i++ {
		if i == 200 {
			t.Fatalf("socket remover still running: %v", processesWithEnv("_NETNS_RUN_REMOVER_FILE="))
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// processesWithEnv lists the processes whose environment has an entry
// starting with prefix.
func processesWithEnv(prefix string) []int {
	entries, _ := os.ReadDir("/proc")
	var pids []int
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		b, _ := os.ReadFile("/proc/" + e.Name() + "/environ")
		for _, kv := range strings.Split(string(b), "\x00") {
			if strings.HasPrefix(kv, prefix) {
				pids = append(pids, pid)
				break
			}
		}
	}
	return pids
}

// TestAPISocketPathNotOurs: both binaries refuse to start on an
// --api-socket path that holds a regular file, and leave it alone.
func TestAPISocketPathNotOurs(t *testing.T) {
	wd := newWorld(t)
	path := filepath.Join(userDir(t, "api-not-ours-"), "api.sock")
	if err := os.WriteFile(path, []byte("precious"), 0o644); err != nil {
		t.Fatal(err)
	}
	intact := func(who string) {
		if b, err := os.ReadFile(path); err != nil || string(b) != "precious" {
			t.Errorf("%s touched the file at its --api-socket path: %q, %v", who, b, err)
		}
	}
	res := wd.runGuest([]string{"--api-socket", path}, "true")
	if res.code != 125 || !strings.Contains(res.stderr, "not a socket") {
		t.Errorf("netns-run on a regular file: want 125 naming it:\n%s", res)
	}
	intact("netns-run")
	if os.Getenv("USERNET_UNDER_TEST") != "" {
		return // slirp4netns replaces whatever is there
	}
	sb := wd.startSandbox()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	out, err := exec.CommandContext(ctx, "ip", "netns", "exec", wd.w,
		"setpriv", fmt.Sprintf("--reuid=%d", unprivUID), fmt.Sprintf("--regid=%d", unprivUID), "--clear-groups", "--",
		bins.usernet, "-a", path, fmt.Sprint(sb.pid), "tap0").CombinedOutput()
	if err == nil || !strings.Contains(string(out), "not a socket") {
		t.Errorf("usernet on a regular file: want a failure naming it: %v\n%s", err, out)
	}
	intact("usernet")
}
