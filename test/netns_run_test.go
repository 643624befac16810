package test

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

func TestGuestConfiguration(t *testing.T) {
	wd := newWorld(t)
	hostResolv, err := os.ReadFile("/etc/resolv.conf")
	if err != nil {
		t.Fatal(err)
	}
	script := "ip -4 addr show dev tap0; ip -4 route; ip link show dev tap0; cat /etc/resolv.conf; cat /proc/self/uid_map; id -u"
	res := wd.mustRunGuest(nil, "sh", "-c", script)
	for _, want := range []string{
		"inet 10.0.2.100/24",
		"default via 10.0.2.2 dev tap0",
		"mtu 65520",
		"nameserver 10.0.2.3",
	} {
		if !strings.Contains(res.stdout, want) {
			t.Errorf("guest view lacks %q:\n%s", want, res)
		}
	}
	if !regexp.MustCompile(fmt.Sprintf(`(?m)^\s*0\s+%d\s+1$`, unprivUID)).MatchString(res.stdout) {
		t.Errorf("uid map is not {0 -> %d, 1}:\n%s", unprivUID, res)
	}
	if !regexp.MustCompile(`(?m)^0$`).MatchString(res.stdout) {
		t.Errorf("command is not root inside its user namespace:\n%s", res)
	}
	res = wd.mustRunGuest([]string{"--mtu", "1500"}, "ip", "link", "show", "dev", "tap0")
	if !strings.Contains(res.stdout, "mtu 1500") {
		t.Errorf("--mtu 1500 not applied:\n%s", res)
	}
	after, err := os.ReadFile("/etc/resolv.conf")
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(hostResolv, after) {
		t.Errorf("host /etc/resolv.conf changed:\nbefore %q\nafter  %q", hostResolv, after)
	}
}

// checkSums requires nettool's echo line with equal hashes of what was sent
// and what came back.
var echoLine = regexp.MustCompile(`bytes=(\d+) sent_sha256=([0-9a-f]{64}) recv_sha256=([0-9a-f]{64})`)

func checkEcho(t *testing.T, res result, wantBytes int) {
	t.Helper()
	m := echoLine.FindStringSubmatch(res.stdout)
	if m == nil {
		t.Fatalf("no echo result:\n%s", res)
	}
	if m[1] != fmt.Sprint(wantBytes) || m[2] != m[3] {
		t.Fatalf("echo mismatch: %s", m[0])
	}
}

func TestTCPEchoThroughStack(t *testing.T) {
	wd := newWorld(t)
	wd.startServer(wd.r, "tcp-echo-server", remoteAddr+":7")
	const size = 64 << 20
	for _, mtu := range []string{"65520", "1500"} {
		t.Run("mtu"+mtu, func(t *testing.T) {
			res := wd.mustRunGuest([]string{"--mtu", mtu}, bins.nettool, "tcp-echo-check", remoteAddr+":7", fmt.Sprint(size))
			checkEcho(t, res, size)
			t.Logf("mtu %s: %s", mtu, strings.TrimSpace(res.stdout))
		})
	}
}

func TestUDPEchoThroughStack(t *testing.T) {
	wd := newWorld(t)
	// Bound to the exact address: replies must leave from it.
	wd.startServer(wd.r, "udp-echo-server", remoteAddr+":7")
	for _, size := range []string{"64", "1400", "8000"} {
		res := wd.mustRunGuest(nil, bins.nettool, "udp-echo-check", remoteAddr+":7", "200", size)
		if !strings.Contains(res.stdout, "datagrams=200 size="+size) {
			t.Errorf("size %s: %s", size, res)
		}
	}
}

const (
	testName   = "probe.netns-run.test"
	testNameIP = "198.51.100.77"
)

