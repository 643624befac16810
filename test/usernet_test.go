package test

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
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

	"golang.org/x/sys/unix"
)

func TestUsernetAttachByPID(t *testing.T) {
	wd := newWorld(t)
	wd.startServer(wd.r, "tcp-echo-server", remoteAddr+":7")
	wd.startServer(wd.r, "udp-echo-server", remoteAddr+":7")
	wd.startServer(wd.r, "dns-server", routerAddr+":53", testName+"="+testNameIP)
	wd.startServer(wd.w, "tcp-echo-server", "127.0.0.1:8080")
	sb := wd.startSandbox()
	sock := apiSocketPath(t)
	u := wd.startUsernet("--configure", "--mtu=65520", "--api-socket", sock, fmt.Sprint(sb.pid), "tap0")
	if st, err := os.Stat(sock); err != nil || st.Mode().Perm() != 0o600 {
		t.Errorf("api socket: %v, mode %v; want 0600", err, st.Mode().Perm())
	}
	u.stdout.waitFor("WARNING: 127.0.0.1", 5*time.Second)
	for _, want := range []string{"Starting slirp", "* MTU:             65520", "* Recommended IP:  10.0.2.100", "* API Socket:      " + sock, "WARNING: 127.0.0.1:* on the host is accessible as 10.0.2.2"} {
		if !strings.Contains(u.stdout.String(), want) {
			t.Errorf("banner lacks %q:\n%s", want, &u.stdout)
		}
	}
	out := wd.inSandbox(sb, "sh", "-c", "ip -4 addr show dev tap0; ip -4 route; ip link show dev lo")
	for _, want := range []string{"inet 10.0.2.100/24", "default via 10.0.2.2 dev tap0", "mtu 65520", "LOWER_UP"} {
		if !strings.Contains(out, want) {
			t.Errorf("guest view lacks %q:\n%s", want, out)
		}
	}
	const size = 64 << 20
	checkEcho(t, result{stdout: wd.inSandbox(sb, bins.nettool, "tcp-echo-check", remoteAddr+":7", fmt.Sprint(size))}, size)
	checkEcho(t, result{stdout: wd.inSandbox(sb, bins.nettool, "tcp-echo-check", "10.0.2.2:8080", "1048576")}, 1<<20)
	if out := wd.inSandbox(sb, bins.nettool, "udp-echo-check", remoteAddr+":7", "100", "1400"); !strings.Contains(out, "datagrams=100") {
		t.Errorf("udp echo: %s", out)
	}
	for _, proto := range []string{"udp", "tcp"} {
		if out := wd.inSandbox(sb, bins.nettool, "dns-query", "10.0.2.3:53", testName, proto); !strings.Contains(out, "A "+testNameIP) {
			t.Errorf("dns over %s: %s", proto, out)
		}
	}
	if os.Getenv("USERNET_UNDER_TEST") == "" {
		// Our extensions: slirp4netns answers "unknown execute".
		if got := apiCall(t, sock, `{"execute":"get_info"}`); !strings.Contains(got, `"mtu":65520`) || !strings.Contains(got, `"ports":[]`) {
			t.Errorf("get_info: %s", got)
		}
		if got := apiCall(t, sock, `{"execute":"get_stats"}`); !strings.Contains(got, `"tcp_total":3`) {
			t.Errorf("get_stats after three TCP flows (two echoes, DNS over TCP): %s", got)
		}
	}
	if code := u.stop(t); code != 0 {
		t.Errorf("exit status after exit-fd hang-up: %d\nstderr:\n%s", code, &u.stderr)
	}
	if _, err := os.Stat(sock); !os.IsNotExist(err) {
		t.Errorf("api socket left behind after exit: %v", err)
	}
}

