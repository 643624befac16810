package test

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// Addresses of the test world (documentation ranges only).
const (
	worldAddr  = "203.0.113.1"   // W, where the helper runs ("the host")
	routerAddr = "203.0.113.10"  // R, test router and DNS server
	remoteAddr = "198.51.100.10" // a test host behind R

	// expiringAddr is routed through R, so TTL 1 expires there.
	expiringAddr = "198.51.100.20"
	// unreachableAddr has no route on R: host/net unreachable.
	unreachableAddr = "198.51.100.30"

	worldAddr6  = "2001:db8:1::1"
	routerAddr6 = "2001:db8:1::10"
	remoteAddr6 = "2001:db8:2::10"
)

// world is W ("the host", where netns-run runs) linked by veth to R (the
// test hosts and their router):
//
//	W 203.0.113.1/24 --veth-- R 203.0.113.10/24, lo 198.51.100.10/32
//
// W's resolver is R (via /etc/netns/W/resolv.conf, which `ip netns exec`
// bind-mounts), so nothing queries the machine's real resolver.
type world struct {
	t      *testing.T
	w, r   string
	etcDir string
}

var worldSeq atomic.Int64

func newWorld(t *testing.T) *world {
	t.Helper()
	requireRoot(t)
	id := fmt.Sprintf("nrt%d-%d", os.Getpid(), worldSeq.Add(1))
	wd := &world{t: t, w: id + "-w", r: id + "-r", etcDir: filepath.Join("/etc/netns", id+"-w")}
	for _, ns := range []string{wd.w, wd.r} {
		wd.ip("netns", "add", ns)
		ns := ns
		t.Cleanup(func() { _ = exec.Command("ip", "netns", "del", ns).Run() })
	}
	if err := os.MkdirAll(wd.etcDir, 0o755); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(wd.etcDir) })
	wd.setResolver(routerAddr)

	// Interface names are per namespace, so both ends can be "veth0".
	wd.ip("-n", wd.w, "link", "add", "veth0", "type", "veth", "peer", "name", "veth0", "netns", wd.r)
	for _, ns := range []string{wd.w, wd.r} {
		wd.ip("-n", ns, "link", "set", "lo", "up")
		wd.ip("-n", ns, "link", "set", "veth0", "up")
	}
	wd.ip("-n", wd.w, "addr", "add", worldAddr+"/24", "dev", "veth0")
	wd.ip("-n", wd.w, "route", "add", "default", "via", routerAddr)
	wd.ip("-n", wd.r, "addr", "add", routerAddr+"/24", "dev", "veth0")
	wd.ip("-n", wd.r, "addr", "add", remoteAddr+"/32", "dev", "lo")
	// Anything else R is asked for is unreachable: no traffic loops or
	// leaves the world.
	wd.ip("-n", wd.r, "route", "add", "unreachable", "default")
	// R routes 198.51.100.20 back to W, so a probe with TTL 1 expires on R
	// (time exceeded, for traceroute tests) and nothing loops: W does not
	// forward.
	wd.ip("-n", wd.r, "route", "add", expiringAddr+"/32", "via", worldAddr)
	wd.sysctl(wd.r, "net.ipv4.ip_forward", "1")
	// The same in IPv6; nodad so the addresses work at once.
	wd.ip("-n", wd.w, "addr", "add", worldAddr6+"/64", "dev", "veth0", "nodad")
	wd.ip("-n", wd.w, "-6", "route", "add", "default", "via", routerAddr6)
	wd.ip("-n", wd.r, "addr", "add", routerAddr6+"/64", "dev", "veth0", "nodad")
	wd.ip("-n", wd.r, "addr", "add", remoteAddr6+"/128", "dev", "lo", "nodad")
	wd.ip("-n", wd.r, "-6", "route", "add", "unreachable", "default")
	return wd
}

func (wd *world) ip(args ...string) {
	wd.t.Helper()
	out, err := exec.Command("ip", args...).CombinedOutput()
	if err != nil {
		wd.t.Fatalf("ip %s: %v\n%s", strings.Join(args, " "), err, out)
	}
}

// sysctl sets a per-network-namespace sysctl in ns.
func (wd *world) sysctl(ns, key, value string) {
	wd.t.Helper()
	out, err := exec.Command("ip", "netns", "exec", ns, "sysctl", "-qw", key+"="+value).CombinedOutput()
	if err != nil {
		wd.t.Fatalf("sysctl %s=%s in %s: %v\n%s", key, value, ns, err, out)
	}
}

// setResolver makes name lookups in W (the helper's upstream) go to addr.
func (wd *world) setResolver(addr string) {
	wd.t.Helper()
	conf := fmt.Sprintf("nameserver %s\n", addr)
	if err := os.WriteFile(filepath.Join(wd.etcDir, "resolv.conf"), []byte(conf), 0o644); err != nil {
		wd.t.Fatal(err)
	}
}

