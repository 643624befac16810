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

// Tests of usernet's pasta mode: the runtimes' exact command lines, and the
// process contract they rely on (exit 0 once ready, our pipes closed,
// addresses in place, PID file, exit on SIGTERM and on the namespace's
// removal).

// startEnded starts cmd and returns the channel its end is reported on (a
// reader that takes the value puts it back). At cleanup it gets SIGTERM,
// and SIGKILL ten seconds later.
func startEnded(t *testing.T, cmd *exec.Cmd) chan error {
	t.Helper()
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	t.Cleanup(func() {
		_ = cmd.Process.Signal(syscall.SIGTERM)
		select {
		case err := <-exited:
			exited <- err
		case <-time.After(10 * time.Second):
			_ = cmd.Process.Kill()
		}
	})
	return exited
}

// pastaLink returns a link named pasta to usernet, in a directory the
// unprivileged user can read.
func pastaLink(t *testing.T) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "pasta-link-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	link := filepath.Join(dir, "pasta")
	if err := os.Symlink(bins.usernet, link); err != nil {
		t.Fatal(err)
	}
	return link
}

// containerNetns makes a network namespace bound at /run/netns/NAME, as
// podman keeps one per container, and returns its path. The cleanup
// removes it if the test did not.
func (wd *world) containerNetns() string {
	wd.t.Helper()
	name := fmt.Sprintf("%s-c%d", wd.w, worldSeq.Add(1))
	wd.ip("netns", "add", name)
	wd.t.Cleanup(func() { _ = exec.Command("ip", "netns", "del", name).Run() })
	return "/run/netns/" + name
}

// runPasta runs the pasta link in W (as root, like podman in its user
// namespace) with CombinedOutput, as podman and rootlesskit do: it only
// returns once we exited and nothing else holds our stdout and stderr.
func (wd *world) runPasta(pasta string, args ...string) (string, int) {
	wd.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, "ip", append([]string{"netns", "exec", wd.w, pasta}, args...)...)
	cmd.WaitDelay = time.Second
	out, err := cmd.CombinedOutput()
	if ctx.Err() != nil {
		wd.t.Fatalf("pasta %v: no end of output within a minute (a background copy holding our pipes?)\n%s", args, out)
	}
	var ee *exec.ExitError
	switch {
	case err == nil:
		return string(out), 0
	case errors.As(err, &ee):
		return string(out), ee.ExitCode()
	}
	wd.t.Fatalf("pasta %v: %v\n%s", args, err, out)
	return "", 0
}

// daemonsFor returns the PIDs of pasta-mode processes serving nsPath, and
// registers their end at cleanup.
func daemonsFor(t *testing.T, nsPath string) []string {
	t.Helper()
	pids := processesWith(nsPath)
	t.Cleanup(func() {
		for _, p := range pids {
			if pid, err := strconv.Atoi(p); err == nil {
				_ = syscall.Kill(pid, syscall.SIGKILL)
			}
		}
	})
	return pids
}