// TestUsernetPathAndExistingTap attaches the way rootlesskit does: the TAP
// already exists and is configured by the caller, usernet gets a netns path
// and the user namespace path.
func TestUsernetPathAndExistingTap(t *testing.T) {
	wd := newWorld(t)
	wd.startServer(wd.r, "tcp-echo-server", remoteAddr+":7")
	sb := wd.startSandbox()
	wd.inSandbox(sb, "sh", "-c", "ip tuntap add name tap0 mode tap && ip link set tap0 up && ip link set lo up")
	u := wd.startUsernet("--mtu", "1500", "--netns-type=path",
		fmt.Sprintf("--userns-path=/proc/%d/ns/user", sb.pid), fmt.Sprintf("/proc/%d/ns/net", sb.pid), "tap0")
	wd.inSandbox(sb, "sh", "-c", "ip addr add 10.0.2.100/24 dev tap0 && ip route add default via 10.0.2.2")
	const size = 8 << 20
	checkEcho(t, result{stdout: wd.inSandbox(sb, bins.nettool, "tcp-echo-check", remoteAddr+":7", fmt.Sprint(size))}, size)
	if code := u.stop(t); code != 0 {
		t.Errorf("exit status %d\n%s", code, &u.stderr)
	}
}

func TestUsernetPortForwardingAPI(t *testing.T) {
	wd := newWorld(t)
	sb := wd.startSandbox()
	sock := apiSocketPath(t)
	wd.startUsernet("-c", "--mtu=65520", "-a", sock, fmt.Sprint(sb.pid), "tap0")

	// Servers in the guest that report the peer they see.
	for _, proto := range []string{"tcp", "udp"} {
		wd.startInSandbox(sb, bins.nettool, "peer-server", proto, "0.0.0.0:9000")
	}
	wd.startInSandbox(sb, bins.nettool, "tcp-echo-server", "0.0.0.0:9001")

	if got := apiCall(t, sock, `{"execute":"list_hostfwd"}`); got != `{"entries":[]}` {
		t.Errorf("empty list: %s", got)
	}
	adds := []struct{ req, want string }{
		{`{"execute":"add_hostfwd","arguments":{"proto":"tcp","host_addr":"0.0.0.0","host_port":19000,"guest_addr":"","guest_port":9000}}` + "\n", `{"return":{"id":1}}`},
		{`{"execute":"add_hostfwd","arguments":{"proto":"udp","host_port":19000,"guest_port":9000}}`, `{"return":{"id":2}}`},
		{`{"execute":"add_hostfwd","arguments":{"proto":"tcp","host_addr":"127.0.0.1","host_port":19001,"guest_addr":"10.0.2.100","guest_port":9001}}`, `{"return":{"id":3}}`},
		{`{"execute":"add_hostfwd","arguments":{"proto":"tcp","host_port":19000,"guest_port":9000}}`, `{"error":{"desc":"bad request: add_hostfwd: slirp_add_hostfwd failed"}}`},
		{`not json`, `{"error":{"desc":"bad request: cannot parse JSON"}}`},
	}
	for _, a := range adds {
		if got := apiCall(t, sock, a.req); got != a.want {
			t.Errorf("%s\n got %s\nwant %s", a.req, got, a.want)
		}
	}
	wantList := `{"entries":[{"id":1,"proto":"tcp","host_addr":"0.0.0.0","host_port":19000,"guest_addr":"10.0.2.100","guest_port":9000},` +
		`{"id":2,"proto":"udp","host_addr":"0.0.0.0","host_port":19000,"guest_addr":"10.0.2.100","guest_port":9000},` +
		`{"id":3,"proto":"tcp","host_addr":"127.0.0.1","host_port":19001,"guest_addr":"10.0.2.100","guest_port":9001}]}`
	if got := apiCall(t, sock, `{"execute":"list_hostfwd"}`); got != wantList {
		t.Errorf("list:\n got %s\nwant %s", got, wantList)
	}

	// A loopback client appears as the gateway; a client on another host
	// keeps its own address.
	peer := func(ns, proto, addr string) string {
		out, err := exec.Command("ip", "netns", "exec", ns, bins.nettool, "peer-query", proto, addr).CombinedOutput()
		if err != nil {
			t.Fatalf("peer-query %s %s from %s: %v\n%s", proto, addr, ns, err, out)
		}
		return strings.TrimSpace(string(out))
	}
	for _, proto := range []string{"tcp", "udp"} {
		if got := peer(wd.w, proto, "127.0.0.1:19000"); !strings.HasPrefix(got, "peer=10.0.2.2:") {
			t.Errorf("%s from host loopback: guest saw %q, want the gateway 10.0.2.2", proto, got)
		}
		if got := peer(wd.r, proto, worldAddr+":19000"); !strings.HasPrefix(got, "peer="+routerAddr+":") {
			t.Errorf("%s from %s: guest saw %q, want the real client address", proto, routerAddr, got)
		}
	}
	out, err := exec.Command("ip", "netns", "exec", wd.w, bins.nettool, "tcp-echo-check", "127.0.0.1:19001", fmt.Sprint(32<<20)).CombinedOutput()
	if err != nil {
		t.Fatalf("echo through forward: %v\n%s", err, out)
	}
	checkEcho(t, result{stdout: string(out)}, 32<<20)

	if got := apiCall(t, sock, `{"execute":"remove_hostfwd","arguments":{"id":1}}`); got != `{"return":{}}` {
		t.Errorf("remove: %s", got)
	}
	if got := apiCall(t, sock, `{"execute":"remove_hostfwd","arguments":{"id":1}}`); got != `{"error":{"desc":"bad request: remove_hostfwd: bad arguments.id"}}` {
		t.Errorf("remove again: %s", got)
	}
	out, _ = exec.Command("ip", "netns", "exec", wd.w, bins.nettool, "tcp-connect", "127.0.0.1:19000").CombinedOutput()
	if strings.TrimSpace(string(out)) != "refused" {
		t.Errorf("removed forward still accepts: %s", out)
	}
	// Last: slirp4netns itself crashes on this one (NULL proto).
	req := `{"execute":"add_hostfwd","arguments":{"host_port":19002,"guest_port":9000}}`
	if got := apiCall(t, sock, req); got != `{"error":{"desc":"bad request: add_hostfwd: bad arguments.proto"}}` {
		t.Errorf("missing proto: %s", got)
	}
}

