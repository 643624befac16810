package test

import (
	"fmt"
	"os"
	"strings"
	"testing"
)

// TestUsernetMultiQueue: with two Ps usernet opens the TAP with two queues,
// as netns-run does (in both modes, and across the re-exec into its
// sandbox), and the guest's flows use both; a TAP the runtime created
// without IFF_MULTI_QUEUE gets one queue and works.
func TestUsernetMultiQueue(t *testing.T) {
	if os.Getenv("USERNET_UNDER_TEST") != "" {
		t.Skip("slirp4netns opens one queue")
	}
	// On two CPUs the helper would take one P (cli.SetProcs).
	t.Setenv("GOMAXPROCS", "2")
	wd := newWorld(t)
	wd.startServer(wd.r, "tcp-echo-server", remoteAddr+":7")
	const conns = "32"
	for _, flags := range [][]string{{"-c"}, {"-c", "--enable-sandbox", "--enable-seccomp"}} {
		sb := wd.startSandbox()
		u := wd.startUsernet(append(flags, fmt.Sprint(sb.pid), "tap0")...)
		if link := wd.inSandbox(sb, "ip", "-d", "link", "show", "tap0"); !strings.Contains(link, "multi_queue numqueues 2 ") {
			t.Errorf("%v: want a TAP with two queues:\n%s", flags, link)
		}
		if got := strings.TrimSpace(wd.inSandbox(sb, bins.nettool, "tcp-echo-many", remoteAddr+":7", conns, "262144")); got != "conns="+conns+" ok="+conns {
			t.Errorf("%v: %s", flags, got)
		}
		checkQueuesUsed(t, wd.inSandbox(sb, "tc", "-s", "qdisc", "show", "dev", "tap0"))
		if code := u.stop(t); code != 0 {
			t.Errorf("%v: exit status %d\n%s", flags, code, &u.stderr)
		}
	}

	// Created beforehand without IFF_MULTI_QUEUE, as rootlesskit's and
	// slirp4netns's users may.
	sb := wd.startSandbox()
	wd.inSandbox(sb, "ip", "tuntap", "add", "name", "tap0", "mode", "tap")
	u := wd.startUsernet("-c", "--enable-sandbox", fmt.Sprint(sb.pid), "tap0")
	if link := wd.inSandbox(sb, "ip", "-d", "link", "show", "tap0"); strings.Contains(link, "multi_queue") || !strings.Contains(link, "vnet_hdr on") {
		t.Errorf("existing single-queue TAP: want it attached as it is, with offloads:\n%s", link)
	}
	const size = 8 << 20
	checkEcho(t, result{stdout: wd.inSandbox(sb, bins.nettool, "tcp-echo-check", remoteAddr+":7", fmt.Sprint(size))}, size)
	if code := u.stop(t); code != 0 {
		t.Errorf("existing single-queue TAP: exit status %d\n%s", code, &u.stderr)
	}

	// Pasta mode, as podman runs it.
	nsPath := wd.containerNetns()
	if out, code := wd.runPasta(pastaLink(t), podmanArgs(nsPath)...); code != 0 {
		t.Fatalf("pasta exited %d:\n%s", code, out)
	}
	daemonsFor(t, nsPath)
	if link := inNetns(t, nsPath, "ip", "-d", "link", "show", "veth0"); !strings.Contains(link, "multi_queue numqueues 2 ") {
		t.Errorf("pasta mode: want a TAP with two queues:\n%s", link)
	}
	if got := strings.TrimSpace(inNetns(t, nsPath, bins.nettool, "tcp-echo-many", remoteAddr+":7", conns, "262144")); got != "conns="+conns+" ok="+conns {
		t.Errorf("pasta mode: %s", got)
	}
	checkQueuesUsed(t, inNetns(t, nsPath, "tc", "-s", "qdisc", "show", "dev", "veth0"))
}

// checkQueuesUsed fails unless `tc -s qdisc show` of a multi-queue TAP
// shows frames sent (guest to helper) on at least two of its queues' qdiscs.
func checkQueuesUsed(t *testing.T, qdiscs string) {
	t.Helper()
	var used []int
	lines := strings.Split(qdiscs, "\n")
	for i, l := range lines {
		if !strings.Contains(l, " parent :") || i+1 == len(lines) {
			continue
		}
		var bytes, pkts int
		if _, err := fmt.Sscanf(strings.TrimSpace(lines[i+1]), "Sent %d bytes %d pkt", &bytes, &pkts); err == nil && pkts > 0 {
			used = append(used, pkts)
		}
	}
	if len(used) < 2 {
		t.Errorf("the guest's flows used %d TAP queue(s), want 2:\n%s", len(used), qdiscs)
	}
	t.Logf("frames from the guest per TAP queue: %v", used)
}