// waitServingEnds waits (up to a generous deadline, not a timing check) until no
// process serves nsPath any more.
func waitServingEnds(t *testing.T, nsPath, why string) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for len(processesWith(nsPath)) > 0 {
		if time.Now().After(deadline) {
			t.Fatalf("pasta-mode process still serving %s after %s", nsPath, why)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// inNetns runs CMD in the network namespace at nsPath (as root) and
// returns its output; it fails the test on error.
func inNetns(t *testing.T, nsPath string, cmdline ...string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	out, err := exec.CommandContext(ctx, "nsenter", append([]string{"--net=" + nsPath, "--"}, cmdline...)...).CombinedOutput()
	if err != nil {
		t.Fatalf("in %s: %v: %v\n%s", nsPath, cmdline, err, out)
	}
	return string(out)
}

// podmanArgs is containers/common's argument list for a netns path, with
// extra options (published ports, --pid) where podman puts them.
func podmanArgs(nsPath string, extra ...string) []string {
	args := append([]string{"--config-net"}, extra...)
	tcp, udp := false, false
	for _, a := range extra {
		tcp = tcp || a == "-t"
		udp = udp || a == "-u"
	}
	args = append(args, "--dns-forward", "169.254.1.1")
	if !tcp {
		args = append(args, "-t", "none")
	}
	if !udp {
		args = append(args, "-u", "none")
	}
	return append(args, "-T", "none", "-U", "none", "--no-map-gw", "--quiet", "--netns", nsPath, "--map-guest-addr", "169.254.1.2")
}

// TestPastaPodman replays podman 5's command line for a container without
// published ports and checks what podman relies on afterwards.
func TestPastaPodman(t *testing.T) {
	wd := newWorld(t)
	pasta := pastaLink(t)
	wd.startServer(wd.r, "tcp-echo-server", remoteAddr+":7")
	wd.startServer(wd.r, "tcp-echo-server", "["+remoteAddr6+"]:7")
	wd.startServer(wd.r, "dns-server", routerAddr+":53", testName+"="+testNameIP)
	// A neighbour on the host's subnet other than the gateway: the guest
	// shares the subnet and reaches it directly.
	const neighbour, neighbour6 = "203.0.113.11", "2001:db8:1::11"
	wd.ip("-n", wd.r, "addr", "add", neighbour+"/24", "dev", "veth0")
	wd.ip("-n", wd.r, "addr", "add", neighbour6+"/64", "dev", "veth0", "nodad")
	wd.startServer(wd.r, "tcp-echo-server", neighbour+":7")
	wd.startServer(wd.r, "tcp-echo-server", "["+neighbour6+"]:7")
	// The host's own address, reached from the container as 169.254.1.2.
	wd.startServer(wd.w, "tcp-echo-server", worldAddr+":8081")
	nsPath := wd.containerNetns()

	out, code := wd.runPasta(pasta, podmanArgs(nsPath)...)
	if code != 0 {
		t.Fatalf("pasta exited %d:\n%s", code, out)
	}
	if out != "" {
		t.Errorf("output with --quiet: %q", out)
	}
	if pids := daemonsFor(t, nsPath); len(pids) != 1 {
		t.Fatalf("want one background process serving the namespace, got %v", pids)
	}
	// Addresses and routes are in place when the command returns: the
	// host's interface, copied.
	view := inNetns(t, nsPath, "sh", "-c", "ip addr show; ip route; ip -6 route")
	for _, want := range []string{"veth0: <BROADCAST,MULTICAST,UP,LOWER_UP> mtu 65520", "inet " + worldAddr + "/24", "inet6 " + worldAddr6 + "/64",
		"default via " + routerAddr + " dev veth0", "default via " + routerAddr6 + " dev veth0", "lo: <LOOPBACK,UP"} {
		if !strings.Contains(view, want) {
			t.Errorf("namespace lacks %q:\n%s", want, view)
		}
	}
	const size = 16 << 20
	checkEcho(t, result{stdout: inNetns(t, nsPath, bins.nettool, "tcp-echo-check", remoteAddr+":7", fmt.Sprint(size))}, size)
	checkEcho(t, result{stdout: inNetns(t, nsPath, bins.nettool, "tcp-echo-check", "["+remoteAddr6+"]:7", fmt.Sprint(size))}, size)
	checkEcho(t, result{stdout: inNetns(t, nsPath, bins.nettool, "tcp-echo-check", neighbour+":7", "1048576")}, 1<<20)
	checkEcho(t, result{stdout: inNetns(t, nsPath, bins.nettool, "tcp-echo-check", "["+neighbour6+"]:7", "1048576")}, 1<<20)
	// 169.254.1.1 is the DNS forwarder (to W's resolver, the test DNS
	// server in R); 169.254.1.2 is the host's own address.
	for _, proto := range []string{"udp", "tcp"} {
		if got := inNetns(t, nsPath, bins.nettool, "dns-query", "169.254.1.1:53", testName, proto); !strings.Contains(got, "A "+testNameIP) {
			t.Errorf("dns over %s through --dns-forward: %s", proto, got)
		}
	}
	checkEcho(t, result{stdout: inNetns(t, nsPath, bins.nettool, "tcp-echo-check", "169.254.1.2:8081", "1048576")}, 1<<20)
	// --no-map-gw: the gateway is R itself, not W's loopback.
	if got := inNetns(t, nsPath, bins.nettool, "dns-query", routerAddr+":53", testName, "tcp"); !strings.Contains(got, "A "+testNameIP) {
		t.Errorf("dns over tcp to the gateway's own address: %s", got)
	}
	// No teardown from podman: it deletes the namespace file.
	wd.ip("netns", "del", filepath.Base(nsPath))
	waitServingEnds(t, nsPath, "the namespace file was deleted")

	// podman's retry for a pasta without --map-guest-addr: the same list
	// less the last two arguments.
	retry := wd.containerNetns()
	args := podmanArgs(retry)
	if out, code := wd.runPasta(pasta, args[:len(args)-2]...); code != 0 {
		t.Fatalf("podman's retry without --map-guest-addr: exit %d:\n%s", code, out)
	}
	daemonsFor(t, retry)
	if got := inNetns(t, retry, bins.nettool, "dns-query", "169.254.1.1:53", testName, "udp"); !strings.Contains(got, "A "+testNameIP) {
		t.Errorf("dns after the retry: %s", got)
	}
}

// TestPastaPodmanPorts replays podman with published ports and --pid (a
// rootless bridge network): ports from loopback and from outside, the PID
// file, SIGTERM, and a port that cannot be bound.
func TestPastaPodmanPorts(t *testing.T) {
	wd := newWorld(t)
	pasta := pastaLink(t)
	nsPath := wd.containerNetns()
	ns := filepath.Base(nsPath)
	wd.startServer(ns, "tcp-echo-server", "0.0.0.0:80")
	wd.startServer(ns, "udp-echo-server", "0.0.0.0:53")
	wd.startServer(ns, "peer-server", "tcp", "0.0.0.0:88")
	pidDir, err := os.MkdirTemp("", "pasta-pid-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(pidDir) })
	pidFile := filepath.Join(pidDir, "rootless-netns-conn.pid")
	out, code := wd.runPasta(pasta, podmanArgs(nsPath, "--pid", pidFile,
		"-t", "8080-8080:80-80", "-t", "8088-8088:88-88", "-u", "5353-5353:53-53")...)
	if code != 0 {
		t.Fatalf("pasta exited %d:\n%s", code, out)
	}
	pids := daemonsFor(t, nsPath)
	b, err := os.ReadFile(pidFile)
	if err != nil {
		t.Fatal(err)
	}
	if len(pids) != 1 || string(b) != pids[0]+"\n" {
		t.Fatalf("PID file says %q; processes serving the namespace: %v", b, pids)
	}
	// It left our session (setsid): session ID = its PID.
	if st, err := os.ReadFile("/proc/" + pids[0] + "/stat"); err != nil {
		t.Fatal(err)
	} else if f := strings.Fields(string(st[strings.LastIndexByte(string(st), ')')+1:])); len(f) < 4 || f[3] != pids[0] {
		t.Errorf("background copy is not a session leader: %s", st)
	}
	const size = 16 << 20
	for _, where := range []struct{ ns, addr string }{{wd.w, "127.0.0.1"}, {wd.w, worldAddr}, {wd.r, worldAddr}} {
		res, err := exec.Command("ip", "netns", "exec", where.ns, bins.nettool, "tcp-echo-check", where.addr+":8080", fmt.Sprint(size)).CombinedOutput()
		if err != nil {
			t.Fatalf("tcp from %s to %s:8080: %v\n%s", where.ns, where.addr, err, res)
		}
		checkEcho(t, result{stdout: string(res)}, size)
	}
	if res, err := exec.Command("ip", "netns", "exec", wd.w, bins.nettool, "udp-echo-check", "127.0.0.1:5353", "100", "1400").CombinedOutput(); err != nil || !strings.Contains(string(res), "datagrams=100") {
		t.Errorf("udp through -u: %v\n%s", err, res)
	}
	// A client from outside keeps its address (the tap path); one on the
	// host's loopback comes in through the namespace's own sockets.
	if res, _ := exec.Command("ip", "netns", "exec", wd.r, bins.nettool, "peer-query", "tcp", worldAddr+":8088").CombinedOutput(); !strings.Contains(string(res), "peer="+routerAddr+":") {
		t.Errorf("guest sees the outside client as %s, want %s", res, routerAddr)
	}
	if res, _ := exec.Command("ip", "netns", "exec", wd.w, bins.nettool, "peer-query", "tcp", "127.0.0.1:8088").CombinedOutput(); !strings.Contains(string(res), "peer="+worldAddr+":") {
		t.Errorf("guest sees the loopback client as %s, want its own address %s", res, worldAddr)
	}

	// Another container publishing the same port fails to start, with
	// status 1 and the reason.
	other := wd.containerNetns()
	out, code = wd.runPasta(pasta, podmanArgs(other, "-t", "8080-8080:80-80")...)
	if code != 1 || !strings.Contains(out, "8080") || !strings.Contains(out, "in use") {
		t.Errorf("second pasta on a taken port: exit %d:\n%s", code, out)
	}
	if left := processesWith(other); len(left) > 0 {
		t.Errorf("failed start left processes behind: %v", left)
	}

	// podman stops it with SIGTERM.
	pid, _ := strconv.Atoi(pids[0])
	if err := syscall.Kill(pid, syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	waitServingEnds(t, nsPath, "SIGTERM")
}

// TestPastaOptionsContract checks the probes: --version (also after
// rootlesskit's --host-lo-to-ns-lo), and the unknown-option text podman
// matches to retry without --map-guest-addr.
func TestPastaOptionsContract(t *testing.T) {
	pasta := pastaLink(t)
	for _, args := range [][]string{{"--version"}, {"--host-lo-to-ns-lo", "--version"}} {
		out, err := exec.Command(pasta, args...).CombinedOutput()
		if err != nil || !strings.HasPrefix(string(out), "pasta ") {
			t.Errorf("pasta %v: %v\n%s", args, err, out)
		}
	}
	out, err := exec.Command(pasta, "--config-net", "--map-guest-addrs", "169.254.1.2", "1").CombinedOutput()
	var ee *exec.ExitError
	if !errors.As(err, &ee) || ee.ExitCode() != 1 || !strings.Contains(string(out), "unrecognized option '--map-guest-addrs") {
		t.Errorf("unknown option: %v\n%s", err, out)
	}
}

// rootlesskitV2 is the version of rootlesskit whose --net=pasta the test
// drives (Debian ships 1.x, without pasta).
const rootlesskitV2 = "v2.3.6"

// rootlesskit2 returns a rootlesskit 2 binary: $ROOTLESSKIT2 (.ci/run
// installs one), else one built with go install into a cache directory
// readable by the unprivileged user.
func rootlesskit2(t *testing.T) string {
	t.Helper()
	if p := os.Getenv("ROOTLESSKIT2"); p != "" {
		return p
	}
	dir := filepath.Join(os.TempDir(), "netns-run-rootlesskit-"+rootlesskitV2)
	bin := filepath.Join(dir, "rootlesskit")
	if _, err := os.Stat(bin); err == nil {
		return bin
	}
	cmd := exec.Command("go", "install", "github.com/rootless-containers/rootlesskit/v2/cmd/rootlesskit@"+rootlesskitV2)
	cmd.Env = append(os.Environ(), "GOBIN="+dir, "GOFLAGS=-mod=mod")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Skipf("needs rootlesskit %s (set ROOTLESSKIT2, or let go install reach the module proxy): %v\n%s", rootlesskitV2, err, out)
	}
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	return bin
}

// TestPastaRootlesskit2 runs the real rootlesskit 2 with --net=pasta and
// our pasta link, as the unprivileged user: outbound traffic, DNS through
// the forwarder, the host's loopback through the gateway and through -T
// auto, and a port the child listens on, published by -t auto.
func TestPastaRootlesskit2(t *testing.T) {
	// By PID, and with --detach-netns (--userns and --netns paths).
	t.Run("pid", func(t *testing.T) { testPastaRootlesskit2(t, nil) })
	t.Run("detach-netns", func(t *testing.T) { testPastaRootlesskit2(t, []string{"--detach-netns"}) })
}

func testPastaRootlesskit2(t *testing.T, flags []string) {
	wd := newWorld(t)
	for _, tool := range []string{"newuidmap", "newgidmap"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("needs %s (Debian package uidmap; .ci/run installs it): %v", tool, err)
		}
	}
	rk := rootlesskit2(t)
	pasta := pastaLink(t)
	addSubIDs(t, "nobody", 300000, 65536)
	wd.startServer(wd.r, "tcp-echo-server", remoteAddr+":7")
	wd.startServer(wd.r, "dns-server", routerAddr+":53", testName+"="+testNameIP)
	wd.startServer(wd.w, "tcp-echo-server", "127.0.0.1:8082")
	state := userDir(t, "rootlesskit2-state-")
	const size = 16 << 20
	// With --detach-netns the child stays in the host's network namespace;
	// the one pasta serves is at $ROOTLESSKIT_STATE_DIR/netns.
	nettool := bins.nettool
	if len(flags) > 0 {
		nettool = `nsenter --net="$ROOTLESSKIT_STATE_DIR/netns" -- ` + nettool
	}
	script := fmt.Sprintf(`set -e
%[1]s tcp-echo-check %[2]s:7 %[3]d
%[1]s dns-query 10.0.2.3:53 %[4]s udp
%[1]s tcp-echo-check 10.0.2.2:8082 1048576
# -T auto: the host's 127.0.0.1:8082 on our own loopback, once seen.
i=0; until %[1]s tcp-echo-check 127.0.0.1:8082 1048576; do i=$((i+1)); [ $i -lt 100 ]; sleep 0.1; done
exec %[1]s tcp-echo-server 0.0.0.0:9000`, nettool, remoteAddr, size, testName)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	args := []string{"netns", "exec", wd.w,
		"setpriv", fmt.Sprintf("--reuid=%d", unprivUID), fmt.Sprintf("--regid=%d", unprivUID), "--clear-groups", "--",
		rk, "--state-dir", state + "/rk", "--net=pasta", "--pasta-binary=" + pasta, "--port-driver=implicit"}
	args = append(append(args, flags...), "-p", "127.0.0.1:9000:9000/tcp", "sh", "-c", script)
	cmd := exec.CommandContext(ctx, "ip", args...)
	cmd.Env = append(os.Environ(), "HOME="+state)
	cmd.WaitDelay = 5 * time.Second
	var stdout, stderr syncBuffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	exited := startEnded(t, cmd)
	deadline := time.Now().Add(time.Minute)
	for !strings.Contains(stdout.String(), "listening") {
		select {
		case err := <-exited:
			exited <- err
			t.Fatalf("rootlesskit ended early: %v\nstdout:\n%s\nstderr:\n%s", err, &stdout, &stderr)
		case <-time.After(50 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			t.Fatalf("rootlesskit child did not get ready\nstdout:\n%s\nstderr:\n%s", &stdout, &stderr)
		}
	}
	lines := strings.Split(stdout.String(), "\n")
	if !strings.Contains(stdout.String(), "A "+testNameIP) {
		t.Errorf("DNS through --dns-forward 10.0.2.3:\n%s", &stdout)
	}
	var echoes int
	for _, l := range lines {
		if strings.HasPrefix(l, "bytes=") {
			echoes++
		}
	}
	m := echoLine.FindStringSubmatch(stdout.String())
	if m == nil || m[1] != fmt.Sprint(size) || m[2] != m[3] || echoes < 3 {
		t.Fatalf("echoes from the child (outbound, 10.0.2.2, 127.0.0.1):\n%s", &stdout)
	}
	// -t auto publishes the child's 9000 on the host.
	checkEcho(t, result{stdout: retryInW(t, wd, "inbound through -t auto", "tcp-echo-check", "127.0.0.1:9000", fmt.Sprint(size))}, size)
	// The helper ends with the child's namespace.
	_ = cmd.Process.Signal(syscall.SIGTERM)
	<-exited
	exited <- nil
	waitServingEnds(t, pasta, "rootlesskit exited")
}

// TestPastaForegroundExtensions runs pasta -f (the process stays ours) with
// usernet's extensions: the JSON API, a packet capture and a debug log; and
// --map-host-loopback, DNS over TLS to --dns-forward, --host-lo-to-ns-lo.
func TestPastaForegroundExtensions(t *testing.T) {
	wd := newWorld(t)
	pasta := pastaLink(t)
	wd.startServer(wd.r, "dns-server", routerAddr+":53", testName+"="+testNameIP)
	nsPath := wd.containerNetns()
	dir := userDir(t, "pasta-ext-")
	sock, pcap, logf, pidf := filepath.Join(dir, "api.sock"), filepath.Join(dir, "cap.pcap"), filepath.Join(dir, "log"), filepath.Join(dir, "pid")
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	wd.startServer(wd.w, "tcp-echo-server", "127.0.0.1:8083")
	// DNS over TLS at the resolver (an echo server stands in for it).
	wd.startServer(wd.r, "tcp-echo-server", routerAddr+":853")
	wd.startServer(filepath.Base(nsPath), "peer-server", "tcp", "0.0.0.0:88")
	cmd := exec.CommandContext(ctx, "ip", "netns", "exec", wd.w, pasta, "-f", "--config-net", "--dns-forward", "169.254.1.1",
		"-t", "8090:88", "--host-lo-to-ns-lo", "-u", "none", "-T", "none", "-U", "none", "--no-map-gw", "--map-host-loopback", "169.254.1.3", "--netns", nsPath,
		"-P", pidf, "--api-socket", sock, "--pcap", pcap, "-d", "-l", logf)
	var out syncBuffer
	cmd.Stdout, cmd.Stderr = &out, &out
	exited := startEnded(t, cmd)
	for {
		if b, err := os.ReadFile(pidf); err == nil && string(b) == fmt.Sprintf("%d\n", cmd.Process.Pid) {
			break
		}
		select {
		case err := <-exited:
			t.Fatalf("pasta -f exited: %v\n%s", err, &out)
		case <-time.After(20 * time.Millisecond):
		}
	}
	if got := inNetns(t, nsPath, bins.nettool, "dns-query", "169.254.1.1:53", testName, "udp"); !strings.Contains(got, "A "+testNameIP) {
		t.Errorf("dns: %s", got)
	}
	if got := inNetns(t, nsPath, bins.nettool, "dns-query", routerAddr+":53", testName, "tcp"); !strings.Contains(got, "A "+testNameIP) {
		t.Errorf("dns over tcp to the gateway: %s", got)
	}
	checkEcho(t, result{stdout: inNetns(t, nsPath, bins.nettool, "tcp-echo-check", "169.254.1.3:8083", "1048576")}, 1<<20)
	checkEcho(t, result{stdout: inNetns(t, nsPath, bins.nettool, "tcp-echo-check", "169.254.1.1:853", "65536")}, 1<<16)
	// --host-lo-to-ns-lo: a client on the host's loopback arrives from
	// the namespace's loopback.
	if res, _ := exec.Command("ip", "netns", "exec", wd.w, bins.nettool, "peer-query", "tcp", "127.0.0.1:8090").CombinedOutput(); !strings.Contains(string(res), "peer=127.0.0.1:") {
		t.Errorf("with --host-lo-to-ns-lo the guest sees the loopback client as %s", res)
	}
	if got := apiCall(t, sock, `{"execute":"get_stats"}`); !strings.Contains(got, `"tcp_total":3`) {
		t.Errorf("get_stats: %s", got)
	}
	if got := apiCall(t, sock, `{"execute":"get_info"}`); !strings.Contains(got, `"mtu":65520`) || !strings.Contains(got, `"gateway":"`+routerAddr+`"`) {
		t.Errorf("get_info: %s", got)
	}
	if err := cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if err := <-exited; err != nil {
		t.Errorf("pasta -f after SIGTERM: %v\n%s", err, &out)
	}
	exited <- nil
	if b, err := os.ReadFile(pcap); err != nil || len(b) <= 24 || string(b[:4]) != "\xd4\xc3\xb2\xa1" {
		t.Errorf("packet capture: %v, %d bytes", err, len(b))
	}
	if b, _ := os.ReadFile(logf); !strings.Contains(string(b), "tcp flow opened") {
		t.Errorf("debug log lacks the flow:\n%s", b)
	}
}

// TestPastaOfflineHost: a host without a default route gives the namespace
// pasta's fallback addressing, and an interface named tap0.
func TestPastaOfflineHost(t *testing.T) {
	wd := newWorld(t)
	pasta := pastaLink(t)
	offline := wd.containerNetns() // stands in for the host: lo only
	nsPath := wd.containerNetns()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	args := append([]string{"netns", "exec", filepath.Base(offline), pasta}, podmanArgs(nsPath)...)
	out, err := exec.CommandContext(ctx, "ip", args...).CombinedOutput()
	if err != nil {
		t.Fatalf("pasta on an offline host: %v\n%s", err, out)
	}
	daemonsFor(t, nsPath)
	view := inNetns(t, nsPath, "sh", "-c", "ip addr show; ip route")
	for _, want := range []string{"tap0: <BROADCAST,MULTICAST,UP,LOWER_UP> mtu 65520", "inet 169.254.2.1/16", "default via 169.254.2.2 dev tap0"} {
		if !strings.Contains(view, want) {
			t.Errorf("namespace lacks %q:\n%s", want, view)
		}
	}
	wd.ip("netns", "del", filepath.Base(nsPath))
	waitServingEnds(t, nsPath, "the namespace file was deleted")
}