func TestUsernetSIGTERM(t *testing.T) {
	wd := newWorld(t)
	sb := wd.startSandbox()
	sock := apiSocketPath(t)
	u := wd.startUsernet("-c", "-a", sock, fmt.Sprint(sb.pid), "tap0")
	// `ip netns exec` and setpriv exec, so this PID is usernet itself, the
	// process runtimes signal.
	if err := u.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-u.done:
		u.done <- err
		if err != nil {
			t.Errorf("exit after SIGTERM: %v\n%s", err, &u.stderr)
		}
	case <-time.After(2 * time.Second):
		t.Fatal("usernet did not exit within 2s of SIGTERM")
	}
	if _, err := os.Stat(sock); !os.IsNotExist(err) {
		t.Errorf("api socket left behind after SIGTERM: %v", err)
	}
}

func TestUsernetCommandLineErrors(t *testing.T) {
	cases := []struct {
		args   []string
		stderr string
	}{
		{[]string{"--mtu=65522", "1", "tap0"}, "MTU must be a positive integer (< 65522)\n"},
		{[]string{"--mtu", "0", "1", "tap0"}, "MTU must be a positive integer (< 65522)\n"},
		{[]string{"-e", "x", "1", "tap0"}, "exit-fd must be a non-negative integer\n"},
		{[]string{"-r", "-2", "1", "tap0"}, "ready-fd must be a non-negative integer\n"},
		{[]string{"--cidr=10.0.2.0/26", "1", "tap0"}, "prefix length needs to be 1-25\n"},
		{[]string{"--cidr", "10.0.2.100/24", "1", "tap0"}, "CIDR needs to be a network address like 10.0.2.0/24, not like 10.0.2.100/24\n"},
		{[]string{"--cidr=foo", "1", "tap0"}, "invalid CIDR: foo\n"},
		{[]string{"--macaddress=52:54:00:12:34:56", "1", "tap0"}, "--macaddr cannot be specified when --configure or -c is not specified\n"},
		{[]string{"--target-type=x", "1", "tap0"}, "--target-type must be either \"netns\" or \"bess\"\n"},
		{[]string{"0", "tap0"}, "PID must be a positive integer\n"},
		{[]string{"tap0", "--userns-path=/nonexistent", "1"}, "userns path doesn't exist: /nonexistent\n"},
	}
	for _, c := range cases {
		cmd := exec.Command(bins.usernet, c.args...)
		var stdout, stderr bytes.Buffer
		cmd.Stdout, cmd.Stderr = &stdout, &stderr
		err := cmd.Run()
		if ee, ok := err.(*exec.ExitError); !ok || ee.ExitCode() != 1 {
			t.Errorf("%v: want exit 1, got %v", c.args, err)
		}
		if stderr.String() != c.stderr {
			t.Errorf("%v: stderr %q, want %q", c.args, stderr.String(), c.stderr)
		}
		if wantUsage := !strings.Contains(c.stderr, "CIDR") && !strings.Contains(c.stderr, "prefix length"); wantUsage != strings.HasPrefix(stdout.String(), "Usage: ") {
			t.Errorf("%v: usage on stdout is %q; slirp4netns prints it for all but CIDR errors", c.args, stdout.String())
		}
	}
}

