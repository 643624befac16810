package test

import (
	"encoding/binary"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"gvisor.dev/gvisor/pkg/tcpip/header"
)

// userDir is a temporary directory owned by the unprivileged test user,
// removed when the test ends.
func userDir(t *testing.T, prefix string) string {
	t.Helper()
	dir, err := os.MkdirTemp("", prefix)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	if err := os.Chown(dir, unprivUID, unprivUID); err != nil {
		t.Fatal(err)
	}
	return dir
}

// pcapRecords reads a pcap file (LINKTYPE_RAW: each record an IP packet).
func pcapRecords(t *testing.T, path string) [][]byte {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if len(b) < 24 || binary.LittleEndian.Uint32(b) != 0xa1b2c3d4 {
		t.Fatalf("%s: not a pcap file (%d bytes)", path, len(b))
	}
	if lt := binary.LittleEndian.Uint32(b[20:]); lt != 101 {
		t.Fatalf("%s: link type %d, want 101 (raw IP)", path, lt)
	}
	var recs [][]byte
	for off := 24; off+16 <= len(b); {
		n := int(binary.LittleEndian.Uint32(b[off+8:]))
		if off+16+n > len(b) {
			t.Fatalf("%s: truncated record at %d", path, off)
		}
		recs = append(recs, b[off+16:off+16+n])
		off += 16 + n
	}
	return recs
}

func TestPacketCapture(t *testing.T) {
	wd := newWorld(t)
	wd.startServer(wd.w, "tcp-echo-server", "127.0.0.1:8080")
	dir := userDir(t, "netns-run-pcap-")
	file := filepath.Join(dir, "guest.pcap")
	res := wd.mustRunGuest([]string{"--pcap", file}, bins.nettool, "tcp-echo-check", "10.0.2.2:8080", "100000")
	checkEcho(t, res, 100000)
	var syn, synAck bool
	for _, p := range pcapRecords(t, file) {
		if len(p) < header.IPv4MinimumSize || header.IPVersion(p) != 4 {
			continue
		}
		ip := header.IPv4(p)
		if ip.TransportProtocol() != header.TCPProtocolNumber {
			continue
		}
		tcp := header.TCP(ip.Payload())
		flags := tcp.Flags()
		switch {
		case flags == header.TCPFlagSyn && ip.DestinationAddress().String() == "10.0.2.2" && tcp.DestinationPort() == 8080:
			syn = true
		case flags == header.TCPFlagSyn|header.TCPFlagAck && ip.SourceAddress().String() == "10.0.2.2" && tcp.SourcePort() == 8080:
			synAck = true
		}
	}
	if !syn || !synAck {
		t.Errorf("capture lacks the flow's handshake: SYN %v, SYN-ACK %v", syn, synAck)
	}
}

// guestStats is what the tests read of the API's get_stats.
type guestStats struct {
	Flows struct {
		TCPOpen   int64  `json:"tcp_open"`
		TCPTotal  uint64 `json:"tcp_total"`
		TCPKernel uint64 `json:"tcp_kernel_total"`
		TCPNAT    uint64 `json:"tcp_kernel_nat_total"`
		// TCPPublished: published ports' connections the guest's
		// kernel took.
		TCPPublished uint64 `json:"tcp_published_kernel_total"`
	} `json:"flows"`
	Bytes struct {
		FromGuest uint64 `json:"from_guest"`
		ToGuest   uint64 `json:"to_guest"`
	} `json:"bytes"`
	Link struct {
		RxBytes uint64 `json:"rx_bytes"`
	} `json:"link"`
}

// readStats asks the API socket sock for the stack's counters.
func readStats(t *testing.T, sock string) guestStats {
	t.Helper()
	var reply struct {
		Return guestStats `json:"return"`
	}
	if err := json.Unmarshal([]byte(apiCall(t, sock, `{"execute":"get_stats"}`)), &reply); err != nil {
		t.Fatal(err)
	}
	return reply.Return
}

