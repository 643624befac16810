package test

import (
	"os/exec"
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