func TestUsernetHelpAndVersion(t *testing.T) {
	out, err := exec.Command(bins.usernet, "--help").Output()
	if err != nil {
		t.Fatal(err)
	}
	// Every substring podman, rootlesskit and docker probe for.
	for _, want := range []string{"--netns-type", "--mtu", "--cidr", "--disable-host-loopback", "--api-socket",
		"--enable-sandbox", "--enable-seccomp", "--enable-ipv6", "--outbound-addr", "--userns-path", "--disable-dns",
		"--netns-type=TYPE \t specify", "--userns-path=PATH\t specify"} {
		if !strings.Contains(string(out), want) {
			t.Errorf("--help lacks %q", want)
		}
	}
	out, err = exec.Command(bins.usernet, "-v").Output()
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"slirp4netns version 1.", "\nSLIRP_CONFIG_VERSION_MAX: ", "\nlibslirp: "} {
		if !strings.Contains(string(out), want) {
			t.Errorf("--version lacks %q:\n%s", want, out)
		}
	}
}

// TestRootlesskitWithUsernet runs the real rootlesskit with usernet as its
// slirp4netns binary and slirp4netns port driver, and checks traffic both
// ways: outbound from the child to a test host, inbound through a port
// rootlesskit publishes via usernet's API.
func TestRootlesskitWithUsernet(t *testing.T) {
	wd := newWorld(t)
	for _, tool := range []string{"rootlesskit", "newuidmap", "newgidmap"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("needs %s (Debian packages rootlesskit, uidmap; .ci/run installs them): %v", tool, err)
		}
	}
	addSubIDs(t, "nobody", 300000, 65536)
	wd.startServer(wd.r, "tcp-echo-server", remoteAddr+":7")
	state := userDir(t, "rootlesskit-state-")
	const size = 16 << 20
	script := fmt.Sprintf("%[1]s tcp-echo-check %[2]s:7 %[3]d && exec %[1]s tcp-echo-server 0.0.0.0:9000", bins.nettool, remoteAddr, size)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, "ip", "netns", "exec", wd.w,
		"setpriv", fmt.Sprintf("--reuid=%d", unprivUID), fmt.Sprintf("--regid=%d", unprivUID), "--clear-groups", "--",
		"rootlesskit", "--state-dir", state+"/rk",
		"--net=slirp4netns", "--slirp4netns-binary="+bins.usernet, "--mtu=65520",
		"--port-driver=slirp4netns", "-p", "127.0.0.1:19100:9000/tcp",
		"sh", "-c", script)
	cmd.Env = append(os.Environ(), "HOME="+state)
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = cmd.Process.Signal(syscall.SIGTERM); _ = cmd.Wait() })
	lines := make(chan string, 4)
	go func() {
		r := bufio.NewScanner(stdout)
		for r.Scan() {
			lines <- r.Text()
		}
		close(lines)
	}()
	var outbound string
	for outbound == "" || !strings.HasPrefix(outbound, "listening") {
		select {
		case l, ok := <-lines:
			if !ok {
				t.Fatalf("rootlesskit child ended early\nstderr:\n%s", &stderr)
			}
			if strings.HasPrefix(l, "bytes=") {
				checkEcho(t, result{stdout: l}, size)
				outbound = "checked"
			}
			if strings.HasPrefix(l, "listening") {
				if outbound == "" {
					t.Fatalf("server started before the outbound check\nstderr:\n%s", &stderr)
				}
				outbound = l
			}
		case <-time.After(60 * time.Second):
			t.Fatalf("rootlesskit child did not get ready\nstderr:\n%s", &stderr)
		}
	}
	// rootlesskit publishes the port after the child starts; retry briefly.
	deadline := time.Now().Add(20 * time.Second)
	for {
		out, err := exec.Command("ip", "netns", "exec", wd.w, bins.nettool, "tcp-echo-check", "127.0.0.1:19100", fmt.Sprint(size)).CombinedOutput()
		if err == nil {
			checkEcho(t, result{stdout: string(out)}, size)
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("inbound through the published port: %v\n%s\nrootlesskit stderr:\n%s", err, out, &stderr)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func TestUsernetSandbox(t *testing.T) {
	wd := newWorld(t)
	wd.startServer(wd.r, "tcp-echo-server", remoteAddr+":7")
	sb := wd.startSandbox()
	sock := apiSocketPath(t)
	u := wd.startUsernet("-c", "--mtu=65520", "--enable-sandbox", "-a", sock, fmt.Sprint(sb.pid), "tap0")
	// The long-running process is still the one that was started.
	checkSandboxed(t, u.cmd.Process.Pid, sandboxStatus...)
	const size = 8 << 20
	checkEcho(t, result{stdout: wd.inSandbox(sb, bins.nettool, "tcp-echo-check", remoteAddr+":7", fmt.Sprint(size))}, size)
	// From W: the sandboxed helper may not inspect callers to tell them
	// from the guest's, and serves only those in its network namespace.
	if got := wd.userAPICall(sock, `{"execute":"list_hostfwd"}`); got != `{"entries":[]}` {
		t.Errorf("api in sandbox: %s", got)
	}
	// A published port, through the guest's kernel (the port helper was
	// started before the sandbox) where nftables works.
	wd.checkPublishedThroughKernel(sb, func(req string) string { return wd.userAPICall(sock, req) })
	if code := u.stop(t); code != 0 {
		t.Errorf("exit status %d\n%s", code, &u.stderr)
	}
	if _, err := os.Stat(sock); !os.IsNotExist(err) {
		t.Errorf("api socket left behind by the sandboxed helper: %v", err)
	}
}

// checkPublishedThroughKernel publishes a port to an echo server in the
// guest over api and checks bytes through it, and (where nftables works,
// and the helper is ours) that the guest's kernel took the connection.
func (wd *world) checkPublishedThroughKernel(sb *sandboxProc, api func(req string) string) {
	t := wd.t
	t.Helper()
	wd.startInSandbox(sb, bins.nettool, "tcp-echo-server", "0.0.0.0:9001")
	// Listening before the first connection: one refused would be retried
	// through the stack (a redirect of the guest's might take it there).
	for i := 0; !strings.Contains(wd.inSandbox(sb, bins.nettool, "tcp-connect", "127.0.0.1:9001"), "connected"); i++ {
		if i == 200 {
			t.Fatal("the guest's echo server does not listen")
		}
		time.Sleep(20 * time.Millisecond)
	}
	if got := api(`{"execute":"add_hostfwd","arguments":{"proto":"tcp","host_addr":"127.0.0.1","host_port":19001,"guest_port":9001}}`); got != `{"return":{"id":1}}` {
		t.Errorf("add_hostfwd: %s", got)
	}
	const size = 8 << 20
	checkEcho(t, result{stdout: wd.client(wd.w, "tcp-echo-check", "127.0.0.1:19001", fmt.Sprint(size))}, size)
	if os.Getenv("USERNET_UNDER_TEST") != "" {
		return
	}
	var reply struct {
		Return guestStats `json:"return"`
	}
	raw := api(`{"execute":"get_stats"}`)
	if err := json.Unmarshal([]byte(raw), &reply); err != nil {
		t.Errorf("get_stats: %v: %s", err, raw)
	}
	if got, want := reply.Return.Flows.TCPPublished, uint64(1); got != want {
		t.Errorf("%d published-port connections through the guest's kernel, want %d", got, want)
	}
}

// TestUsernetSeccompPublished: with --enable-seccomp alone the filter
// comes before any published port's connection, so the port helper that
// takes them through the guest's kernel starts before it.
func TestUsernetSeccompPublished(t *testing.T) {
	wd := newWorld(t)
	sb := wd.startSandbox()
	sock := apiSocketPath(t)
	wd.startUsernet("-c", "--mtu=65520", "--enable-seccomp", "-a", sock, fmt.Sprint(sb.pid), "tap0")
	wd.checkPublishedThroughKernel(sb, func(req string) string { return apiCall(t, sock, req) })
}

func TestUsernetIPv6(t *testing.T) {
	wd := newWorld(t)
	wd.startServer(wd.r, "tcp-echo-server", "["+remoteAddr6+"]:7")
	wd.startServer(wd.r, "dns-server", routerAddr+":53", testName+"="+testNameIP)
	wd.startServer(wd.w, "tcp-echo-server", "[::1]:8080")
	sb := wd.startSandbox()
	sock := apiSocketPath(t)
	u := wd.startUsernet("-c", "-6", "--mtu=65520", "-a", sock, fmt.Sprint(sb.pid), "tap0")
	if !u.stdout.waitFor("WARNING: Support for IPv6 is experimental", 5*time.Second) {
		t.Errorf("no IPv6 warning:\n%s", &u.stdout)
	}
	// SLAAC from the stack's router advertisement; the guest does its
	// own duplicate address detection, so wait for the address to settle.
	var out string
	for i := 0; ; i++ {
		out = wd.inSandbox(sb, "sh", "-c", "ip -6 addr show dev tap0; ip -6 route")
		if strings.Contains(out, "inet6 fd00::") && !strings.Contains(out, "tentative") && strings.Contains(out, "default via fe80::2") {
			break
		}
		if i == 100 {
			t.Fatalf("no SLAAC address and default route from the router advertisement:\n%s", out)
		}
		time.Sleep(50 * time.Millisecond)
	}
	const size = 16 << 20
	checkEcho(t, result{stdout: wd.inSandbox(sb, bins.nettool, "tcp-echo-check", "["+remoteAddr6+"]:7", fmt.Sprint(size))}, size)
	checkEcho(t, result{stdout: wd.inSandbox(sb, bins.nettool, "tcp-echo-check", "[fd00::2]:8080", "1048576")}, 1<<20)
	if out := wd.inSandbox(sb, bins.nettool, "dns-query", "[fd00::3]:53", testName, "udp"); !strings.Contains(out, "A "+testNameIP) {
		t.Errorf("dns over fd00::3: %s", out)
	}
	if os.Getenv("USERNET_UNDER_TEST") == "" {
		// Our extension with -6: API forwards to the guest's IPv6
		// address, which see IPv6 clients as they are.
		guest6 := regexp.MustCompile(`inet6 (fd00::[0-9a-f:]+)/64`).FindStringSubmatch(out)
		if guest6 == nil {
			t.Fatalf("no guest address in:\n%s", out)
		}
		for _, proto := range []string{"tcp", "udp"} {
			wd.startInSandbox(sb, bins.nettool, "peer-server", proto, "[::]:9000")
			req := fmt.Sprintf(`{"execute":"add_hostfwd","arguments":{"proto":%q,"host_addr":"::","host_port":19400,"guest_addr":%q,"guest_port":9000}}`, proto, guest6[1])
			if got := apiCall(t, sock, req); !strings.HasPrefix(got, `{"return":{"id":`) {
				t.Fatalf("add_hostfwd to %s: %s", guest6[1], got)
			}
		}
		for _, c := range []struct{ ns, addr, want string }{
			{wd.w, "[::1]:19400", "[fd00::2]"},
			{wd.r, "[" + worldAddr6 + "]:19400", "[" + routerAddr6 + "]"},
		} {
			for _, proto := range []string{"tcp", "udp"} {
				var got string
				// The server may still be starting: ask again for a while.
				for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(100 * time.Millisecond) {
					b, _ := exec.Command("ip", "netns", "exec", c.ns, bins.nettool, "peer-query", proto, c.addr).CombinedOutput()
					if got = strings.TrimSpace(string(b)); strings.HasPrefix(got, "peer=") {
						break
					}
				}
				if !strings.HasPrefix(got, "peer="+c.want+":") {
					t.Errorf("%s %s from %s: guest saw %q, want %s", proto, c.addr, c.ns, got, c.want)
				}
			}
		}
	}
	if code := u.stop(t); code != 0 {
		t.Errorf("exit status %d\n%s", code, &u.stderr)
	}
}

func TestUsernetOptions(t *testing.T) {
	wd := newWorld(t)
	wd.startServer(wd.w, "peer-server", "tcp", "127.0.0.1:9100")
	wd.startServer(wd.r, "dns-server", routerAddr+":53", testName+"="+testNameIP)

	// --macaddress and --outbound-addr given as an interface name: host
	// sockets, even to the host's loopback, leave from veth0's address.
	sb := wd.startSandbox()
	wd.startUsernet("-c", "--macaddress=52:54:00:12:34:56", "--outbound-addr=veth0", fmt.Sprint(sb.pid), "tap0")
	if out := wd.inSandbox(sb, "ip", "link", "show", "dev", "tap0"); !strings.Contains(out, "52:54:00:12:34:56") {
		t.Errorf("--macaddress not applied:\n%s", out)
	}
	if out := wd.inSandbox(sb, bins.nettool, "peer-query", "tcp", "10.0.2.2:9100"); !strings.HasPrefix(out, "peer="+worldAddr+":") {
		t.Errorf("--outbound-addr=veth0: host server saw %q, want %s", out, worldAddr)
	}

	// --disable-host-loopback answers "network unreachable" like
	// slirp4netns; --disable-dns drops DNS queries.
	sb2 := wd.startSandbox()
	wd.startUsernet("-c", "--disable-host-loopback", "--disable-dns", fmt.Sprint(sb2.pid), "tap0")
	if out := wd.inSandbox(sb2, bins.nettool, "tcp-connect", "10.0.2.2:9100"); strings.TrimSpace(out) != "unreachable" {
		t.Errorf("--disable-host-loopback: %q, want unreachable", out)
	}
	cmd := wd.sandboxCommand(sb2, bins.nettool, "dns-query", "10.0.2.3:53", testName, "udp")
	if out, err := cmd.CombinedOutput(); err == nil {
		t.Errorf("--disable-dns: query answered:\n%s", out)
	}
}

// TestUsernetExitsWithItsTarget: when the process it was attached to by
// PID exits, usernet exits on its own within a second, without an exit fd
// hang-up or a signal, and removes its API socket.
func TestUsernetExitsWithItsTarget(t *testing.T) {
	wd := newWorld(t)
	sb := wd.startSandbox()
	sock := apiSocketPath(t)
	u := wd.startUsernet("-c", "-a", sock, fmt.Sprint(sb.pid), "tap0")
	if err := syscall.Kill(sb.pid, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-u.done:
		u.done <- err
		if err != nil {
			t.Errorf("exit: %v\n%s", err, &u.stderr)
		}
	case <-time.After(time.Second + 500*time.Millisecond):
		t.Fatalf("usernet still running 1.5s after its target exited\n%s", &u.stderr)
	}
	if _, err := os.Stat(sock); !os.IsNotExist(err) {
		t.Errorf("api socket left behind: %v", err)
	}
}

// TestUsernetSeccomp: with --enable-sandbox --enable-seccomp the helper
// runs under a syscall filter and still serves TCP, UDP, DNS, ping and the
// API, and exits cleanly.
func TestUsernetSeccomp(t *testing.T) {
	if os.Getenv("USERNET_UNDER_TEST") != "" {
		t.Skip("our filter, not slirp4netns's")
	}
	wd := newWorld(t)
	wd.sysctl(wd.w, "net.ipv4.ping_group_range", "0 2147483647")
	wd.startServer(wd.r, "tcp-echo-server", remoteAddr+":7")
	wd.startServer(wd.r, "udp-echo-server", remoteAddr+":7")
	wd.startServer(wd.r, "dns-server", routerAddr+":53", testName+"="+testNameIP)
	sb := wd.startSandbox()
	sock := apiSocketPath(t)
	u := wd.startUsernet("-c", "--mtu=65520", "--enable-sandbox", "--enable-seccomp", "-a", sock, fmt.Sprint(sb.pid), "tap0")
	status, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", u.cmd.Process.Pid))
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(status), "Seccomp:\t2") {
		t.Errorf("no seccomp filter on the helper:\n%s", status)
	}
	const size = 16 << 20
	checkEcho(t, result{stdout: wd.inSandbox(sb, bins.nettool, "tcp-echo-check", remoteAddr+":7", fmt.Sprint(size))}, size)
	if out := wd.inSandbox(sb, bins.nettool, "udp-echo-check", remoteAddr+":7", "50", "1400"); !strings.Contains(out, "datagrams=50") {
		t.Errorf("udp under seccomp: %s", out)
	}
	if out := wd.inSandbox(sb, bins.nettool, "dns-query", "10.0.2.3:53", testName, "udp"); !strings.Contains(out, "A "+testNameIP) {
		t.Errorf("dns under seccomp: %s", out)
	}
	if _, err := exec.LookPath("ping"); err == nil {
		if out, err := wd.sandboxCommand(sb, "ping", "-c", "2", "-i", "0.2", "-W", "2", remoteAddr).CombinedOutput(); err != nil {
			t.Errorf("ping under seccomp: %v\n%s", err, out)
		}
	}
	// From W: see TestUsernetSandbox.
	if got := wd.userAPICall(sock, `{"execute":"list_hostfwd"}`); got != `{"entries":[]}` {
		t.Errorf("api under seccomp: %s", got)
	}
	if code := u.stop(t); code != 0 {
		t.Errorf("exit status %d\n%s", code, &u.stderr)
	}
	if _, err := os.Stat(sock); !os.IsNotExist(err) {
		t.Errorf("api socket left behind: %v", err)
	}
}

// The runtime's pipes (-r, -e) stay with usernet: the helpers it starts
// (the published ports' helper in the container's namespaces) do not hold
// them, or the runtime would see usernet's end of them only once those
// exited too. (With --enable-sandbox, TestMultiQueueTAP's runs check that
// the sandboxed copy still has them.)
func TestUsernetHelpersHoldNoRuntimePipe(t *testing.T) {
	wd := newWorld(t)
	sb := wd.startSandbox()
	sock := apiSocketPath(t)
	u := wd.startUsernet("-c", "--api-socket", sock, fmt.Sprint(sb.pid), "tap0")
	// A published port, and a connection through it: its helper starts.
	wd.startInSandbox(sb, bins.nettool, "tcp-echo-server", "0.0.0.0:9093")
	if got := apiCall(t, sock, `{"execute":"add_hostfwd","arguments":{"proto":"tcp","host_addr":"127.0.0.1","host_port":19093,"guest_port":9093}}`); got != `{"return":{"id":1}}` {
		t.Fatalf("add_hostfwd: %s", got)
	}
	checkEcho(t, result{stdout: wd.client(wd.w, "tcp-echo-check", "127.0.0.1:19093", "65536")}, 65536)
	var st unix.Stat_t
	if err := unix.Fstat(int(u.exitW.Fd()), &st); err != nil {
		t.Fatal(err)
	}
	pipe := fmt.Sprintf("pipe:[%d]", st.Ino)
	helpers := descendants(u.cmd.Process.Pid)
	if len(helpers) == 0 {
		t.Fatal("usernet started no helper")
	}
	// The helpers joined the container's user namespace, where its root
	// has every capability: they must not be open to it (their /proc
	// entries lead to the host's files, ptrace to the host's mount
	// namespace).
	for _, pid := range helpers {
		if out, err := wd.sandboxCommand(sb, "cat", fmt.Sprintf("/proc/%d/environ", pid)).CombinedOutput(); err == nil {
			t.Errorf("the container's root reads helper %d's environment (%d bytes)", pid, len(out))
		}
	}
	for _, pid := range helpers {
		fds, _ := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
		for _, fd := range fds {
			if target, _ := os.Readlink(fmt.Sprintf("/proc/%d/fd/%s", pid, fd.Name())); target == pipe {
				comm, _ := os.ReadFile(fmt.Sprintf("/proc/%d/comm", pid))
				t.Errorf("helper %d (%s) holds the exit fd's pipe as fd %s", pid, strings.TrimSpace(string(comm)), fd.Name())
			}
		}
	}
	if code := u.stop(t); code != 0 {
		t.Errorf("exit status %d\n%s", code, &u.stderr)
	}
}

// descendants lists the processes below pid (children of any of their
// threads).
func descendants(pid int) []int {
	var all []int
	for next := []int{pid}; len(next) > 0; {
		p := next[0]
		next = next[1:]
		tasks, _ := filepath.Glob(fmt.Sprintf("/proc/%d/task/*/children", p))
		for _, task := range tasks {
			b, _ := os.ReadFile(task)
			for _, f := range strings.Fields(string(b)) {
				if c, err := strconv.Atoi(f); err == nil {
					all = append(all, c)
					next = append(next, c)
				}
			}
		}
	}
	return all
}