// startServer runs `nettool ARGS...` as root in namespace ns until the test
// ends and waits for its "listening" line.
func (wd *world) startServer(ns string, args ...string) {
	wd.t.Helper()
	cmd := exec.Command("ip", append([]string{"netns", "exec", ns, bins.nettool}, args...)...)
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		wd.t.Fatal(err)
	}
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		wd.t.Fatal(err)
	}
	wd.t.Cleanup(func() {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
	})
	if err := awaitListening(stdout); err != nil {
		wd.t.Fatalf("server %v in %s: %v\n%s", args, ns, err, stderr.String())
	}
}

// awaitListening waits (up to 10 s) for a nettool server's "listening"
// line on stdout, then discards the rest of its output.
func awaitListening(stdout io.Reader) error {
	ready := make(chan error, 1)
	go func() {
		line, err := bufio.NewReader(stdout).ReadString('\n')
		if err == nil && !strings.HasPrefix(line, "listening") {
			err = fmt.Errorf("unexpected first line %q", line)
		}
		ready <- err
		_, _ = io.Copy(io.Discard, stdout)
	}()
	select {
	case err := <-ready:
		return err
	case <-time.After(10 * time.Second):
		return errors.New("did not start")
	}
}

// result is what one netns-run invocation did.
type result struct {
	stdout, stderr string
	code           int
}

func (r result) String() string {
	return fmt.Sprintf("exit %d\nstdout:\n%s\nstderr:\n%s", r.code, r.stdout, r.stderr)
}

// guestCommand prepares `netns-run FLAGS -- CMD...` as the unprivileged
// user inside W.
func (wd *world) guestCommand(ctx context.Context, flags []string, cmdline ...string) *exec.Cmd {
	return wd.guestCommandCaps(ctx, "", flags, cmdline...)
}

func (wd *world) guestCommandCaps(ctx context.Context, caps string, flags []string, cmdline ...string) *exec.Cmd {
	args := []string{"netns", "exec", wd.w,
		"setpriv", fmt.Sprintf("--reuid=%d", unprivUID), fmt.Sprintf("--regid=%d", unprivUID), "--clear-groups"}
	if caps != "" {
		args = append(args, "--inh-caps="+caps, "--ambient-caps="+caps)
	}
	args = append(args, "--", bins.netnsRun)
	args = append(args, flags...)
	args = append(args, "--")
	args = append(args, cmdline...)
	cmd := exec.CommandContext(ctx, "ip", args...)
	cmd.Dir = "/"
	cmd.WaitDelay = 5 * time.Second
	return cmd
}

// runGuestCaps is runGuest with ambient capabilities (e.g. "+net_raw")
// given to the unprivileged user.
func (wd *world) runGuestCaps(caps string, flags []string, cmdline ...string) result {
	wd.t.Helper()
	return wd.run(wd.guestCommandCaps(context.Background(), caps, flags, cmdline...))
}

// runGuest runs CMD under netns-run in W and returns what happened; it
// fails the test only if the run could not happen at all.
func (wd *world) runGuest(flags []string, cmdline ...string) result {
	wd.t.Helper()
	return wd.run(wd.guestCommand(context.Background(), flags, cmdline...))
}

// run runs a prepared netns-run command with a time limit.
func (wd *world) run(cmd *exec.Cmd) result {
	wd.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	stop := context.AfterFunc(ctx, func() {
		if cmd.Process != nil {
			_ = cmd.Process.Kill()
		}
	})
	defer stop()
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	res := result{stdout: stdout.String(), stderr: stderr.String()}
	var ee *exec.ExitError
	switch {
	case err == nil:
	case errors.As(err, &ee):
		res.code = ee.ExitCode()
		if ws, ok := ee.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
			res.code = 128 + int(ws.Signal())
		}
	default:
		wd.t.Fatalf("run netns-run: %v\n%s", err, res)
	}
	if ctx.Err() != nil {
		wd.t.Fatalf("netns-run did not finish in time\n%s", res)
	}
	return res
}

// startGuestScript runs `sh -c script` under netns-run FLAGS in W until the
// test ends and returns its stdout to read as it goes. At the end it gets
// SIGTERM, and SIGKILL a minute after it started.
func (wd *world) startGuestScript(flags []string, script string) *bufio.Reader {
	t := wd.t
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	// A cleanup, not a defer: cancelling kills netns-run with SIGKILL,
	// which must come after the SIGTERM cleanup below has let it finish.
	t.Cleanup(cancel)
	cmd := wd.guestCommand(ctx, flags, "sh", "-c", script)
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = cmd.Process.Signal(syscall.SIGTERM); _ = cmd.Wait() })
	return bufio.NewReader(stdout)
}

// mustRunGuest is runGuest that expects exit status 0.
func (wd *world) mustRunGuest(flags []string, cmdline ...string) result {
	wd.t.Helper()
	res := wd.runGuest(flags, cmdline...)
	if res.code != 0 {
		wd.t.Fatalf("netns-run %v -- %v failed:\n%s", flags, cmdline, res)
	}
	return res
}

// processesWith lists the PIDs whose command line contains token.
func processesWith(token string) []string {
	entries, _ := os.ReadDir("/proc")
	var pids []string
	for _, e := range entries {
		b, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if err != nil {
			continue
		}
		if bytes.Contains(b, []byte(token)) {
			pids = append(pids, e.Name())
		}
	}
	return pids
}
