package test

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

func TestMapAuto(t *testing.T) {
	wd := newWorld(t)
	addSubIDs(t, "nobody", 400000, 65536)
	script := "cat /proc/self/uid_map /proc/self/gid_map; mount -t tmpfs none /mnt && touch /mnt/f && chown 1000:1000 /mnt/f && stat -c 'owner=%u:%g' /mnt/f"
	res := wd.mustRunGuest([]string{"--map-auto"}, "sh", "-c", script)
	for _, want := range []string{`(?m)^\s*0\s+65534\s+1$`, `(?m)^\s*1\s+400000\s+65536$`, `owner=1000:1000`} {
		if !regexp.MustCompile(want).MatchString(res.stdout) {
			t.Errorf("--map-auto: output lacks %s:\n%s", want, res)
		}
	}
	if n := strings.Count(res.stdout, "\n"); n < 5 {
		t.Errorf("want two ranges in each map:\n%s", res)
	}
	// --map-user puts the caller's own uid elsewhere; the namespace is
	// still set up and networked, the command runs as that uid.
	for _, flags := range [][]string{{"--map-auto", "--map-user=5", "--map-group=6"}, {"--map-user=1000", "--map-group=1000"}} {
		res = wd.runGuest(flags, "sh", "-c", "id -u; id -g; ip -4 addr show dev tap0")
		f := strings.Fields(res.stdout)
		want := flags[len(flags)-2][len("--map-user="):]
		if res.code != 0 || len(f) < 2 || f[0] != want || !strings.Contains(res.stdout, "10.0.2.100/24") {
			t.Errorf("%v: want uid %s and a configured tap0:\n%s", flags, want, res)
		}
	}
}

func TestMapAutoWithoutEntry(t *testing.T) {
	wd := newWorld(t)
	res := wd.runGuest([]string{"--map-auto"}, "true")
	if res.code != 125 || !strings.Contains(res.stderr, "usermod --add-subuids") {
		t.Errorf("want exit 125 and the usermod fix:\n%s", res)
	}
}

func TestPIDNamespace(t *testing.T) {
	wd := newWorld(t)
	script := "cat /proc/1/comm; echo self=$$; ls /proc | grep -c '^[0-9]'; hostname"
	res := wd.mustRunGuest([]string{"--pid", "--hostname", "box"}, "sh", "-c", script)
	lines := strings.Fields(res.stdout)
	if len(lines) < 4 || lines[0] != "netns-run-init" || lines[3] != "box" {
		t.Fatalf("--pid --hostname: %q", res.stdout)
	}
	self, _ := strconv.Atoi(strings.TrimPrefix(lines[1], "self="))
	procs, _ := strconv.Atoi(lines[2])
	if self < 2 || self > 20 || procs > 10 {
		t.Errorf("the namespace should hold only init and the command: self=%d, %d processes in /proc", self, procs)
	}
	for _, c := range []struct {
		script string
		want   int
	}{{"exit 7", 7}, {"kill -TERM $$", 143}} {
		if r := wd.runGuest([]string{"--pid"}, "sh", "-c", c.script); r.code != c.want {
			t.Errorf("--pid %q: exit %d, want %d\n%s", c.script, r.code, c.want, r)
		}
	}
}

func TestStdinPipe(t *testing.T) {
	wd := newWorld(t)
	for _, flags := range [][]string{nil, {"--pid"}} {
		cmd := wd.guestCommand(t.Context(), flags, "cat")
		cmd.Stdin = strings.NewReader("through the pipe\n")
		out, err := cmd.Output()
		if err != nil || string(out) != "through the pipe\n" {
			t.Errorf("%v: echo x | netns-run -- cat: %q, %v", flags, out, err)
		}
	}
}