func TestDNSForwarderUsesHostResolvConf(t *testing.T) {
	wd := newWorld(t)
	wd.startServer(wd.r, "dns-server", routerAddr+":53", testName+"="+testNameIP)
	script := fmt.Sprintf("%[1]s dns-query 10.0.2.3:53 %[2]s udp && %[1]s dns-query 10.0.2.3:53 %[2]s tcp && %[1]s resolve %[2]s",
		bins.nettool, testName)
	res := wd.mustRunGuest(nil, "sh", "-c", script)
	if got := strings.Count(res.stdout, "A "+testNameIP); got != 2 {
		t.Errorf("want 2 answers (udp, tcp) with %s, got %d:\n%s", testNameIP, got, res)
	}
	if !strings.Contains(res.stdout, "addr "+testNameIP) {
		t.Errorf("resolver via the namespace's /etc/resolv.conf failed:\n%s", res)
	}
}

func TestDNSUpstreamFlag(t *testing.T) {
	wd := newWorld(t)
	// W's resolv.conf points at a host with no DNS server; only the flag
	// can make lookups work.
	wd.setResolver("203.0.113.99")
	wd.startServer(wd.r, "dns-server", remoteAddr+":5353", testName+"="+testNameIP)
	res := wd.mustRunGuest([]string{"--dns-upstream", remoteAddr + ":5353"},
		bins.nettool, "dns-query", "10.0.2.3:53", testName, "udp")
	if !strings.Contains(res.stdout, "A "+testNameIP) {
		t.Errorf("no answer through --dns-upstream:\n%s", res)
	}
	res = wd.runGuest([]string{"--dns-upstream", "not-an-address"}, "true")
	if res.code != 125 || !strings.Contains(res.stderr, "--dns-upstream") {
		t.Errorf("bad --dns-upstream: want exit 125 and a message naming the flag:\n%s", res)
	}
}

func TestGatewayReachesHostLoopback(t *testing.T) {
	wd := newWorld(t)
	wd.startServer(wd.w, "tcp-echo-server", "127.0.0.1:8080")
	const size = 4 << 20
	res := wd.mustRunGuest(nil, bins.nettool, "tcp-echo-check", "10.0.2.2:8080", fmt.Sprint(size))
	checkEcho(t, res, size)

	// Blocked like slirp4netns blocks it: ICMP network unreachable.
	res = wd.mustRunGuest([]string{"--disable-host-loopback"}, bins.nettool, "tcp-connect", "10.0.2.2:8080")
	if strings.TrimSpace(res.stdout) != "unreachable" {
		t.Errorf("--disable-host-loopback: want network unreachable, got:\n%s", res)
	}
	// A port nobody listens on is refused, not left hanging.
	res = wd.mustRunGuest(nil, bins.nettool, "tcp-connect", "10.0.2.2:8081")
	if strings.TrimSpace(res.stdout) != "refused" {
		t.Errorf("closed host port: want refused, got:\n%s", res)
	}
}

func TestExitStatus(t *testing.T) {
	wd := newWorld(t)
	cases := []struct {
		cmd  []string
		want int
	}{
		{[]string{"true"}, 0},
		{[]string{"sh", "-c", "exit 3"}, 3},
		{[]string{"sh", "-c", "kill -TERM $$"}, 128 + 15},
		{[]string{"/nonexistent/command"}, 127},
	}
	for _, flags := range [][]string{nil, {"--pid"}} {
		for _, c := range cases {
			if res := wd.runGuest(flags, c.cmd...); res.code != c.want {
				t.Errorf("%v %v: want exit %d\n%s", flags, c.cmd, c.want, res)
			}
		}
	}
}

// startGuestSleep runs `nettool sleep token` under netns-run FLAGS and
// returns once it is running. The returned command's PID is netns-run
// itself (`ip netns exec` and setpriv exec); it is killed and reaped at the
// end of the test if still there.
func (wd *world) startGuestSleep(flags []string, token string) *exec.Cmd {
	wd.t.Helper()
	return wd.startGuestSleepStderr(flags, token, nil)
}

// startGuestSleepStderr is startGuestSleep with netns-run's stderr going
// to stderr.
func (wd *world) startGuestSleepStderr(flags []string, token string, stderr io.Writer) *exec.Cmd {
	t := wd.t
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	t.Cleanup(cancel)
	cmd := wd.guestCommand(ctx, flags, bins.nettool, "sleep", token)
	cmd.Stderr = stderr
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = cmd.Process.Kill(); _ = cmd.Wait() })
	buf := make([]byte, 128)
	if _, err := stdout.Read(buf); err != nil {
		t.Fatalf("%v: command did not start: %v", flags, err)
	}
	return cmd
}

