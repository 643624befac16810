package test

import (
	"encoding/json"
	"fmt"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

type processStats struct {
	Return helperFigures `json:"return"`
}

// helperFigures is what the soak and flood tests read of get_stats.
type helperFigures struct {
	Flows struct {
		TCPOpen    int64 `json:"tcp_open"`
		UDPOpen    int64 `json:"udp_open"`
		ICMPOpen   int64 `json:"icmp_open"`
		DNSPending int64 `json:"dns_pending"`
	} `json:"flows"`
	Process struct {
		Goroutines int    `json:"goroutines"`
		FDs        int    `json:"fds"`
		RSSKiB     uint64 `json:"rss_kib"`
	} `json:"process"`
	Drops struct {
		FlowLimit   uint64 `json:"flow_limit"`
		DNSOverload uint64 `json:"dns_overload"`
	} `json:"drops"`
}

// peak keeps the highest of each figure.
func (h *helperFigures) peak(o helperFigures) {
	h.Flows.TCPOpen = max(h.Flows.TCPOpen, o.Flows.TCPOpen)
	h.Flows.UDPOpen = max(h.Flows.UDPOpen, o.Flows.UDPOpen)
	h.Flows.ICMPOpen = max(h.Flows.ICMPOpen, o.Flows.ICMPOpen)
	h.Flows.DNSPending = max(h.Flows.DNSPending, o.Flows.DNSPending)
	h.Process.Goroutines = max(h.Process.Goroutines, o.Process.Goroutines)
	h.Process.FDs = max(h.Process.FDs, o.Process.FDs)
	h.Process.RSSKiB = max(h.Process.RSSKiB, o.Process.RSSKiB)
}

func helperStats(t *testing.T, sock string) processStats {
	t.Helper()
	var st processStats
	if err := json.Unmarshal([]byte(apiCall(t, sock, `{"execute":"get_stats"}`)), &st); err != nil {
		t.Fatal(err)
	}
	return st
}

// detached starts a detached netns-run (as the test user, in W) running the
// publish tests' guest servers and returns its state directory.
func (wd *world) detached(flags ...string) string {
	wd.t.Helper()
	state := filepath.Join(userDir(wd.t, "netns-run-soak-"), "ns")
	wd.t.Cleanup(func() { _, _ = stopDetached(state) })
	res := wd.runGuest(append([]string{"--detach", "--state-dir", state}, flags...), guestServers()...)
	if res.code != 0 {
		wd.t.Fatalf("--detach: %s", res)
	}
	// The servers print "ready" into the daemon's log once they accept.
	for i := 0; ; i++ {
		if b, _ := exec.Command("cat", filepath.Join(state, "log")).Output(); strings.Contains(string(b), "ready") {
			return state
		}
		if i == 200 {
			wd.t.Fatal("guest servers of the detached namespace did not start")
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// TestSoak: many sequential and concurrent connections through the
// forwarder and a published port, 1 GiB each way, and DNS queries as fast
// as a guest can send them; afterwards the helper's goroutines and
// descriptors are back near where they started.
func TestSoak(t *testing.T) {
	if testing.Short() {
		t.Skip("soak test skipped in -short mode")
	}
	wd := newWorld(t)
	wd.startServer(wd.w, "tcp-echo-server", "127.0.0.1:8080")
	wd.startServer(wd.r, "dns-server", routerAddr+":53", testName+"="+testNameIP)
	state := wd.detached("-p", "19900:9001")
	sock := filepath.Join(state, "api.sock")
	// A first exchange warms the pools before the baseline.
	wd.runGuest([]string{"--join", state}, bins.nettool, "tcp-conns", "10.0.2.2:8080", "10", "1")
	before := helperStats(t, sock).Return.Process

	join := func(args ...string) string {
		res := wd.runGuest([]string{"--join", state}, append([]string{bins.nettool}, args...)...)
		if res.code != 0 {
			t.Fatalf("%v: %s", args, res)
		}
		return strings.TrimSpace(res.stdout)
	}
	t.Logf("forwarder, sequential: %s", join("tcp-conns", "10.0.2.2:8080", "10000", "1"))
	t.Logf("forwarder, concurrent: %s", join("tcp-conns", "10.0.2.2:8080", "1000", "1000"))
	t.Logf("published, sequential: %s", wd.client(wd.w, "tcp-conns", "127.0.0.1:19900", "10000", "1"))
	t.Logf("published, concurrent: %s", wd.client(wd.w, "tcp-conns", "127.0.0.1:19900", "1000", "1000"))
	const gib = 1 << 30
	checkEcho(t, result{stdout: join("tcp-echo-check", "10.0.2.2:8080", fmt.Sprint(gib))}, gib)
	checkEcho(t, result{stdout: wd.client(wd.w, "tcp-echo-check", "127.0.0.1:19900", fmt.Sprint(gib))}, gib)
	t.Logf("dns flood: %s", join("dns-flood", "10.0.2.3:53", "3"))
	// The flood's backlog may still drop a query or two: a resolver
	// asks again.
	script := fmt.Sprintf("i=0; until %[1]s dns-query 10.0.2.3:53 %[2]s udp; do i=$((i+1)); [ $i -gt 10 ] && exit 1; done", bins.nettool, testName)
	if res := wd.runGuest([]string{"--join", state}, "sh", "-c", script); !strings.Contains(res.stdout, "A "+testNameIP) {
		t.Errorf("no DNS answer after the flood:\n%s", res)
	}

	var after processStats
	for i := 0; ; i++ {
		after = helperStats(t, sock)
		p := after.Return.Process
		if (p.Goroutines <= before.Goroutines+10 && p.FDs <= before.FDs+10) || i == 100 {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	p := after.Return.Process
	t.Logf("helper before: %+v, after: %+v", before, p)
	if p.Goroutines > before.Goroutines+10 || p.FDs > before.FDs+10 {
		t.Errorf("helper did not return to its baseline: before %+v, after %+v", before, p)
	}
}

// The helper's bounds (netstack's limits): what a hostile guest can make it
// hold at most.
const (
	maxUDPFlows     = 4096 // each a socket and two goroutines
	maxInFlightSYNs = 4096 // each a socket and a goroutine while dialing
	maxPingFlows    = 256  // each a socket and a goroutine
	maxDNSPending   = 1024 // no socket or goroutine of their own
	dnsSockets      = 2 * 6
	rssBound        = 512 << 10 // KiB
)

// silentDNSAddr is a DNS upstream that drops every query without a word
// (a blackhole route on R).
const silentDNSAddr = "198.51.100.53"

// TestFlood: a guest that sprays SYNs and UDP datagrams at 50,000 ports,
// pings with 1000 identifiers and floods the DNS forwarder (whose first
// upstream is silent) does not grow the helper past its bounds, a transfer
// running meanwhile completes, and a resolver's query is answered during
// the DNS flood.
func TestFlood(t *testing.T) {
	if testing.Short() {
		t.Skip("flood test skipped in -short mode")
	}
	wd := newWorld(t)
	wd.startServer(wd.w, "tcp-echo-server", "127.0.0.1:8080")
	wd.ip("-n", wd.r, "route", "add", "blackhole", silentDNSAddr+"/32")
	wd.startServer(wd.r, "dns-server", remoteAddr+":53", testName+"="+testNameIP)
	wd.sysctl(wd.w, "net.ipv4.ping_group_range", "0 2147483647") // the helper pings with ping sockets
	state := wd.detached("--dns-upstream", silentDNSAddr, "--dns-upstream", remoteAddr+":53")
	sock := filepath.Join(state, "api.sock")
	before := helperStats(t, sock).Return

	// Figures are sampled all along, not only at the end (not too often:
	// get_stats lists /proc/self/fd, thousands of entries here).
	var peak helperFigures
	var peakMu sync.Mutex
	sampleDone := make(chan struct{})
	stopSampling := make(chan struct{})
	go func() {
		defer close(sampleDone)
		for {
			select {
			case <-stopSampling:
				return
			case <-time.After(time.Second):
			}
			var st processStats
			if reply, err := apiRequest(sock, `{"execute":"get_stats"}`); err == nil && json.Unmarshal([]byte(reply), &st) == nil {
				peakMu.Lock()
				peak.peak(st.Return)
				peakMu.Unlock()
			}
		}
	}()

	const size = 256 << 20
	transfer := make(chan result, 1)
	go func() {
		transfer <- wd.runGuest([]string{"--join", state}, bins.nettool, "tcp-echo-check", "10.0.2.2:8080", fmt.Sprint(size))
	}()
	join := func(args ...string) result {
		res := wd.runGuest([]string{"--join", state}, args...)
		if res.code != 0 {
			t.Fatalf("%v: %s", args, res)
		}
		return res
	}
	// Pings first: the sprays fill the TAP's queue for a while.
	join(bins.nettool, "ping-spray", remoteAddr, "1000")
	for _, proto := range []string{"udp", "tcp"} {
		join(bins.nettool, "spray", proto, remoteAddr, "10000", "50000")
	}
	sprayed := helperStats(t, sock).Return
	t.Logf("after the sprays: %+v", sprayed)
	// A resolver asks, and asks again, while another process floods.
	script := fmt.Sprintf("%[1]s dns-flood 10.0.2.3:53 10 >/dev/null & i=0; "+
		"until %[1]s dns-query 10.0.2.3:53 %[2]s udp; do i=$((i+1)); [ $i -gt 20 ] && break; sleep 0.2; done; wait", bins.nettool, testName)
	if res := join("sh", "-c", script); !strings.Contains(res.stdout, "A "+testNameIP) {
		t.Errorf("no DNS answer during the flood:\n%s", res)
	}
	if res := <-transfer; res.code != 0 {
		t.Errorf("transfer during the floods failed: %s", res)
	} else {
		checkEcho(t, res, size)
	}
	close(stopSampling)
	<-sampleDone
	after := helperStats(t, sock).Return
	peak.peak(after)
	t.Logf("before: %+v", before)
	t.Logf("peak:   %+v", peak)

	// Flows per table: evicted flows take a moment to end, so these are
	// checked once the floods are over.
	for i := 0; after.Flows.UDPOpen > maxUDPFlows || after.Flows.ICMPOpen > maxPingFlows; i++ {
		if i == 100 {
			t.Errorf("flows past their tables' bounds: udp %d (bound %d), icmp %d (bound %d)",
				after.Flows.UDPOpen, maxUDPFlows, after.Flows.ICMPOpen, maxPingFlows)
			break
		}
		time.Sleep(100 * time.Millisecond)
		after = helperStats(t, sock).Return
	}
	if peak.Flows.DNSPending > maxDNSPending {
		t.Errorf("%d DNS queries in flight, bound %d", peak.Flows.DNSPending, maxDNSPending)
	}
	fdBound := before.Process.FDs + maxUDPFlows + maxInFlightSYNs + maxPingFlows + dnsSockets + 64
	goBound := before.Process.Goroutines + 2*maxUDPFlows + maxInFlightSYNs + maxPingFlows + dnsSockets + 64
	if peak.Process.FDs > fdBound || peak.Process.Goroutines > goBound {
		t.Errorf("helper grew past its bounds: %d fds (bound %d), %d goroutines (bound %d)",
			peak.Process.FDs, fdBound, peak.Process.Goroutines, goBound)
	}
	// Memory right after the sprays, as before the DNS flood and the
	// transfer's garbage: the peak is logged above.
	if sprayed.Process.RSSKiB > rssBound {
		t.Errorf("helper grew past its bounds: rss %d KiB after the sprays (bound %d)", sprayed.Process.RSSKiB, rssBound)
	}
}
