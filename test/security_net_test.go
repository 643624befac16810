package test

import (
	"fmt"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// localRouted is in a range W routes `local` (on lo) although no interface
// has such an address: the host's own, as far as its kernel is concerned.
const localRouted = "198.51.100.130"

// TestDisableHostLoopbackLocalRoutes is the regression test for the bypass
// of --disable-host-loopback through a local route: services on such an
// address are refused to the guest for TCP, UDP and ICMP echo, while a
// remote host still works.
func TestDisableHostLoopbackLocalRoutes(t *testing.T) {
	wd := newWorld(t)
	wd.ip("-n", wd.w, "route", "add", "local", "198.51.100.128/25", "dev", "lo")
	wd.sysctl(wd.w, "net.ipv4.ping_group_range", "0 2147483647")
	wd.startServer(wd.w, "tcp-echo-server", localRouted+":8080")
	wd.startServer(wd.w, "udp-echo-server", localRouted+":8080")
	wd.startServer(wd.r, "tcp-echo-server", remoteAddr+":7")

	// Reachable without the flag: the test would see a bypass.
	if res := wd.mustRunGuest(nil, bins.nettool, "tcp-connect", localRouted+":8080"); strings.TrimSpace(res.stdout) != "connected" {
		t.Fatalf("without --disable-host-loopback the local-routed server should be reachable:\n%s", res)
	}
	block := []string{"--disable-host-loopback"}
	if res := wd.mustRunGuest(block, bins.nettool, "tcp-connect", localRouted+":8080"); strings.TrimSpace(res.stdout) != "unreachable" {
		t.Errorf("TCP to a local-routed address: want unreachable:\n%s", res)
	}
	if res := wd.mustRunGuest(block, bins.nettool, "udp-probe", localRouted+":8080", "64"); !strings.Contains(res.stdout, "icmp type=3 code=0") {
		t.Errorf("UDP to a local-routed address: want ICMP network unreachable:\n%s", res)
	}
	if _, err := exec.LookPath("ping"); err == nil {
		if res := wd.runGuest(block, "ping", "-c", "1", "-W", "2", localRouted); strings.Contains(res.stdout, " 1 received") {
			t.Errorf("ping to a local-routed address answered:\n%s", res)
		}
	}
	res := wd.mustRunGuest(block, bins.nettool, "tcp-echo-check", remoteAddr+":7", "1048576")
	checkEcho(t, res, 1<<20)
}

// addForward is an add_hostfwd a guest would send to open a host port.
const addForward = `{"execute":"add_hostfwd","arguments":{"proto":"tcp","host_addr":"127.0.0.1","host_port":19811,"guest_port":80}}`

// TestAPIRefusesGuest: a command inside netns-run, which runs as the same
// user and sees the same files, cannot use the API socket (neither from a
// user namespace of its own inside); the host side still can.
func TestAPIRefusesGuest(t *testing.T) {
	wd := newWorld(t)
	sock := filepath.Join(userDir(t, "netns-run-api-"), "api.sock")
	call := fmt.Sprintf("%s api-call %s '%s'", bins.nettool, sock, addForward)
	script := fmt.Sprintf("%s; unshare --user %s; echo done; exec %s sleep api-guest", call, call, bins.nettool)
	r := wd.startGuestScript([]string{"--disable-host-loopback", "--api-socket", sock}, script)
	for _, who := range []string{"guest", "guest in a nested user namespace"} {
		line, _ := r.ReadString('\n')
		if !strings.HasPrefix(line, `{"error":{"desc":"permission denied: `) {
			t.Errorf("%s's add_hostfwd: %q, want slirp4netns's error shape with permission denied", who, line)
		}
	}
	if line, _ := r.ReadString('\n'); strings.TrimSpace(line) != "done" {
		t.Fatalf("guest script: %q", line)
	}
	if got := apiCall(t, sock, `{"execute":"list_hostfwd"}`); got != `{"entries":[]}` {
		t.Errorf("host-side list after the guest's attempts: %s", got)
	}
	if got := apiCall(t, sock, addForward); got != `{"return":{"id":1}}` {
		t.Errorf("host-side add_hostfwd: %s", got)
	}
}

// TestUsernetAPIRefusesGuest: the same for usernet, with and without the
// sandbox and seccomp filter (where /proc is out of reach).
func TestUsernetAPIRefusesGuest(t *testing.T) {
	for _, extra := range [][]string{nil, {"--enable-sandbox", "--enable-seccomp"}} {
		t.Run(strings.Join(append([]string{"plain"}, extra...), ""), func(t *testing.T) {
			wd := newWorld(t)
			sb := wd.startSandbox()
			sock := apiSocketPath(t)
			args := append(append([]string{"-c", "--disable-host-loopback"}, extra...), "-a", sock, fmt.Sprint(sb.pid), "tap0")
			wd.startUsernet(args...)
			if got := wd.inSandbox(sb, bins.nettool, "api-call", sock, addForward); !strings.HasPrefix(got, `{"error":{"desc":"permission denied: `) {
				t.Errorf("guest's add_hostfwd: %s", got)
			}
			// From W, where usernet runs: inside the sandbox it may
			// inspect hardly any caller, and serves only those in its
			// own network namespace.
			if got := wd.userAPICall(sock, addForward); got != `{"return":{"id":1}}` {
				t.Errorf("host-side add_hostfwd: %s", got)
			}
		})
	}
}

// userAPICall is apiCall made by the unprivileged user in W (where the
// helpers run) instead of by root in the test's namespaces.
func (wd *world) userAPICall(sock, req string) string {
	wd.t.Helper()
	out, err := exec.Command("ip", "netns", "exec", wd.w, "setpriv", fmt.Sprintf("--reuid=%d", unprivUID), fmt.Sprintf("--regid=%d", unprivUID),
		"--clear-groups", "--", bins.nettool, "api-call", sock, req).CombinedOutput()
	if err != nil {
		wd.t.Fatalf("api-call as uid %d: %v\n%s", unprivUID, err, out)
	}
	return strings.TrimSpace(string(out))
}