func TestSignalForwarding(t *testing.T) {
	wd := newWorld(t)
	token := fmt.Sprintf("sigfwd-%d-%d", os.Getpid(), time.Now().UnixNano())
	cmd := wd.startGuestSleep(nil, token)
	if err := cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	err := cmd.Wait()
	ee, ok := err.(*exec.ExitError)
	if !ok || ee.ExitCode() != 128+15 {
		t.Fatalf("want exit 143 after SIGTERM to netns-run, got %v", err)
	}
	waitGone(t, token)
}

// A netns-run killed outright (SIGKILL, the OOM killer) cannot forward
// anything; the command must not outlive it, with or without --pid.
func TestKilledNetnsRunTakesCommand(t *testing.T) {
	wd := newWorld(t)
	for _, flags := range [][]string{nil, {"--pid"}} {
		token := fmt.Sprintf("killed-%d-%d", os.Getpid(), time.Now().UnixNano())
		cmd := wd.startGuestSleep(flags, token)
		if err := cmd.Process.Kill(); err != nil {
			t.Fatal(err)
		}
		_ = cmd.Wait()
		waitGone(t, token)
	}
}

func TestNoProcessLeftBehind(t *testing.T) {
	wd := newWorld(t)
	token := fmt.Sprintf("leftover-%d-%d", os.Getpid(), time.Now().UnixNano())
	// The command exits at once but leaves a daemon running in the namespace.
	script := fmt.Sprintf("%s sleep %s >/dev/null 2>&1 & sleep 0.2; exit 0", bins.nettool, token)
	res := wd.runGuest(nil, "sh", "-c", script)
	if res.code != 0 {
		t.Fatalf("want exit 0:\n%s", res)
	}
	waitGone(t, token)
}

