package test

import (
	"bufio"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// guestServers is the command netns-run runs in the publish tests: servers
// on fixed guest ports, on every address of both families (IPv4 peers show
// as IPv4), then "ready".
//
//	9000 tcp peer-server   9001 tcp echo   9002 udp echo   9003 udp peer-server
func guestServers() []string {
	n := bins.nettool
	// Ready means the TCP servers accept (bounded wait); the UDP ones
	// were started first.
	script := fmt.Sprintf("%[1]s udp-echo-server [::]:9002 >/dev/null & %[1]s peer-server udp [::]:9003 >/dev/null & "+
		"%[1]s peer-server tcp [::]:9000 >/dev/null & %[1]s tcp-echo-server [::]:9001 >/dev/null & "+
		"for p in 9000 9001; do i=0; until %[1]s tcp-connect 127.0.0.1:$p | grep -q connected; do "+
		"i=$((i+1)); [ $i -gt 200 ] && exit 1; sleep 0.05; done; done; echo ready; wait", n)
	return []string{"sh", "-c", script}
}

// startPublishing runs netns-run FLAGS with the guest servers in the
// background and waits until they are up; netns-run is stopped with SIGTERM
// when the test ends.
func (wd *world) startPublishing(flags ...string) {
	wd.t.Helper()
	wd.startPublishingAfter("", flags...)
}

// startPublishingAfter is startPublishing with the guest running prepare
// (if any) before its servers.
func (wd *world) startPublishingAfter(prepare string, flags ...string) {
	wd.t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	servers := guestServers()
	if prepare != "" {
		servers[2] = prepare + " && " + servers[2]
	}
	cmd := wd.guestCommand(ctx, flags, servers...)
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		wd.t.Fatal(err)
	}
	var stderr strings.Builder
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		wd.t.Fatal(err)
	}
	done := make(chan struct{})
	go func() { _ = cmd.Wait(); close(done) }()
	wd.t.Cleanup(func() {
		_ = cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-done:
		case <-time.After(5 * time.Second):
			cancel()
			<-done
		}
		cancel()
	})
	line := make(chan string, 1)
	go func() {
		s, _ := bufio.NewReader(stdout).ReadString('\n')
		line <- s
	}()
	select {
	case l := <-line:
		if strings.TrimSpace(l) != "ready" {
			<-done
			wd.t.Fatalf("netns-run %v did not start: %q\n%s", flags, l, stderr.String())
		}
	case <-time.After(30 * time.Second):
		wd.t.Fatalf("netns-run %v: no ready line\n%s", flags, stderr.String())
	}
}

// client runs nettool ARGS in namespace ns and returns its output.
func (wd *world) client(ns string, args ...string) string {
	wd.t.Helper()
	out, err := exec.Command("ip", append([]string{"netns", "exec", ns, bins.nettool}, args...)...).CombinedOutput()
	if err != nil {
		wd.t.Fatalf("nettool %v in %s: %v\n%s", args, ns, err, out)
	}
	return strings.TrimSpace(string(out))
}

