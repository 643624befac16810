package test

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"
)

// dhcpScript is a udhcpc event script that configures the lease and prints
// what the server gave, one line per event:
//
//	bound ip=10.0.2.15 subnet=255.255.255.0 router=10.0.2.2 dns=10.0.2.3 lease=86400 serverid=10.0.2.2
const dhcpScript = `#!/bin/sh
case "$1" in
deconfig) ip link set "$interface" up ;;
bound) ip addr replace "$ip/$mask" dev "$interface" && ip route replace default via "$router" ;;
esac
case "$1" in
bound|renew) echo "$1 ip=$ip subnet=$subnet router=$router dns=$dns lease=$lease serverid=$serverid" ;;
nak) echo "nak $message" ;;
esac
`

// udhcpcCommand is busybox's DHCP client (Debian's udhcpc package, or busybox
// itself).
func udhcpcCommand(t *testing.T) []string {
	t.Helper()
	if p, err := exec.LookPath("udhcpc"); err == nil {
		return []string{p}
	}
	if p, err := exec.LookPath("busybox"); err == nil {
		return []string{p, "udhcpc"}
	}
	t.Skip("no udhcpc (apt-get install udhcpc)")
	return nil
}

// TestUsernetDHCP: without -c the guest configures itself as with
// slirp4netns: `udhcpc -q -i tap0` in an unconfigured namespace gets
// 10.0.2.15 with router, DNS, netmask and a 24 h lease from the gateway;
// --cidr moves all of it, --disable-dns leaves DNS out, and a renewal (sent
// to the gateway's address, also with --disable-host-loopback) keeps the
// address. The lease then carries traffic.
func TestUsernetDHCP(t *testing.T) {
	udhcpc := udhcpcCommand(t)
	wd := newWorld(t)
	wd.startServer(wd.r, "tcp-echo-server", remoteAddr+":7")
	script := filepath.Join(userDir(t, "usernet-dhcp-"), "script")
	if err := os.WriteFile(script, []byte(dhcpScript), 0o755); err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		flags []string
		want  string
	}{
		{nil, "ip=10.0.2.15 subnet=255.255.255.0 router=10.0.2.2 dns=10.0.2.3 lease=86400 serverid=10.0.2.2"},
		{[]string{"--cidr=10.0.3.0/25", "--disable-dns", "--disable-host-loopback"},
			"ip=10.0.3.15 subnet=255.255.255.128 router=10.0.3.2 dns= lease=86400 serverid=10.0.3.2"},
	} {
		t.Run(strings.Join(append([]string{"default"}, c.flags...), " "), func(t *testing.T) {
			sb := wd.startSandbox()
			wd.startUsernet(append(c.flags, fmt.Sprint(sb.pid), "tap0")...)

			// What the issue asks for, verbatim: a one-shot lease.
			out := wd.inSandbox(sb, append(udhcpc, "-q", "-i", "tap0", "-s", script, "-t", "5", "-T", "1", "-n")...)
			if !strings.Contains(out, "bound "+c.want) {
				t.Fatalf("udhcpc -q: want bound %s:\n%s", c.want, out)
			}
			ip := regexp.MustCompile(`ip=(\S+)`).FindStringSubmatch(c.want)[1]
			if c.flags == nil {
				const size = 8 << 20
				checkEcho(t, result{stdout: wd.inSandbox(sb, bins.nettool, "tcp-echo-check", remoteAddr+":7", fmt.Sprint(size))}, size)
			}

			// A client that stays: it asks again from scratch (same
			// address for the same MAC), then renews by unicast.
			var stdout syncBuffer
			cmd := wd.sandboxCommand(sb, append(udhcpc, "-f", "-i", "tap0", "-s", script, "-t", "5", "-T", "1")...)
			cmd.Stdout, cmd.Stderr = &stdout, &stdout
			if err := cmd.Start(); err != nil {
				t.Fatal(err)
			}
			done := make(chan struct{})
			go func() { _ = cmd.Wait(); close(done) }()
			t.Cleanup(func() { _ = cmd.Process.Kill(); <-done })
			if !stdout.waitFor("bound ip="+ip+" ", 15*time.Second) {
				t.Fatalf("second lease: want %s:\n%s", ip, &stdout)
			}
			if err := cmd.Process.Signal(syscall.SIGUSR1); err != nil {
				t.Fatal(err)
			}
			if !stdout.waitFor("renew "+c.want, 15*time.Second) {
				t.Fatalf("renewal: want renew %s:\n%s", c.want, &stdout)
			}
		})
	}
}
