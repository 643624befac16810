package test

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

// TestUsernetSandboxNamespacePaths: a runtime whose runtime directory is
// outside /etc and /run (XDG_RUNTIME_DIR under /tmp or a home directory),
// or that reaches the namespaces through /proc/PID/..., passes such paths
// with --enable-sandbox. The sandboxed helper no longer sees them; it must
// not need to (issue 18: it looked the path up again inside the sandbox
// and exited 1).
func TestUsernetSandboxNamespacePaths(t *testing.T) {
	if os.Getenv("USERNET_UNDER_TEST") != "" {
		t.Skip("our sandbox, not slirp4netns's")
	}
	wd := newWorld(t)
	wd.startServer(wd.r, "tcp-echo-server", remoteAddr+":7")
	runtimeDir := userDir(t, "usernet-xdg-")
	if err := os.Mkdir(filepath.Join(runtimeDir, "netns"), 0o755); err != nil {
		t.Fatal(err)
	}
	cases := []struct {
		name string
		// paths gives usernet's namespace arguments for the container.
		paths func(sb *sandboxProc) (netns, userns string)
		// inUserNS runs usernet as root of the container's user
		// namespace, without --userns-path, as podman does.
		inUserNS bool
	}{
		{name: "runtime directory", paths: func(sb *sandboxProc) (string, string) {
			netns := filepath.Join(runtimeDir, "netns", fmt.Sprintf("netns-%d", sb.pid))
			userns := filepath.Join(runtimeDir, fmt.Sprintf("userns-%d", sb.pid))
			bindNamespace(t, fmt.Sprintf("/proc/%d/ns/net", sb.pid), netns)
			bindNamespace(t, fmt.Sprintf("/proc/%d/ns/user", sb.pid), userns)
			return netns, userns
		}},
		{name: "/proc/PID/ns", paths: func(sb *sandboxProc) (string, string) {
			return fmt.Sprintf("/proc/%d/ns/net", sb.pid), fmt.Sprintf("/proc/%d/ns/user", sb.pid)
		}},
		{name: "/proc/PID/root", paths: func(sb *sandboxProc) (string, string) {
			// Bound in the container's mount namespace only: the path
			// resolves through its root and nowhere else.
			netns := filepath.Join(runtimeDir, "netns", fmt.Sprintf("in-%d", sb.pid))
			if err := os.WriteFile(netns, nil, 0o644); err != nil {
				t.Fatal(err)
			}
			out, err := exec.Command("nsenter", "-t", fmt.Sprint(sb.pid), "-m", "--",
				"mount", "--bind", fmt.Sprintf("/proc/%d/ns/net", sb.pid), netns).CombinedOutput()
			if err != nil {
				t.Fatalf("bind the namespace in the container's mount namespace: %v\n%s", err, out)
			}
			root := fmt.Sprintf("/proc/%d/root", sb.pid)
			return root + netns, root + fmt.Sprintf("/proc/%d/ns/user", sb.pid)
		}},
		{name: "runtime directory, no --userns-path", inUserNS: true, paths: func(sb *sandboxProc) (string, string) {
			netns := filepath.Join(runtimeDir, "netns", fmt.Sprintf("netns-%d", sb.pid))
			bindNamespace(t, fmt.Sprintf("/proc/%d/ns/net", sb.pid), netns)
			return netns, ""
		}},
	}
	for _, c := range cases {
		sb := wd.startSandbox()
		netns, userns := c.paths(sb)
		args := []string{"-c", "--enable-sandbox", "--enable-seccomp", "--netns-type=path"}
		if userns != "" {
			args = append(args, "--userns-path="+userns)
		}
		args = append(args, netns, "tap0")
		var prefix []string
		if c.inUserNS {
			prefix = []string{"nsenter", "-t", fmt.Sprint(sb.pid), "-U", "--preserve-credentials", "--"}
		}
		u := wd.startUsernetVia(prefix, args...)
		checkSandboxed(t, u.cmd.Process.Pid, append(sandboxStatus, "Seccomp:\t2")...)
		const size = 8 << 20
		checkEcho(t, result{stdout: wd.inSandbox(sb, bins.nettool, "tcp-echo-check", remoteAddr+":7", fmt.Sprint(size))}, size)
		if code := u.stop(t); code != 0 {
			t.Errorf("%s: exit status %d\n%s", c.name, code, &u.stderr)
		}
		t.Logf("%s: %s %v: traffic and sandbox ok", c.name, netns, userns)
	}
}

// bindNamespace bind-mounts the namespace file src on dst, as runtimes
// keep a container's namespaces, until the test ends.
func bindNamespace(t *testing.T, src, dst string) {
	t.Helper()
	if err := os.WriteFile(dst, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := unix.Mount(src, dst, "", unix.MS_BIND, ""); err != nil {
		t.Fatalf("bind %s on %s: %v", src, dst, err)
	}
	t.Cleanup(func() { _ = unix.Unmount(dst, unix.MNT_DETACH) })
}

// sandboxStatus is what /proc/PID/status says of usernet's sandbox: no new
// privileges, no capability but CAP_NET_BIND_SERVICE.
var sandboxStatus = []string{"NoNewPrivs:\t1", "CapEff:\t0000000000000400", "CapBnd:\t0000000000000400"}

// checkSandboxed fails unless process pid is in usernet's sandbox: its root
// holds only etc and run, it holds no handle on the host's filesystem, and
// its status has every line in want.
func checkSandboxed(t *testing.T, pid int, want ...string) {
	t.Helper()
	status, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatal(err)
	}
	for _, w := range want {
		if !strings.Contains(string(status), w) {
			t.Errorf("helper status lacks %q:\n%s", w, status)
		}
	}
	entries, err := os.ReadDir(fmt.Sprintf("/proc/%d/root", pid))
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, e := range entries {
		names = append(names, e.Name())
	}
	if strings.Join(names, ",") != "etc,run" {
		t.Errorf("sandbox root holds %v, want only etc and run", names)
	}
	// Every mount in the sandbox is read-only, also those below /run and
	// /etc (/run/netns, /run/user/UID), not only the binds' tops.
	mounts, err := os.ReadFile(fmt.Sprintf("/proc/%d/mountinfo", pid))
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(strings.TrimSpace(string(mounts)), "\n") {
		f := strings.Fields(line)
		if len(f) < 6 || f[4] == "/" {
			continue
		}
		if !slices.Contains(strings.Split(f[5], ","), "ro") {
			t.Errorf("sandbox mount %s is writable: %s", f[4], line)
		}
	}
	checkNoHostPaths(t, pid)
}
