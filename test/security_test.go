package test

import (
	"bufio"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// Regression tests for the security review (issue 14, items 3-7): each
// runs netns-run or usernet as the unprivileged user, with a second uid as
// the attacker where one is needed.

// attackerUID is another unprivileged user, who prepares traps for the
// test user.
const attackerUID = 65533

// asUser prepares ARGS... as uid (in the machine's namespaces).
func asUser(uid int, args ...string) *exec.Cmd {
	full := append([]string{fmt.Sprintf("--reuid=%d", uid), fmt.Sprintf("--regid=%d", uid), "--clear-groups", "--"}, args...)
	return exec.Command("setpriv", full...)
}

// stopDetached stops the detached namespace in state as its owner.
func stopDetached(state string) ([]byte, error) {
	return asUser(unprivUID, bins.netnsRun, "--stop", state).CombinedOutput()
}

// sharedDir is a directory everyone may write (mode 0777, no sticky bit, so
// the kernel's protected_symlinks/protected_regular do not apply).
func sharedDir(t *testing.T) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "netns-run-shared-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	if err := os.Chmod(dir, 0o777); err != nil {
		t.Fatal(err)
	}
	return dir
}

// victimFile is a file of the test user's that traps point at.
func victimFile(t *testing.T) string {
	t.Helper()
	path := filepath.Join(userDir(t, "netns-run-victim-"), "precious")
	if err := os.WriteFile(path, []byte("precious\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Chown(path, unprivUID, unprivUID); err != nil {
		t.Fatal(err)
	}
	return path
}

func requireUnchanged(t *testing.T, path, want string) {
	t.Helper()
	if b, err := os.ReadFile(path); err != nil || string(b) != want {
		t.Errorf("%s changed: %q, %v", path, b, err)
	}
}

// killRecorded ends a daemon a test's old binary may have started in an
// attacker's directory (the fixed one refuses to).
func killRecorded(t *testing.T, state string) {
	t.Cleanup(func() {
		if b, err := os.ReadFile(filepath.Join(state, "helper.pid")); err == nil {
			if pid, err := strconv.Atoi(strings.TrimSpace(string(b))); err == nil {
				_ = syscall.Kill(pid, syscall.SIGKILL)
			}
		}
	})
}

// TestStateDirNotTrusted: a state directory another user prepared (with
// a symlink where the log goes), or one that others may write, is refused;
// the file the trap pointed at is untouched.
func TestStateDirNotTrusted(t *testing.T) {
	wd := newWorld(t)
	victim := victimFile(t)
	trap := filepath.Join(sharedDir(t), "state")
	if err := os.Mkdir(trap, 0o777); err != nil {
		t.Fatal(err)
	}
	_ = os.Chmod(trap, 0o777)
	if err := os.Symlink(victim, filepath.Join(trap, "log")); err != nil {
		t.Fatal(err)
	}
	for _, p := range []string{trap, filepath.Join(trap, "log")} {
		if err := os.Lchown(p, attackerUID, attackerUID); err != nil {
			t.Fatal(err)
		}
	}
	killRecorded(t, trap)
	res := wd.runGuest([]string{"--detach", "--state-dir", trap}, "sleep", "600")
	if res.code != 125 || !strings.Contains(res.stderr, fmt.Sprintf("owned by uid %d", attackerUID)) {
		t.Errorf("state dir of another user: want exit 125 naming its owner:\n%s", res)
	}
	requireUnchanged(t, victim, "precious\n")

	// The user's own, but writable by others.
	shared := filepath.Join(userDir(t, "netns-run-state-"), "ns")
	if err := os.Mkdir(shared, 0o777); err != nil {
		t.Fatal(err)
	}
	_ = os.Chmod(shared, 0o777)
	if err := os.Chown(shared, unprivUID, unprivUID); err != nil {
		t.Fatal(err)
	}
	killRecorded(t, shared)
	res = wd.runGuest([]string{"--detach", "--state-dir", shared}, "sleep", "600")
	if res.code != 125 || !strings.Contains(res.stderr, "chmod go-w") {
		t.Errorf("world-writable state dir: want exit 125 and the chmod fix:\n%s", res)
	}
	for _, flag := range []string{"--join", "--stop"} {
		out, err := asUser(unprivUID, bins.netnsRun, flag, trap, "--", "true").CombinedOutput()
		if ee, ok := err.(*exec.ExitError); !ok || ee.ExitCode() != 125 || !strings.Contains(string(out), "owned by uid") {
			t.Errorf("%s into another user's state dir: %v\n%s", flag, err, out)
		}
	}
}

// TestPcapNoTraps: --pcap never follows a symlink and never truncates a
// file of someone else's (netns-run and usernet).
func TestPcapNoTraps(t *testing.T) {
	wd := newWorld(t)
	victim := victimFile(t)
	dir := sharedDir(t)
	link := filepath.Join(dir, "link.pcap")
	if err := os.Symlink(victim, link); err != nil {
		t.Fatal(err)
	}
	theirs := filepath.Join(dir, "theirs.pcap")
	if err := os.WriteFile(theirs, []byte("theirs\n"), 0o666); err != nil {
		t.Fatal(err)
	}
	_ = os.Chmod(theirs, 0o666)
	for _, p := range []string{link, theirs} {
		if err := os.Lchown(p, attackerUID, attackerUID); err != nil {
			t.Fatal(err)
		}
	}
	for _, c := range []struct{ path, want string }{{link, "symlink"}, {theirs, fmt.Sprintf("belongs to uid %d", attackerUID)}} {
		res := wd.runGuest([]string{"--pcap", c.path}, "true")
		if res.code != 125 || !strings.Contains(res.stderr, c.want) {
			t.Errorf("netns-run --pcap %s: want exit 125 and %q:\n%s", c.path, c.want, res)
		}
		sb := wd.startSandbox()
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		cmd := exec.CommandContext(ctx, "ip", "netns", "exec", wd.w, "setpriv", fmt.Sprintf("--reuid=%d", unprivUID), fmt.Sprintf("--regid=%d", unprivUID),
			"--clear-groups", "--", bins.usernet, "--pcap", c.path, fmt.Sprint(sb.pid), "tap0")
		out, err := cmd.CombinedOutput()
		cancel()
		if ee, ok := err.(*exec.ExitError); !ok || ee.ExitCode() != 1 || !strings.Contains(string(out), c.want) {
			t.Errorf("usernet --pcap %s: want exit 1 and %q: %v\n%s", c.path, c.want, err, out)
		}
	}
	requireUnchanged(t, victim, "precious\n")
	requireUnchanged(t, theirs, "theirs\n")
}

// TestStopStalePID: the daemon died without cleaning up and its PID now
// belongs to another process of the user; --stop must not signal it, and
// must say the namespace is gone.
func TestStopStalePID(t *testing.T) {
	wd := newWorld(t)
	state := filepath.Join(userDir(t, "netns-run-state-"), "ns")
	t.Cleanup(func() { _, _ = stopDetached(state) })
	if res := wd.runGuest([]string{"--detach", "--state-dir", state}, "sleep", "600"); res.code != 0 {
		t.Fatalf("--detach: %s", res)
	}
	b, err := os.ReadFile(filepath.Join(state, "helper.pid"))
	if err != nil {
		t.Fatal(err)
	}
	daemon, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil {
		t.Fatal(err)
	}
	if err := syscall.Kill(daemon, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	for i := 0; syscall.Kill(daemon, 0) == nil; i++ {
		if i == 500 {
			t.Fatal("the killed daemon did not go away")
		}
		time.Sleep(10 * time.Millisecond)
	}
	// The PID taken over: an unrelated process of the same user.
	token := fmt.Sprintf("stranger-%d-%d", os.Getpid(), time.Now().UnixNano())
	stranger := asUser(unprivUID, bins.nettool, "sleep", token)
	stdout, err := stranger.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := stranger.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan struct{})
	go func() { _ = stranger.Wait(); close(exited) }()
	t.Cleanup(func() { _ = stranger.Process.Kill(); <-exited })
	if _, err := bufio.NewReader(stdout).ReadString('\n'); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(state, "helper.pid"), []byte(fmt.Sprintf("%d\n", stranger.Process.Pid)), 0o600); err != nil {
		t.Fatal(err)
	}
	out, err := stopDetached(state)
	if ee, ok := err.(*exec.ExitError); !ok || ee.ExitCode() != 125 || !strings.Contains(string(out), "the namespace is gone") {
		t.Errorf("--stop with a stale PID: want exit 125 and \"the namespace is gone\": %v\n%s", err, out)
	}
	select {
	case <-exited:
		t.Errorf("--stop signalled the process that took over the daemon's PID")
	case <-time.After(200 * time.Millisecond):
	}
	if _, err := os.Stat(filepath.Join(state, "helper.pid")); !os.IsNotExist(err) {
		t.Errorf("stale state left: %v", err)
	}
}

