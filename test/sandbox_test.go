package test

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
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
	// As the user in W: the sandboxed helper serves only callers it can
	// tell from the guest (see TestUsernetSandbox).
	if got := wd.userAPICall(sock, `{"execute":"list_hostfwd"}`); got != `{"entries":[]}` {
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

const engineMarker = "_NETNS_RUN_LAUNCHER_CHILD=engine"

// engineOf waits for the engine of netns-run process parent and returns its
// PID.
func engineOf(t *testing.T, parent int) int {
	t.Helper()
	for i := 0; ; i++ {
		for _, pid := range processesWithEnv(engineMarker) {
			if parentOf(pid) == parent {
				return pid
			}
		}
		if i == 500 {
			t.Fatalf("no network engine under netns-run PID %d", parent)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func parentOf(pid int) int {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0
	}
	// The command name may hold spaces; the fields after it do not.
	f := strings.Fields(string(b[strings.LastIndexByte(string(b), ')')+1:]))
	if len(f) < 2 {
		return 0
	}
	ppid, _ := strconv.Atoi(f[1])
	return ppid
}

// holdsTap reports whether process pid has the TAP device open.
func holdsTap(pid int) bool {
	dir := fmt.Sprintf("/proc/%d/fd", pid)
	entries, _ := os.ReadDir(dir)
	for _, e := range entries {
		if target, _ := os.Readlink(dir + "/" + e.Name()); target == tunDevice {
			return true
		}
	}
	return false
}

// TestEngineSandboxed: netns-run's packet engine runs in its own process
// with no_new_privs, the seccomp filter, no capability, nothing of the
// host's filesystem; it is the only process holding the TAP; the guest's
// root cannot trace it; the API still reports its footprint.
func TestEngineSandboxed(t *testing.T) {
	wd := newWorld(t)
	sock := filepath.Join(userDir(t, "engine-api-"), "api.sock")
	token := fmt.Sprintf("engine-%d-%d", os.Getpid(), time.Now().UnixNano())
	cmd := wd.startGuestSleep([]string{"--api-socket", sock, "--port-driver=netstack"}, token)
	eng := engineOf(t, cmd.Process.Pid)
	status, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", eng))
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"NoNewPrivs:\t1", "Seccomp:\t2", "CapPrm:\t0000000000000000", "CapEff:\t0000000000000000",
		"CapBnd:\t0000000000000000", "CapAmb:\t0000000000000000"} {
		if !strings.Contains(string(status), want) {
			t.Errorf("engine status lacks %q:\n%s", want, status)
		}
	}
	if entries, err := os.ReadDir(fmt.Sprintf("/proc/%d/root", eng)); err != nil || len(entries) != 0 {
		t.Errorf("engine's root holds %v (%v), want nothing", entries, err)
	}
	checkNoHostPaths(t, eng)
	if env, err := os.ReadFile(fmt.Sprintf("/proc/%d/environ", eng)); err != nil {
		t.Error(err)
	} else {
		for _, kv := range strings.Split(strings.TrimRight(string(env), "\x00"), "\x00") {
			if !strings.HasPrefix(kv, "_NETNS_RUN_") && !strings.HasPrefix(kv, "GO") {
				t.Errorf("the engine got the user's %q", kv)
			}
		}
	}
	if !holdsTap(eng) {
		t.Errorf("engine does not hold the TAP")
	}
	var guests []string
	for _, p := range processesWith(token) {
		if p != fmt.Sprint(cmd.Process.Pid) { // netns-run's own command line names it too
			guests = append(guests, p)
		}
	}
	for _, p := range append(guests, fmt.Sprint(cmd.Process.Pid)) {
		pid, _ := strconv.Atoi(p)
		if holdsTap(pid) {
			t.Errorf("process %d (not the engine) holds the TAP", pid)
		}
	}
	if len(guests) == 1 {
		out, err := exec.Command("setpriv", fmt.Sprintf("--reuid=%d", unprivUID), fmt.Sprintf("--regid=%d", unprivUID), "--clear-groups", "--",
			"nsenter", "-t", guests[0], "-U", "-n", "--preserve-credentials", "--", bins.nettool, "ptrace-probe", fmt.Sprint(eng)).CombinedOutput()
		if err != nil {
			t.Fatalf("ptrace-probe: %v\n%s", err, out)
		}
		t.Logf("as the guest's root: %s", out)
		for _, f := range strings.Fields(string(out)) {
			if strings.HasSuffix(f, "=ok") {
				t.Errorf("the guest's root succeeded at %s on the engine: %s", strings.TrimSuffix(f, "=ok"), out)
			}
		}
	} else {
		t.Errorf("guest command: want one process with %s, got %v", token, guests)
	}
	if p := helperStats(t, sock).Return.Process; p.FDs == 0 || p.RSSKiB == 0 {
		t.Errorf("get_stats does not report the engine's footprint: %+v", p)
	}
}

// TestEngineCrashEndsNetnsRun: an engine that dies (here: killed) ends
// netns-run with a clear error and takes the command along, instead of
// leaving it running without a network.
func TestEngineCrashEndsNetnsRun(t *testing.T) {
	wd := newWorld(t)
	token := fmt.Sprintf("engine-crash-%d-%d", os.Getpid(), time.Now().UnixNano())
	var stderr syncBuffer
	cmd := wd.startGuestSleepStderr(nil, token, &stderr)
	if err := syscall.Kill(engineOf(t, cmd.Process.Pid), syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	select {
	case err := <-done:
		var ee *exec.ExitError
		if !errors.As(err, &ee) || ee.ExitCode() != 125 || !strings.Contains(stderr.String(), "network engine") {
			t.Errorf("want exit 125 naming the network engine, got %v:\n%s", err, &stderr)
		}
	case <-time.After(20 * time.Second):
		t.Fatalf("netns-run still running 20s after its engine died:\n%s", &stderr)
	}
	waitGone(t, token)
}

// TestEngineDiesWithNetnsRun: netns-run killed outright takes its engine.
func TestEngineDiesWithNetnsRun(t *testing.T) {
	wd := newWorld(t)
	token := fmt.Sprintf("engine-orphan-%d-%d", os.Getpid(), time.Now().UnixNano())
	cmd := wd.startGuestSleep(nil, token)
	eng := engineOf(t, cmd.Process.Pid)
	if err := cmd.Process.Kill(); err != nil {
		t.Fatal(err)
	}
	for i := 0; ; i++ {
		if _, err := os.Stat(fmt.Sprintf("/proc/%d/status", eng)); os.IsNotExist(err) {
			break
		}
		if b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/status", eng)); strings.Contains(string(b), "State:\tZ") {
			break
		}
		if i == 200 {
			_ = syscall.Kill(eng, syscall.SIGKILL)
			t.Fatalf("engine %d outlived netns-run", eng)
		}
		time.Sleep(10 * time.Millisecond)
	}
	waitGone(t, token)
}

// TestNoSandbox: --no-sandbox runs the stack in netns-run's own process;
// outbound traffic and published ports work there too.
func TestNoSandbox(t *testing.T) {
	wd := newWorld(t)
	wd.startServer(wd.r, "tcp-echo-server", remoteAddr+":7")
	const size = 8 << 20
	checkEcho(t, wd.mustRunGuest([]string{"--no-sandbox"}, bins.nettool, "tcp-echo-check", remoteAddr+":7", fmt.Sprint(size)), size)
	wd.startPublishing("--no-sandbox", "--port-driver=netstack", "-p", "19001:9001", "-p", "19002:9002/udp")
	if pids := processesWithEnv(engineMarker); len(pids) != 0 {
		t.Errorf("--no-sandbox started an engine process: %v", pids)
	}
	checkEcho(t, result{stdout: wd.client(wd.w, "tcp-echo-check", "127.0.0.1:19001", fmt.Sprint(size))}, size)
	if got := wd.client(wd.w, "udp-echo-check", "127.0.0.1:19002", "50", "1400"); !strings.Contains(got, "datagrams=50") {
		t.Errorf("udp through --no-sandbox: %s", got)
	}
}