// TestPublishPorts: each driver serves published ports of both protocols
// and families, bytes intact, and shows the guest the clients it should.
// The netstack driver's TCP connections go through the guest's kernel
// where its routes for them could be installed (counted in the stats; the
// TAP then carries none of their bytes), through the userspace stack where
// they could not ("netstack-no-rules": the guest deleted the routing rules
// before the first connection), and the guest sees the same clients either
// way.
func TestPublishPorts(t *testing.T) {
	for _, driver := range []string{"builtin", "netstack", "netstack-no-rules"} {
		t.Run(driver, func(t *testing.T) {
			wd := newWorld(t)
			sock := filepath.Join(userDir(t, "netns-run-publish-"), "api.sock")
			prepare := ""
			if driver == "netstack-no-rules" {
				prepare = "ip rule del fwmark 0x6e72696e && ip -6 rule del fwmark 0x6e72696e"
			}
			wd.startPublishingAfter(prepare, "--port-driver="+strings.TrimSuffix(driver, "-no-rules"), "--api-socket", sock,
				"-p", "19000:9000", "-p", "19001:9001/tcp", "-p", "19002:9002/udp", "-p", "19003:9003/udp",
				"-p", "127.0.0.1:19101:9001", "-p", "[::1]:19201:9001")

			// What the guest sees as the client: the netstack driver
			// keeps real addresses, IPv6 ones over IPv6 to the guest's
			// fd00::100 (loopback clients appear as the gateway of
			// their family); the builtin driver dials from the guest's
			// own loopback.
			wantLoop, wantRemote, wantLoop6, wantRemote6 := "10.0.2.2", routerAddr, "[fd00::2]", "["+routerAddr6+"]"
			if driver == "builtin" {
				wantLoop, wantRemote, wantLoop6, wantRemote6 = "127.0.0.1", "127.0.0.1", "127.0.0.1", "127.0.0.1"
			}
			for _, proto := range []string{"tcp", "udp"} {
				port := map[string]string{"tcp": "19000", "udp": "19003"}[proto]
				for _, c := range []struct{ ns, addr, want string }{
					{wd.w, "127.0.0.1", wantLoop},
					{wd.r, worldAddr, wantRemote},
					{wd.w, "[::1]", wantLoop6},
					{wd.r, "[" + worldAddr6 + "]", wantRemote6},
				} {
					if got := wd.client(c.ns, "peer-query", proto, c.addr+":"+port); !strings.HasPrefix(got, "peer="+c.want+":") {
						t.Errorf("%s %s:%s from %s: guest saw %q, want %s", proto, c.addr, port, c.ns, got, c.want)
					}
				}
			}
			// Bytes both ways over IPv6 from another host.
			checkEcho(t, result{stdout: wd.client(wd.r, "tcp-echo-check", "["+worldAddr6+"]:19001", fmt.Sprint(32<<20))}, 32<<20)
			if got := wd.client(wd.r, "udp-echo-check", "["+worldAddr6+"]:19002", "200", "1400"); !strings.Contains(got, "datagrams=200") {
				t.Errorf("udp over IPv6 from %s: %s", wd.r, got)
			}
			const big = 256 << 20
			for _, addr := range []string{"127.0.0.1:19001", "127.0.0.1:19101", "[::1]:19201"} {
				size := big
				if addr != "127.0.0.1:19001" {
					size = 8 << 20
				}
				checkEcho(t, result{stdout: wd.client(wd.w, "tcp-echo-check", addr, fmt.Sprint(size))}, size)
			}
			checkEcho(t, result{stdout: wd.client(wd.r, "tcp-echo-check", worldAddr+":19001", fmt.Sprint(32<<20))}, 32<<20)
			if got := wd.client(wd.w, "tcp-echo-many", "127.0.0.1:19001", "200", "65536"); got != "conns=200 ok=200" {
				t.Errorf("200 concurrent connections: %s", got)
			}
			for _, addr := range []string{"127.0.0.1:19002", "[::1]:19002"} {
				if got := wd.client(wd.w, "udp-echo-check", addr, "200", "1400"); !strings.Contains(got, "datagrams=200") {
					t.Errorf("udp %s: %s", addr, got)
				}
			}
			// Only the published addresses listen.
			if got := wd.client(wd.w, "tcp-connect", "[::1]:19101"); got != "refused" {
				t.Errorf("127.0.0.1-only port answers on ::1: %s", got)
			}
			if driver == "builtin" {
				return
			}
			kernel := driver == "netstack"
			// The connections' bytes count as they end: poll briefly.
			var st guestStats
			for range 50 {
				if st = readStats(t, sock); st.Flows.TCPOpen == 0 {
					break
				}
				time.Sleep(100 * time.Millisecond)
			}
			// 4 peer queries, 5 echo checks, 200 concurrent echoes.
			if got, want := st.Flows.TCPPublished, 209*btou(kernel); got != want {
				t.Errorf("%d published-port connections through the guest's kernel, want %d", got, want)
			}
			if crossed := st.Link.RxBytes > big; crossed == kernel {
				t.Errorf("the TAP carried %d bytes from the guest; published ports through its kernel: %v", st.Link.RxBytes, kernel)
			}
			if st.Bytes.FromGuest < big {
				t.Errorf("stats count %d bytes from the guest, want at least %d", st.Bytes.FromGuest, big)
			}
		})
	}
}