// TestDetachedCommandEnvironment: the daemon's marker does not reach the
// detached command (a nested --detach would take itself for the daemon).
func TestDetachedCommandEnvironment(t *testing.T) {
	wd := newWorld(t)
	state := filepath.Join(userDir(t, "netns-run-state-"), "ns")
	t.Cleanup(func() { _, _ = stopDetached(state) })
	res := wd.runGuest([]string{"--detach", "--state-dir", state}, "sh", "-c", `echo "daemon=${_NETNS_RUN_DAEMON-unset}"; exec sleep 600`)
	if res.code != 0 {
		t.Fatalf("--detach: %s", res)
	}
	for i := 0; ; i++ {
		b, _ := os.ReadFile(filepath.Join(state, "log"))
		if m := regexp.MustCompile(`daemon=(\S*)`).FindSubmatch(b); m != nil {
			if string(m[1]) != "unset" {
				t.Errorf("the detached command sees _NETNS_RUN_DAEMON=%s", m[1])
			}
			break
		}
		if i == 200 {
			t.Fatalf("the detached command did not run:\n%s", b)
		}
		time.Sleep(20 * time.Millisecond)
	}
	if st, err := os.Stat(state); err != nil || st.Mode().Perm() != 0o700 {
		t.Errorf("state dir: %v, %v; want mode 0700", st.Mode(), err)
	}
}