// TestStats runs a known exchange and reads the counters over the API
// socket, raw (get_stats) and through `netns-run stats`.
func TestStats(t *testing.T) {
	wd := newWorld(t)
	wd.startServer(wd.w, "tcp-echo-server", "127.0.0.1:8080")
	dir := userDir(t, "netns-run-stats-")
	sock := filepath.Join(dir, "api.sock")
	n := bins.nettool
	script := fmt.Sprintf("for i in 1 2 3; do %s tcp-echo-check 10.0.2.2:8080 100000 >/dev/null || exit 1; done; echo done; exec %s sleep stats", n, n)
	stdout := wd.startGuestScript([]string{"--api-socket", sock, "-p", "19700:80"}, script)
	if line, _ := stdout.ReadString('\n'); strings.TrimSpace(line) != "done" {
		t.Fatalf("exchange failed: %q", line)
	}
	// The last flow's bytes are counted when it closes: poll briefly.
	var r guestStats
	for i := 0; ; i++ {
		r = readStats(t, sock)
		if r.Flows.TCPOpen == 0 || i == 50 {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	if r.Flows.TCPTotal != 3 || r.Flows.TCPKernel != 3 || r.Flows.TCPOpen != 0 || r.Bytes.FromGuest != 300000 || r.Bytes.ToGuest != 300000 {
		t.Errorf("stats after 3 echoes of 100000 bytes: %+v", r)
	}
	out, err := exec.Command(bins.netnsRun, "stats", sock).CombinedOutput()
	if err != nil {
		t.Fatalf("netns-run stats: %v\n%s", err, out)
	}
	for _, want := range []string{"flows total tcp 3,", "tcp ended in the namespace's kernel 3", "bytes       292.97 KiB from guest, 292.97 KiB to guest", "published   1", `"host_port":19700`} {
		if !strings.Contains(string(out), want) {
			t.Errorf("netns-run stats lacks %q:\n%s", want, out)
		}
	}
	out, err = exec.Command(bins.netnsRun, "stats", "--json", dir).CombinedOutput()
	var both struct {
		Info  json.RawMessage `json:"info"`
		Stats json.RawMessage `json:"stats"`
	}
	if err != nil || json.Unmarshal(out, &both) != nil || len(both.Info) == 0 || len(both.Stats) == 0 {
		t.Errorf("netns-run stats --json DIR: %v\n%s", err, out)
	}
}

// TestTCPPaths: which path serves a guest's TCP connection, as stats count
// it: the namespace's kernel by default, IPv6 included; the userspace stack
// with --userspace-tcp. The bytes arrive whole either way. A busy flow is
// translated by the namespace's kernel (where nftables works in a user
// namespace), IPv6 too: then its bytes stop crossing the TAP.
func TestTCPPaths(t *testing.T) {
	const pathsEcho = 8 << 20
	wd := newWorld(t)
	wd.startServer(wd.w, "tcp-echo-server", "127.0.0.1:8080")
	wd.startServer(wd.w, "tcp-echo-server", "[::1]:8080")
	for _, c := range []struct {
		name   string
		flags  []string
		target string
		kernel uint64
		nat    bool
	}{
		{"userspace", []string{"--userspace-tcp"}, "10.0.2.2:8080", 0, false},
		{"kernel-ipv4", nil, "10.0.2.2:8080", 1, true},
		{"kernel-ipv6", nil, "[fd00::2]:8080", 1, true},
	} {
		t.Run(c.name, func(t *testing.T) {
			dir := userDir(t, "netns-run-paths-")
			sock := filepath.Join(dir, "api.sock")
			n := bins.nettool
			script := fmt.Sprintf("%s tcp-echo-check '%s' %d >/dev/null || exit 1; echo done; exec %s sleep stats", n, c.target, pathsEcho, n)
			stdout := wd.startGuestScript(append([]string{"--api-socket", sock}, c.flags...), script)
			if line, _ := stdout.ReadString('\n'); strings.TrimSpace(line) != "done" {
				t.Fatalf("exchange failed: %q", line)
			}
			st := readStats(t, sock)
			if f := st.Flows; f.TCPTotal != 1 || f.TCPKernel != c.kernel {
				t.Errorf("%d TCP flows, %d of them in the kernel; want 1 and %d", f.TCPTotal, f.TCPKernel, c.kernel)
			}
			nat := c.nat && nftablesUsable()
			if got := st.Flows.TCPNAT; got != btou(nat) {
				t.Errorf("%d flows translated in the namespace's kernel, want %d", got, btou(nat))
			}
			// The echo's bytes from the guest: all in frames on the
			// TAP, or, once the translation is in the kernel (it is
			// added while the flow runs, through the NAT broker:
			// later on a busy machine), not all.
			if crossed := st.Link.RxBytes >= pathsEcho; crossed == nat {
				t.Errorf("the TAP carried %d of the %d bytes from the guest; translated in the kernel: %v", st.Link.RxBytes, pathsEcho, nat)
			}
		})
	}
}

// TestKernelTCPFirewalled: a firewall inside the namespace that drops every
// inbound connection also drops what the kernel TCP path sends to its
// listener; the flow then goes through the userspace stack after a few
// seconds, and its bytes still arrive whole.
func TestKernelTCPFirewalled(t *testing.T) {
	skipWithoutNftables(t)
	wd := newWorld(t)
	wd.startServer(wd.w, "tcp-echo-server", "127.0.0.1:8080")
	script := "nft add table inet f && " +
		"nft add chain inet f in '{ type filter hook input priority 0; }' && " +
		"nft add rule inet f in 'tcp flags & (syn | ack) == syn drop' && " +
		"exec " + bins.nettool + " tcp-echo-check 10.0.2.2:8080 100000"
	res := wd.mustRunGuest(nil, "sh", "-c", script)
	checkEcho(t, res, 100000)
}

// TestKernelTCPForwarded: the namespace routes for a namespace behind it
// and masquerades it, as podman's rootless network namespace does for its
// bridge networks. The inner namespace's connections go out and back
// through the TAP, where the namespace's conntrack undoes the masquerade:
// the in-kernel translation, which only sees the namespace's own sockets,
// must leave them there, and the bytes arrive whole.
func TestKernelTCPForwarded(t *testing.T) {
	skipWithoutNftables(t)
	wd := newWorld(t)
	wd.startServer(wd.w, "tcp-echo-server", "127.0.0.1:8080")
	const size = 1000000
	script := `set -e
unshare -n sleep 60 & inner=$!
trap 'kill $inner' EXIT
sleep 0.2
ip link add v0 type veth peer name v1
ip link set v1 netns $inner
ip addr add 192.168.77.1/24 dev v0
ip link set v0 up
nsenter -t $inner -n sh -c 'ip addr add 192.168.77.2/24 dev v1 && ip link set v1 up && ip link set lo up && ip route add default via 192.168.77.1'
echo 1 > /proc/sys/net/ipv4/ip_forward
nft add table ip m
nft add chain ip m post '{ type nat hook postrouting priority 100; }'
nft add rule ip m post oifname tap0 masquerade
nsenter -t $inner -n ` + bins.nettool + ` tcp-echo-check 10.0.2.2:8080 ` + fmt.Sprint(size) + `
`
	res := wd.mustRunGuest(nil, "sh", "-c", script)
	checkEcho(t, res, size)
}

// TestKernelTCPReconnect: a guest connects again and again from one port to
// one server that sends 200 kB (enough for the namespace's kernel to take
// the translation over) and closes first, so each connection has the
// addresses of the one before while that one's translation still lingers.
// Each must reach its own host connection (and not the last one's listener
// side).
func TestKernelTCPReconnect(t *testing.T) {
	wd := newWorld(t)
	wd.startServer(wd.w, "burst-server", "127.0.0.1:8081", "200000")
	res := wd.mustRunGuest(nil, bins.nettool, "tcp-reconnect", "10.0.2.2:8081", "40123", "20", "200000")
	if !strings.Contains(res.stdout, "reconnects=20") {
		t.Fatalf("reconnecting from one port:\n%s", res)
	}
}

// skipWithoutNftables skips a test that runs nft inside the guest where it
// cannot.
func skipWithoutNftables(t *testing.T) {
	t.Helper()
	if _, err := exec.LookPath("nft"); err != nil {
		t.Skip("needs nft (apt-get install nftables)")
	}
	if !nftablesUsable() {
		t.Skip("nftables unusable in a user namespace here")
	}
}

// nftablesUsable says whether nft works in a new user and network
// namespace here (needs the nft command).
func nftablesUsable() bool {
	return exec.Command("unshare", "-rn", "nft", "add", "table", "inet", "probe").Run() == nil
}

func btou(b bool) uint64 {
	if b {
		return 1
	}
	return 0
}