// TestPublishIPv6ClientsGuestWithoutIPv6: a guest without IPv6 keeps the
// IPv4 mapping for IPv6 clients of the netstack driver (the gateway as their
// address).
func TestPublishIPv6ClientsGuestWithoutIPv6(t *testing.T) {
	wd := newWorld(t)
	wd.startPublishing("--port-driver=netstack", "--disable-ipv6", "-p", "19000:9000", "-p", "19001:9001", "-p", "19003:9003/udp")
	for _, proto := range []string{"tcp", "udp"} {
		port := map[string]string{"tcp": "19000", "udp": "19003"}[proto]
		if got := wd.client(wd.r, "peer-query", proto, "["+worldAddr6+"]:"+port); !strings.HasPrefix(got, "peer=10.0.2.2:") {
			t.Errorf("%s IPv6 client, guest without IPv6: guest saw %q, want the gateway 10.0.2.2", proto, got)
		}
	}
	checkEcho(t, result{stdout: wd.client(wd.r, "tcp-echo-check", "["+worldAddr6+"]:19001", fmt.Sprint(8<<20))}, 8<<20)
}

func TestPublishErrors(t *testing.T) {
	wd := newWorld(t)
	wd.startServer(wd.w, "tcp-echo-server", "0.0.0.0:19500")
	token := fmt.Sprintf("publish-err-%d", os.Getpid())
	cases := []struct {
		flags []string
		want  string
	}{
		{[]string{"-p", "19500:80"}, "already in use"},
		{[]string{"-p", "19501:80", "-p", "127.0.0.1:19501:81"}, "already published"},
		{[]string{"-p", "80:80"}, "privileged"},
		{[]string{"-p", "1.2.3:80:80"}, "is not an IPv4 address"},
		{[]string{"-p", "8000-8010:80"}, "differ in size"},
		{[]string{"-p", "19502:80/sctp"}, "neither tcp nor udp"},
		{[]string{"--port-driver=magic", "-p", "19503:80"}, "must be builtin or netstack"},
	}
	for _, c := range cases {
		res := wd.runGuest(c.flags, bins.nettool, "sleep", token)
		if res.code != 125 || !strings.Contains(res.stderr, c.want) {
			t.Errorf("%v: want exit 125 and %q:\n%s", c.flags, c.want, res)
		}
	}
	waitGone(t, token)
}

func TestPublishAPIAtRuntime(t *testing.T) {
	wd := newWorld(t)
	sock := filepath.Join(userDir(t, "netns-run-api-"), "api.sock")
	wd.startPublishing("--api-socket", sock)
	req := `{"execute":"add_hostfwd","arguments":{"proto":"tcp","host_addr":"::1","host_port":19300,"guest_port":9001}}`
	if got := apiCall(t, sock, req); got != `{"return":{"id":1}}` {
		t.Fatalf("add: %s", got)
	}
	checkEcho(t, result{stdout: wd.client(wd.w, "tcp-echo-check", "[::1]:19300", "1048576")}, 1<<20)
	want := `{"entries":[{"id":1,"proto":"tcp","host_addr":"::1","host_port":19300,"guest_addr":"127.0.0.1","guest_port":9001}]}`
	if got := apiCall(t, sock, `{"execute":"list_hostfwd"}`); got != want {
		t.Errorf("list:\n got %s\nwant %s", got, want)
	}
	if got := apiCall(t, sock, `{"execute":"remove_hostfwd","arguments":{"id":1}}`); got != `{"return":{}}` {
		t.Errorf("remove: %s", got)
	}
	if got := wd.client(wd.w, "tcp-connect", "[::1]:19300"); got != "refused" {
		t.Errorf("after remove: %s", got)
	}
}