// capLines returns the Cap* lines of a /proc/PID/status dump.
var capLine = regexp.MustCompile(`(?m)^(CapInh|CapPrm|CapEff|CapAmb):\s+([0-9a-f]+)$`)

// TestMapUserDropsCapabilities: with --map-user the command (and with
// --pid its init) holds no capability in any set; root inside keeps root's.
func TestMapUserDropsCapabilities(t *testing.T) {
	wd := newWorld(t)
	for _, flags := range [][]string{{"--map-user=1000", "--map-group=1000"}, {"--pid", "--map-user=1000", "--map-group=1000"}} {
		script := "cat /proc/self/status; echo ==init==; cat /proc/1/status"
		res := wd.mustRunGuest(flags, "sh", "-c", script)
		self, init, _ := strings.Cut(res.stdout, "==init==")
		dumps := map[string]string{"command": self}
		if flags[0] == "--pid" {
			dumps["init"] = init
		}
		for who, dump := range dumps {
			m := capLine.FindAllStringSubmatch(dump, -1)
			if len(m) != 4 {
				t.Fatalf("%v: %s: no capability lines:\n%s", flags, who, dump)
			}
			for _, l := range m {
				if strings.Trim(l[2], "0") != "" {
					t.Errorf("%v: %s has %s %s, want none", flags, who, l[1], l[2])
				}
			}
		}
	}
	res := wd.mustRunGuest(nil, "grep", "^CapEff", "/proc/self/status")
	if strings.Trim(strings.TrimPrefix(strings.TrimSpace(res.stdout), "CapEff:"), "\t 0") == "" {
		t.Errorf("root inside lost its capabilities: %s", res.stdout)
	}
}