// TestDetachJoinStop: a detached namespace with networking, a second
// command joining it (same user namespace, networking usable), stats from
// its state directory, and --stop.
func TestDetachJoinStop(t *testing.T) {
	wd := newWorld(t)
	wd.startServer(wd.r, "tcp-echo-server", remoteAddr+":7")
	state := filepath.Join(userDir(t, "netns-run-state-"), "ns")
	link := filepath.Join(filepath.Dir(state), "netns-link")
	t.Cleanup(func() { _, _ = stopDetached(state) })
	res := wd.runGuest([]string{"--detach", "--state-dir", state, "--hostname", "detached", "--netns", link}, "sleep", "600")
	if res.code != 0 {
		t.Fatalf("--detach: %s", res)
	}
	for _, f := range []string{"pid", "pid.start", "helper.pid", "helper.start", "netns", "api.sock"} {
		if _, err := os.Stat(filepath.Join(state, f)); err != nil {
			t.Errorf("state dir lacks %s: %v", f, err)
		}
	}
	if target, err := os.Readlink(link); err != nil || !strings.HasSuffix(target, "/ns/net") {
		t.Errorf("--netns link: %q, %v", target, err)
	}
	res = wd.runGuest([]string{"--join", state}, "sh", "-c", fmt.Sprintf("hostname; cat /proc/self/uid_map; ls -l /proc/$$/fd; %s tcp-echo-check %s:7 1048576; exit 5", bins.nettool, remoteAddr))
	if res.code != 5 || !strings.Contains(res.stdout, "detached") {
		t.Errorf("--join: want exit 5 inside the detached namespace:\n%s", res)
	}
	// The namespaces joined are not left open in the command.
	for _, ns := range []string{"user:[", "mnt:[", "uts:[", "net:[", "pid:["} {
		if strings.Contains(res.stdout, ns) {
			t.Errorf("--join: the command holds a %s] descriptor:\n%s", ns, res)
		}
	}
	checkEcho(t, res, 1<<20)
	cmd := wd.guestCommand(t.Context(), []string{"--join", state}, "cat")
	cmd.Stdin = strings.NewReader("piped\n")
	if out, err := cmd.Output(); err != nil || string(out) != "piped\n" {
		t.Errorf("echo piped | netns-run --join: %q, %v", out, err)
	}
	out, err := exec.Command("ip", "netns", "exec", wd.w, bins.netnsRun, "stats", state).CombinedOutput()
	if err != nil || !strings.Contains(string(out), "flows total tcp 1,") {
		t.Errorf("stats of the detached namespace: %v\n%s", err, out)
	}
	if out, err := stopDetached(state); err != nil {
		t.Fatalf("--stop: %v\n%s", err, out)
	}
	if _, err := os.Stat(filepath.Join(state, "pid")); !os.IsNotExist(err) {
		t.Errorf("state left after --stop: %v", err)
	}
	if _, err := os.Lstat(link); !os.IsNotExist(err) {
		t.Errorf("--netns link left after --stop: %v", err)
	}
	res = wd.runGuest([]string{"--join", state}, "true")
	if res.code != 125 || !strings.Contains(res.stderr, "no running namespace") {
		t.Errorf("--join after --stop: %s", res)
	}

	// --detach returns once the command runs: one that cannot be run
	// fails it, and leaves no state behind.
	for _, flags := range [][]string{nil, {"--pid"}} {
		res = wd.runGuest(append([]string{"--detach", "--state-dir", state}, flags...), "/nonexistent/command")
		if res.code != 125 || !strings.Contains(res.stderr, "exited before its command ran") {
			t.Errorf("--detach %v of a missing command: %s", flags, res)
		}
		if _, err := os.Stat(filepath.Join(state, "pid")); !os.IsNotExist(err) {
			t.Errorf("--detach %v of a missing command left its state: %v", flags, err)
		}
	}

	// A netns-run that is starting on the directory (it holds its lock
	// before it has written a record) keeps a second one out, which
	// touches nothing there.
	if err := os.MkdirAll(state, 0o700); err != nil {
		t.Fatal(err)
	}
	_ = os.Remove(filepath.Join(state, "log"))
	if err := os.Chown(state, unprivUID, unprivUID); err != nil {
		t.Fatal(err)
	}
	d, err := os.Open(state)
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	if err := unix.Flock(int(d.Fd()), unix.LOCK_EX); err != nil {
		t.Fatal(err)
	}
	res = wd.runGuest([]string{"--detach", "--state-dir", state}, "sleep", "600")
	if res.code != 125 || !strings.Contains(res.stderr, "another netns-run is starting or serving there") {
		t.Errorf("--detach on a locked state dir: %s", res)
	}
	if names, _ := os.ReadDir(state); len(names) != 0 {
		t.Errorf("--detach on a locked state dir left %v", names)
	}
}

func TestCopyUp(t *testing.T) {
	wd := newWorld(t)
	token := fmt.Sprintf("copyup-%d", os.Getpid())
	hostsBefore, err := os.ReadFile("/etc/hosts")
	if err != nil {
		t.Fatal(err)
	}
	script := fmt.Sprintf("echo %[1]s > /etc/%[1]s && cat /etc/%[1]s && echo '10.0.2.2 %[1]s' >> /etc/hosts && grep -c %[1]s /etc/hosts && head -1 /etc/resolv.conf && ls -d /etc/apt", token)
	res := wd.runGuest([]string{"--copy-up", "/etc"}, "sh", "-c", script)
	t.Cleanup(func() { os.Remove("/etc/" + token) })
	if res.code != 0 || !strings.Contains(res.stdout, token+"\n1\nnameserver 10.0.2.3\n/etc/apt") {
		t.Errorf("--copy-up /etc: writes inside, resolv.conf replaced, subdirectories kept:\n%s", res)
	}
	if _, err := os.Stat("/etc/" + token); !os.IsNotExist(err) {
		t.Errorf("the host's /etc changed: %v", err)
	}
	if after, _ := os.ReadFile("/etc/hosts"); string(after) != string(hostsBefore) {
		t.Errorf("the host's /etc/hosts changed")
	}
	// Without --copy-up, /etc stays read-only for the namespace's root.
	if res := wd.runGuest(nil, "sh", "-c", "echo x > /etc/"+token); res.code == 0 {
		t.Errorf("/etc writable without --copy-up:\n%s", res)
	}
}
