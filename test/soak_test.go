package test

import (
	"encoding/json"
	"fmt"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

type processStats struct {
	Return struct {
		Flows struct {
			TCPOpen int64 `json:"tcp_open"`
			UDPOpen int64 `json:"udp_open"`
		} `json:"flows"`
		Process struct {
			Goroutines int    `json:"goroutines"`
			FDs        int    `json:"fds"`
			RSSKiB     uint64 `json:"rss_kib"`
		} `json:"process"`
		Drops struct {
			FlowLimit uint64 `json:"flow_limit"`
		} `json:"drops"`
	} `json:"return"`
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
// forwarder and a published port, and 1 GiB each way; afterwards the
// helper's goroutines and descriptors are back near where they started.
func TestSoak(t *testing.T) {
	if testing.Short() {
		t.Skip("soak test skipped in -short mode")
	}
	wd := newWorld(t)
	wd.startServer(wd.w, "tcp-echo-server", "127.0.0.1:8080")
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

// TestFlood: a guest that sprays SYNs and UDP datagrams at 50,000 ports
// does not grow the helper without bound, and a transfer running meanwhile
// completes.
func TestFlood(t *testing.T) {
	if testing.Short() {
		t.Skip("flood test skipped in -short mode")
	}
	wd := newWorld(t)
	wd.startServer(wd.w, "tcp-echo-server", "127.0.0.1:8080")
	state := wd.detached()
	sock := filepath.Join(state, "api.sock")
	const size = 256 << 20
	transfer := make(chan result, 1)
	go func() {
		transfer <- wd.runGuest([]string{"--join", state}, bins.nettool, "tcp-echo-check", "10.0.2.2:8080", fmt.Sprint(size))
	}()
	for _, proto := range []string{"udp", "tcp"} {
		res := wd.runGuest([]string{"--join", state}, bins.nettool, "spray", proto, remoteAddr, "10000", "50000")
		if res.code != 0 {
			t.Fatalf("spray %s: %s", proto, res)
		}
	}
	st := helperStats(t, sock).Return
	t.Logf("after the floods: %+v", st)
	// 4096 UDP flows at most, each a socket and a goroutine with 64 KiB
	// buffers only while reading: well under 512 MiB.
	const rssBound = 512 << 10 // KiB
	if st.Process.RSSKiB > rssBound || st.Flows.UDPOpen > 4096 {
		t.Errorf("helper grew past its bounds: rss %d KiB (bound %d), %d UDP flows", st.Process.RSSKiB, rssBound, st.Flows.UDPOpen)
	}
	if res := <-transfer; res.code != 0 {
		t.Errorf("transfer during the flood failed: %s", res)
	} else {
		checkEcho(t, res, size)
	}
}