// TestNetnsLinkRemovesOnlyItsOwn: --netns PATH refuses a path that is
// taken, leaving it alone, and at exit removes its link only if PATH still
// is that link.
func TestNetnsLinkRemovesOnlyItsOwn(t *testing.T) {
	wd := newWorld(t)
	dir := userDir(t, "netns-run-link-")
	path := filepath.Join(dir, "netns")
	if err := os.WriteFile(path, []byte("someone's\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	res := wd.runGuest([]string{"--netns", path}, "true")
	if res.code != 125 || !strings.Contains(res.stderr, "already exists") {
		t.Errorf("--netns onto an existing file: want exit 125:\n%s", res)
	}
	requireUnchanged(t, path, "someone's\n")
	os.Remove(path)
	// Replaced while running (the guest shares the filesystem).
	wd.mustRunGuest([]string{"--netns", path}, "sh", "-c", fmt.Sprintf("rm %[1]s && echo mine > %[1]s", path))
	requireUnchanged(t, path, "mine\n")
}

// TestJoinPIDNamespace: --join into a namespace started with --pid runs
// the command there, inside its PID namespace too.
func TestJoinPIDNamespace(t *testing.T) {
	wd := newWorld(t)
	state := filepath.Join(userDir(t, "netns-run-state-"), "ns")
	t.Cleanup(func() { _, _ = stopDetached(state) })
	if res := wd.runGuest([]string{"--detach", "--state-dir", state, "--pid", "--hostname", "pidbox"}, "sleep", "600"); res.code != 0 {
		t.Fatalf("--detach --pid: %s", res)
	}
	res := wd.runGuest([]string{"--join", state}, "sh", "-c", "hostname; cat /proc/1/comm; echo self=$$; ip -4 addr show dev tap0; exit 4")
	f := strings.Fields(res.stdout)
	if res.code != 4 || len(f) < 3 || f[0] != "pidbox" || f[1] != "netns-run-init" || !strings.Contains(res.stdout, "10.0.2.100/24") {
		t.Fatalf("--join a --pid namespace: want its hostname, init and network, exit 4:\n%s", res)
	}
	if self, _ := strconv.Atoi(strings.TrimPrefix(f[2], "self=")); self < 2 || self > 100 {
		t.Errorf("joined command is not in the namespace's PID namespace: %s", f[2])
	}
	if out, err := stopDetached(state); err != nil {
		t.Errorf("--stop: %v\n%s", err, out)
	}
}

// TestCopyUpKeepsModeBits: the tmpfs over a copied-up directory has the
// original's sticky and setgid bits.
func TestCopyUpKeepsModeBits(t *testing.T) {
	wd := newWorld(t)
	for _, mode := range []os.FileMode{0o777 | os.ModeSticky, 0o775 | os.ModeSetgid} {
		dir, err := os.MkdirTemp("", "netns-run-copyup-")
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { os.RemoveAll(dir) })
		if err := os.Chmod(dir, mode); err != nil {
			t.Fatal(err)
		}
		res := wd.mustRunGuest([]string{"--copy-up", dir}, "stat", "-c", "%a", dir)
		want := map[os.FileMode]string{0o777 | os.ModeSticky: "1777", 0o775 | os.ModeSetgid: "2775"}[mode]
		if strings.TrimSpace(res.stdout) != want {
			t.Errorf("--copy-up of a %s directory: mode %s inside, want %s", want, strings.TrimSpace(res.stdout), want)
		}
	}
}

// TestResolvConfStaging: the staged resolv.conf is mounted and nothing is
// left in TMPDIR.
func TestResolvConfStaging(t *testing.T) {
	wd := newWorld(t)
	tmp := userDir(t, "netns-run-tmpdir-")
	cmd := wd.guestCommand(context.Background(), nil, "cat", "/etc/resolv.conf")
	cmd.Env = append(os.Environ(), "TMPDIR="+tmp)
	res := wd.run(cmd)
	if res.code != 0 || !strings.HasPrefix(res.stdout, "nameserver 10.0.2.3\n") {
		t.Errorf("resolv.conf inside: %s", res)
	}
	if left, _ := os.ReadDir(tmp); len(left) != 0 {
		t.Errorf("left in TMPDIR: %v", left)
	}
}