// TestPublishAPIIPv6Guest: with the netstack driver, API forwards to the
// guest's IPv6 address carry IPv6 clients as they are and IPv4 clients as
// the IPv6 gateway; a forward without guest_addr sends IPv6 clients to the
// guest's IPv6 address.
func TestPublishAPIIPv6Guest(t *testing.T) {
	wd := newWorld(t)
	sock := filepath.Join(userDir(t, "netns-run-api6-"), "api.sock")
	wd.startPublishing("--port-driver=netstack", "--api-socket", sock)
	for i, args := range []string{
		`"proto":"tcp","host_addr":"::","host_port":19310,"guest_addr":"fd00::100","guest_port":9000`,
		`"proto":"udp","host_addr":"::","host_port":19310,"guest_addr":"fd00::100","guest_port":9003`,
		`"proto":"tcp","host_addr":"127.0.0.1","host_port":19311,"guest_addr":"fd00::100","guest_port":9000`,
		`"proto":"tcp","host_addr":"::","host_port":19312,"guest_port":9000`,
		`"proto":"tcp","host_addr":"::","host_port":19313,"guest_addr":"fd00::100","guest_port":9001`,
	} {
		if got := apiCall(t, sock, `{"execute":"add_hostfwd","arguments":{`+args+`}}`); got != fmt.Sprintf(`{"return":{"id":%d}}`, i+1) {
			t.Fatalf("add %s: %s", args, got)
		}
	}
	for _, c := range []struct{ ns, proto, addr, want string }{
		{wd.r, "tcp", "[" + worldAddr6 + "]:19310", "[" + routerAddr6 + "]"},
		{wd.w, "tcp", "[::1]:19310", "[fd00::2]"},
		{wd.r, "udp", "[" + worldAddr6 + "]:19310", "[" + routerAddr6 + "]"},
		{wd.w, "tcp", "127.0.0.1:19311", "[fd00::2]"},
		{wd.r, "tcp", "[" + worldAddr6 + "]:19312", "[" + routerAddr6 + "]"},
	} {
		if got := wd.client(c.ns, "peer-query", c.proto, c.addr); !strings.HasPrefix(got, "peer="+c.want+":") {
			t.Errorf("%s %s from %s: guest saw %q, want %s", c.proto, c.addr, c.ns, got, c.want)
		}
	}
	checkEcho(t, result{stdout: wd.client(wd.r, "tcp-echo-check", "["+worldAddr6+"]:19313", fmt.Sprint(16<<20))}, 16<<20)
}

// TestPublishKernelPathFallback: where the guest's kernel cannot take a
// published port's connections as it should, the userspace stack does, and
// the bytes arrive whole: a firewall that drops what arrives on lo from
// other addresses (after a few seconds), and a redirect of the guest's own
// (at once: the port helper sees the NAT rule; through the guest's kernel
// the connection would bypass it).
func TestPublishKernelPathFallback(t *testing.T) {
	skipWithoutNftables(t)
	for _, c := range []struct{ name, prepare string }{
		{"firewall", "nft add table inet f && nft add chain inet f in '{ type filter hook input priority 0; }' && " +
			"nft add rule inet f in iif lo ip saddr != 127.0.0.0/8 drop"},
		{"redirect", "nft add table ip n && nft add chain ip n pre '{ type nat hook prerouting priority -100; }' && " +
			"nft add rule ip n pre tcp dport 9005 redirect to :9001"},
	} {
		t.Run(c.name, func(t *testing.T) {
			wd := newWorld(t)
			sock := filepath.Join(userDir(t, "netns-run-fallback-"), "api.sock")
			wd.startPublishingAfter(c.prepare, "--port-driver=netstack", "--api-socket", sock,
				"-p", "19001:9001", "-p", "19005:9005", "-p", "19000:9000")
			port := map[string]string{"firewall": "19001", "redirect": "19005"}[c.name]
			start := time.Now()
			checkEcho(t, result{stdout: wd.client(wd.w, "tcp-echo-check", "127.0.0.1:"+port, fmt.Sprint(1<<20))}, 1<<20)
			if d := time.Since(start); d > 10*time.Second {
				t.Errorf("the echo took %v", d)
			}
			if got := wd.client(wd.r, "peer-query", "tcp", worldAddr+":19000"); !strings.HasPrefix(got, "peer="+routerAddr+":") {
				t.Errorf("guest saw %q, want %s", got, routerAddr)
			}
			if st := readStats(t, sock); st.Flows.TCPPublished != 0 {
				t.Errorf("%d published-port connections through the guest's kernel, want none", st.Flows.TCPPublished)
			}
		})
	}
}
