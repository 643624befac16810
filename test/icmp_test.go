package test

import (
	"fmt"
	"os/exec"
	"strings"
	"sync"
	"testing"
)

// The ICMP tests run ping (iputils) inside netns-run, with the world's
// net.ipv4.ping_group_range set each way.

func requirePing(t *testing.T) {
	t.Helper()
	if _, err := exec.LookPath("ping"); err != nil {
		t.Skip("needs ping (iputils-ping; .ci/run installs it)")
	}
}

func TestPingWithPingSockets(t *testing.T) {
	requirePing(t)
	wd := newWorld(t)
	wd.sysctl(wd.w, "net.ipv4.ping_group_range", "0 2147483647")
	res := wd.mustRunGuest([]string{"--debug"}, "ping", "-c", "3", "-i", "0.05", "-W", "2", remoteAddr)
	if !strings.Contains(res.stdout, "3 received") {
		t.Errorf("ping through ping sockets:\n%s", res)
	}
	if !strings.Contains(res.stderr, "ipv4=\"ping socket\"") {
		t.Errorf("helper did not choose ping sockets:\n%s", res.stderr)
	}
	// Three ping processes at once each get their own 20 replies.
	var wg sync.WaitGroup
	results := make([]result, 3)
	for i := range results {
		wg.Add(1)
		go func() {
			defer wg.Done()
			results[i] = wd.runGuest(nil, "ping", "-c", "20", "-i", "0.02", "-W", "2", remoteAddr)
		}()
	}
	wg.Wait()
	for i, r := range results {
		if !strings.Contains(r.stdout, "20 packets transmitted, 20 received") {
			t.Errorf("concurrent ping %d:\n%s", i, r)
		}
	}
	// A ping that expires on the router reports it, as traceroute needs.
	res = wd.runGuest(nil, "ping", "-c", "1", "-t", "1", "-W", "2", expiringAddr)
	if !strings.Contains(res.stdout, "From "+routerAddr) || !strings.Contains(strings.ToLower(res.stdout), "time to live exceeded") {
		t.Errorf("ping with TTL 1: want time exceeded from %s:\n%s", routerAddr, res)
	}
}

func TestPingWithRawSocket(t *testing.T) {
	requirePing(t)
	wd := newWorld(t)
	wd.sysctl(wd.w, "net.ipv4.ping_group_range", "1 0")
	// Run netns-run with CAP_NET_RAW (ambient) and ping sockets disabled.
	// A raw socket on the host needs CAP_NET_RAW in the host's user
	// namespace, which the sandboxed engine (its own user namespace, no
	// capabilities) never has: the raw path runs in netns-run's process.
	res := wd.runGuestCaps("+net_raw", []string{"--debug", "--no-sandbox"}, "ping", "-c", "3", "-i", "0.05", "-W", "2", remoteAddr)
	if res.code != 0 || !strings.Contains(res.stdout, "3 received") {
		t.Errorf("ping through a raw socket:\n%s", res)
	}
	if !strings.Contains(res.stderr, "ipv4=\"raw socket\"") {
		t.Errorf("helper did not choose a raw socket:\n%s", res.stderr)
	}
	res = wd.runGuestCaps("+net_raw", []string{"--no-sandbox"}, "ping", "-c", "1", "-t", "1", "-W", "2", expiringAddr)
	if !strings.Contains(res.stdout, "From "+routerAddr) {
		t.Errorf("raw ping with TTL 1: want time exceeded from %s:\n%s", routerAddr, res)
	}
}

func TestPingUnavailableSaysWhy(t *testing.T) {
	requirePing(t)
	wd := newWorld(t)
	wd.sysctl(wd.w, "net.ipv4.ping_group_range", "1 0")
	res := wd.runGuest(nil, "ping", "-c", "2", "-i", "0.2", "-W", "1", remoteAddr)
	if res.code == 0 || strings.Contains(res.stdout, " received, 0%") {
		t.Errorf("ping succeeded without ping sockets or CAP_NET_RAW (replies must never be forged):\n%s", res)
	}
	if strings.Count(res.stderr, "ping to outside hosts is unavailable") != 1 || !strings.Contains(res.stderr, "net.ipv4.ping_group_range") {
		t.Errorf("want exactly one message naming net.ipv4.ping_group_range:\n%s", res.stderr)
	}
	// The gateway still answers: it is the helper's own address.
	if res := wd.runGuest(nil, "ping", "-c", "1", "-W", "2", "10.0.2.2"); res.code != 0 {
		t.Errorf("ping 10.0.2.2:\n%s", res)
	}
}

func TestUDPErrorsReachTheGuest(t *testing.T) {
	wd := newWorld(t)
	cases := []struct{ addr, ttl, want string }{
		{remoteAddr + ":9", "64", "connection refused icmp type=3 code=3 from=" + remoteAddr},
		{expiringAddr + ":33434", "1", fmt.Sprintf("icmp type=11 code=0 from=%s", routerAddr)},
		{unreachableAddr + ":33434", "64", "icmp type=3 code="},
	}
	for _, c := range cases {
		res := wd.mustRunGuest(nil, bins.nettool, "udp-probe", c.addr, c.ttl)
		if !strings.Contains(strings.TrimSpace(res.stdout), c.want) {
			t.Errorf("udp probe %s ttl %s: got %q, want %q", c.addr, c.ttl, strings.TrimSpace(res.stdout), c.want)
		}
	}
}

// TestTCPConnectFailures: a connection the host cannot make fails in the
// guest as it would have on the host: refused as a reset, an unreachable
// host as ICMP unreachable.
func TestTCPConnectFailures(t *testing.T) {
	wd := newWorld(t)
	for addr, want := range map[string]string{
		remoteAddr + ":81":      "refused",
		unreachableAddr + ":80": "unreachable",
	} {
		res := wd.mustRunGuest(nil, bins.nettool, "tcp-connect", addr)
		if got := strings.TrimSpace(res.stdout); got != want {
			t.Errorf("connect %s: %q, want %q", addr, got, want)
		}
	}
}