// waitGone fails unless no process mentioning token exists within a second.
func waitGone(t *testing.T, token string) {
	t.Helper()
	deadline := time.Now().Add(time.Second)
	for {
		pids := processesWith(token)
		if len(pids) == 0 {
			return
		}
		if time.Now().After(deadline) {
			for _, p := range pids {
				_ = exec.Command("kill", "-9", p).Run()
			}
			t.Fatalf("processes left behind: %v", pids)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func TestBadFlags(t *testing.T) {
	cases := []struct {
		args []string
		want string
	}{
		{[]string{"--mtu", "10", "--", "true"}, "--mtu 10"},
		{[]string{"--no-such-flag", "--", "true"}, "unknown flag"},
		{nil, "missing COMMAND"},
	}
	for _, c := range cases {
		out, err := exec.Command(bins.netnsRun, c.args...).CombinedOutput()
		ee, ok := err.(*exec.ExitError)
		if !ok || ee.ExitCode() != 125 {
			t.Errorf("%v: want exit 125, got %v\n%s", c.args, err, out)
		}
		if !strings.Contains(string(out), c.want) {
			t.Errorf("%v: message lacks %q:\n%s", c.args, c.want, out)
		}
	}
	out, err := exec.Command(bins.netnsRun, "--help").Output()
	if err != nil || !strings.Contains(string(out), "Usage: netns-run") {
		t.Errorf("--help: %v\n%s", err, out)
	}
}

func TestTunNotAccessibleNamesTheFix(t *testing.T) {
	wd := newWorld(t)
	// Hide the real device behind a root-only file in a private mount
	// namespace, which is what an unprivileged user meets on a 0600 system.
	fake := t.TempDir() + "/tun"
	if err := os.WriteFile(fake, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	script := fmt.Sprintf("mount --bind %s %s && exec ip netns exec %s setpriv --reuid=%d --regid=%d --clear-groups -- %s -- true",
		fake, tunDevice, wd.w, unprivUID, unprivUID, bins.netnsRun)
	out, err := exec.Command("unshare", "--mount", "--propagation", "private", "sh", "-c", script).CombinedOutput()
	ee, ok := err.(*exec.ExitError)
	if !ok || ee.ExitCode() != 125 {
		t.Fatalf("want exit 125, got %v\n%s", err, out)
	}
	for _, want := range []string{"/dev/net/tun", "0666", "chmod"} {
		if !strings.Contains(string(out), want) {
			t.Errorf("error lacks %q:\n%s", want, out)
		}
	}
}

// TestCommandOwnsTerminal runs netns-run on a pseudo-terminal (script(1))
// and checks the command is the terminal's foreground process group, so
// Ctrl-C and job control reach it rather than netns-run.
func TestCommandOwnsTerminal(t *testing.T) {
	wd := newWorld(t)
	if _, err := exec.LookPath("script"); err != nil {
		t.Skip("needs script(1) from bsdutils/util-linux")
	}
	inner := fmt.Sprintf("ip netns exec %s setpriv --reuid=%d --regid=%d --clear-groups -- %s -- sh -c 'cat /proc/self/stat'",
		wd.w, unprivUID, unprivUID, bins.netnsRun)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, "script", "-q", "-e", "-c", inner, "/dev/null")
	cmd.Stdin = strings.NewReader("")
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("script: %v\n%s", err, out)
	}
	// /proc/PID/stat: pid (comm) state ppid pgrp session tty_nr tpgid ...
	text := string(out)
	i := strings.LastIndex(text, ")")
	if i < 0 {
		t.Fatalf("no stat line in %q", text)
	}
	f := strings.Fields(text[i+1:])
	if len(f) < 6 {
		t.Fatalf("short stat line %q", text)
	}
	pgrp, tpgid := f[2], f[5]
	if pgrp != tpgid || tpgid == "-1" {
		t.Errorf("command's process group %s is not the terminal's foreground group %s", pgrp, tpgid)
	}
}

func TestIPv6ThroughStack(t *testing.T) {
	wd := newWorld(t)
	wd.startServer(wd.r, "tcp-echo-server", "["+remoteAddr6+"]:7")
	wd.startServer(wd.r, "udp-echo-server", "["+remoteAddr6+"]:7")
	wd.startServer(wd.r, "dns-server", routerAddr+":53", testName+"="+testNameIP)
	wd.startServer(wd.w, "tcp-echo-server", "[::1]:8080")

	res := wd.mustRunGuest(nil, "sh", "-c", "ip -6 addr show dev tap0; ip -6 route; cat /etc/resolv.conf")
	for _, want := range []string{"inet6 fd00::100/64", "default via fd00::2 dev tap0", "nameserver fd00::3"} {
		if !strings.Contains(res.stdout, want) {
			t.Errorf("guest view lacks %q:\n%s", want, res)
		}
	}
	if regexp.MustCompile(`fd00::100/64.*tentative`).MatchString(res.stdout) {
		t.Errorf("guest address waits for DAD:\n%s", res)
	}
	const size = 64 << 20
	res = wd.mustRunGuest(nil, bins.nettool, "tcp-echo-check", "["+remoteAddr6+"]:7", fmt.Sprint(size))
	checkEcho(t, res, size)
	res = wd.mustRunGuest(nil, bins.nettool, "udp-echo-check", "["+remoteAddr6+"]:7", "200", "1400")
	if !strings.Contains(res.stdout, "datagrams=200") {
		t.Errorf("udp over IPv6:\n%s", res)
	}
	for _, proto := range []string{"udp", "tcp"} {
		res = wd.mustRunGuest(nil, bins.nettool, "dns-query", "[fd00::3]:53", testName, proto)
		if !strings.Contains(res.stdout, "A "+testNameIP) {
			t.Errorf("dns over fd00::3 %s:\n%s", proto, res)
		}
	}
	checkEcho(t, wd.mustRunGuest(nil, bins.nettool, "tcp-echo-check", "[fd00::2]:8080", "1048576"), 1<<20)
	res = wd.mustRunGuest([]string{"--disable-host-loopback"}, bins.nettool, "tcp-connect", "[fd00::2]:8080")
	if strings.TrimSpace(res.stdout) != "unreachable" {
		t.Errorf("fd00::2 with --disable-host-loopback: %s", res)
	}
	res = wd.mustRunGuest([]string{"--disable-ipv6"}, "ip", "-6", "addr", "show", "dev", "tap0")
	if strings.Contains(res.stdout, "fd00::") {
		t.Errorf("--disable-ipv6 still configured IPv6:\n%s", res)
	}
	if _, err := exec.LookPath("ping"); err == nil {
		wd.sysctl(wd.w, "net.ipv4.ping_group_range", "0 2147483647")
		res = wd.runGuest(nil, "ping", "-6", "-c", "3", "-i", "0.05", "-W", "2", remoteAddr6)
		if !strings.Contains(res.stdout, "3 received") {
			t.Errorf("ping -6 through ping sockets:\n%s", res)
		}
	}
}

// TestLongEchoMTU1500 is the regression test for a stall: with gVisor's
// RACK loss detection on, a bulk echo at MTU 1500 stopped for good after
// about 130 MB, long after the 64 MiB echo above had passed.
func TestLongEchoMTU1500(t *testing.T) {
	wd := newWorld(t)
	wd.startServer(wd.r, "tcp-echo-server", remoteAddr+":7")
	const size = 1 << 30
	res := wd.mustRunGuest([]string{"--mtu", "1500"}, bins.nettool, "tcp-echo-check", remoteAddr+":7", fmt.Sprint(size))
	checkEcho(t, res, size)
	t.Logf("%s", strings.TrimSpace(res.stdout))
}

// TestCtrlZSuspendsNetnsRun stops the command on a pseudo-terminal, as
// Ctrl-Z does: netns-run stops with it, so the user's shell sees the job
// stopped, and once continued it continues the command, which then ends as
// usual. With --pid the command is init's child, and init, as PID 1,
// cannot stop: it tells netns-run.
func TestCtrlZSuspendsNetnsRun(t *testing.T) {
	wd := newWorld(t)
	if _, err := exec.LookPath("script"); err != nil {
		t.Skip("needs script(1) from bsdutils/util-linux")
	}
	for _, flags := range []string{"", "--pid"} {
		inner := fmt.Sprintf("ip netns exec %s setpriv --reuid=%d --regid=%d --clear-groups -- %s %s -- sh -c 'kill -TSTP $$; echo resumed'",
			wd.w, unprivUID, unprivUID, bins.netnsRun, flags)
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		cmd := exec.CommandContext(ctx, "script", "-q", "-e", "-c", inner, "/dev/null")
		cmd.Stdin = strings.NewReader("")
		var out syncBuffer
		cmd.Stdout, cmd.Stderr = &out, &out
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		// Whatever is left below script (a stopped command, its
		// netns-run) goes with the test, also on failure.
		t.Cleanup(func() {
			for _, pid := range descendants(cmd.Process.Pid) {
				_ = unix.Kill(pid, unix.SIGKILL)
			}
		})
		stopped := 0
		for deadline := time.Now().Add(20 * time.Second); stopped == 0 && time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
			stopped = stoppedProcess(bins.netnsRun)
		}
		if stopped == 0 {
			for _, pid := range descendants(cmd.Process.Pid) {
				_ = unix.Kill(pid, unix.SIGKILL)
			}
			cancel()
			_ = cmd.Wait()
			t.Errorf("%q: netns-run did not stop with its command:\n%s", flags, &out)
			continue
		}
		// As the user's shell does on fg: script(1) stopped with its
		// child, and continues it in turn.
		_ = cmd.Process.Signal(unix.SIGCONT)
		_ = unix.Kill(stopped, unix.SIGCONT)
		if err := cmd.Wait(); err != nil || !strings.Contains(out.String(), "resumed") {
			t.Errorf("%q: after the continue: %v\n%s", flags, err, &out)
		}
	}
}

// stoppedProcess returns a process of the binary exe in the stopped state,
// or 0.
func stoppedProcess(exe string) int {
	dirs, _ := filepath.Glob("/proc/[0-9]*")
	for _, d := range dirs {
		if target, _ := os.Readlink(d + "/exe"); target != exe {
			continue
		}
		stat, _ := os.ReadFile(d + "/stat")
		i := strings.LastIndex(string(stat), ")")
		if i >= 0 && strings.HasPrefix(string(stat[i+1:]), " T ") {
			pid, _ := strconv.Atoi(filepath.Base(d))
			return pid
		}
	}
	return 0
}
