package netstack

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"net/netip"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/miekg/dns"
	"golang.org/x/sys/unix"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/adapters/gonet"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv4"

	"github.com/netns-run/netns-run/netstack/egress"
)

// recordingServer accepts TCP connections on loopback, writes banner to
// each, echoes what it reads and keeps a copy.
type recordingServer struct {
	port     uint16
	accepted atomic.Int64
	mu       sync.Mutex
	got      bytes.Buffer
}

func startRecordingServer(t *testing.T, banner string) *recordingServer {
	t.Helper()
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	rs := &recordingServer{port: uint16(ln.Addr().(*net.TCPAddr).Port)}
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			rs.accepted.Add(1)
			go func() {
				defer c.Close()
				_, _ = io.WriteString(c, banner)
				buf := make([]byte, 4096)
				for {
					n, err := c.Read(buf)
					if err != nil {
						return
					}
					rs.mu.Lock()
					rs.got.Write(buf[:n])
					rs.mu.Unlock()
					_, _ = c.Write(buf[:n])
				}
			}()
		}
	}()
	return rs
}

func (rs *recordingServer) received() []byte {
	rs.mu.Lock()
	defer rs.mu.Unlock()
	return append([]byte(nil), rs.got.Bytes()...)
}

// mustRule parses "allow RULE" or "deny RULE".
func mustRule(t *testing.T, s string) egress.Rule {
	t.Helper()
	var r egress.Rule
	if err := r.UnmarshalText([]byte(s)); err != nil {
		t.Fatal(err)
	}
	return r
}

// egressGuest runs a stack with the given rules, a test DNS server that
// answers every A query with 192.0.2.1, and 192.0.2.1 mapped to the host's
// 127.0.0.1 (so that names resolve to the test servers on loopback).
func egressGuest(t *testing.T, rules ...string) (*Stack, *testDNSServer, *guestNet) {
	t.Helper()
	up := startDNSServer(t)
	cfg := DefaultConfig()
	cfg.DNSUpstreams = []netip.AddrPort{up.addr}
	cfg.Pasta.HostMap = map[netip.Addr]netip.Addr{netip.MustParseAddr("192.0.2.1"): netip.MustParseAddr("127.0.0.1")}
	for _, r := range rules {
		cfg.Egress.Rules = append(cfg.Egress.Rules, mustRule(t, r))
	}
	s, _, g := withGuest(t, cfg)
	return s, up, g
}

// guestTryTCP connects from the guest to dst and reports the error.
func guestTryTCP(t *testing.T, g *guestNet, dst netip.AddrPort) (*gonet.TCPConn, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := gonet.DialContextTCP(ctx, g.gs, tcpip.FullAddress{NIC: 1, Addr: tcpipAddr(dst.Addr()), Port: dst.Port()}, ipv4.ProtocolNumber)
	if err == nil {
		t.Cleanup(func() { c.Close() })
	}
	return c, err
}

func TestEgressGatewayFollowsRules(t *testing.T) {
	a, b := startRecordingServer(t, ""), startRecordingServer(t, "")
	s, _, g := egressGuest(t, "allow 127.0.0.1:"+strconv.Itoa(int(a.port)))
	c, err := guestTryTCP(t, g, netip.AddrPortFrom(DefaultGateway, a.port))
	if err != nil {
		t.Fatalf("allowed port: %v", err)
	}
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := c.Write([]byte("ping")); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 4)
	if _, err := io.ReadFull(c, buf); err != nil || string(buf) != "ping" {
		t.Fatalf("echo through an allowed port: %q %v", buf, err)
	}
	if _, err := guestTryTCP(t, g, netip.AddrPortFrom(DefaultGateway, b.port)); err == nil || !strings.Contains(err.Error(), "refused") {
		t.Errorf("denied port: %v, want connection refused", err)
	}
	if b.accepted.Load() != 0 {
		t.Error("the denied port was dialed")
	}
	if st := s.Stats().Egress; st.Denied != 1 || st.Allowed != 1 {
		t.Errorf("egress stats: %+v", st)
	}
}

func TestEgressDNS(t *testing.T) {
	s, up, g := egressGuest(t, "allow good.test")
	if m := g.exchange("bad.test", 1); m == nil || m.Rcode != dns.RcodeNameError {
		t.Fatalf("denied name: %v", m)
	}
	if up.queries.Load() != 0 {
		t.Fatal("a denied name reached the upstream")
	}
	if m := g.exchange("GOOD.test", 2); m == nil || m.Rcode != dns.RcodeSuccess || len(m.Answer) != 1 {
		t.Fatalf("allowed name: %v", m)
	}
	// Over TCP the same: the policy answers, the upstream sees only the
	// allowed name.
	tc := guestDialTCP(t, g.gs, netip.AddrPortFrom(DefaultDNS, 53))
	_ = tc.SetDeadline(time.Now().Add(5 * time.Second))
	for _, c := range []struct {
		name  string
		qtype uint16
		rcode int
	}{
		{"bad.test", dns.TypeA, dns.RcodeNameError},
		{"good.test", dns.TypeA, dns.RcodeSuccess},
		{"good.test", dns.TypeTXT, dns.RcodeRefused},
		{"good.test", dns.TypeHTTPS, dns.RcodeSuccess},
	} {
		q := new(dns.Msg)
		q.SetQuestion(c.name+".", c.qtype)
		b, _ := q.Pack()
		if err := writeDNSMessage(tc, b); err != nil {
			t.Fatal(err)
		}
		ans, err := readDNSMessage(tc, dnsMaxMessage)
		if err != nil {
			t.Fatalf("tcp %s: %v", c.name, err)
		}
		var m dns.Msg
		if err := m.Unpack(ans); err != nil || m.Rcode != c.rcode || m.Id != q.Id {
			t.Errorf("tcp %s %s: %v (err %v), want %s", c.name, dns.TypeToString[c.qtype], m, err, dns.RcodeToString[c.rcode])
		}
	}
	if n := up.queries.Load(); n != 2 {
		t.Errorf("upstream saw %d queries, want 2 (good.test A, over UDP and TCP)", n)
	}
	if st := s.Stats().Egress; st.DNSDenied != 2 || st.DNSRefused != 1 || st.DNSEmpty != 1 || st.DNSForwarded != 2 {
		t.Errorf("egress stats: %+v", st)
	}
}

func TestEgressUDPDeniedIsProhibited(t *testing.T) {
	cfg := DefaultConfig()
	cfg.DNSUpstreams = []netip.AddrPort{netip.MustParseAddrPort("127.0.0.1:9")}
	cfg.Egress.Rules = []egress.Rule{mustRule(t, "allow 198.51.100.0/24:5000-5010/udp")}
	_, peer := stackOnSocketpair(t, cfg, 0)
	src := netip.AddrPortFrom(DefaultGuestAddr, 40000)
	if err := unix.Send(peer, udpFrame(src, netip.MustParseAddrPort("198.51.100.10:5011"), []byte("x")), 0); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 65536)
	_ = unix.SetsockoptTimeval(peer, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &unix.Timeval{Sec: 5})
	for {
		n, err := readPeer(peer, buf)
		if err != nil {
			t.Fatalf("no ICMP administratively prohibited: %v", err)
		}
		if !isICMPUnreachable(buf[:n], header.ICMPv4AdminProhibited) {
			continue
		}
		// The quote names the guest's flow, so its socket gets the error.
		quote := header.IPv4(buf[header.EthernetMinimumSize:]).Payload()[8:]
		if len(quote) < header.IPv4MinimumSize+4 || binary.BigEndian.Uint16(quote[header.IPv4MinimumSize+2:]) != 5011 {
			t.Fatalf("quote does not name the flow: %x", quote)
		}
		return
	}
}

// clientHelloTo starts a TLS handshake naming sni over c and returns its
// error (the test servers are not TLS servers).
func clientHelloTo(c net.Conn, sni string) error {
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	return tls.Client(c, &tls.Config{ServerName: sni, InsecureSkipVerify: true}).Handshake()
}

// waitFor polls cond for a few seconds.
func waitFor(cond func() bool) bool {
	for i := 0; i < 500; i++ {
		if cond() {
			return true
		}
		time.Sleep(10 * time.Millisecond)
	}
	return false
}

func TestEgressInspectsPinnedFlows(t *testing.T) {
	echo := startRecordingServer(t, "")
	banner := startRecordingServer(t, "220 hello\r\n")
	_, _, g := egressGuest(t, "allow good.test:"+strconv.Itoa(int(echo.port)), "allow good.test:"+strconv.Itoa(int(banner.port)))
	pinned := netip.MustParseAddr("192.0.2.1")
	if _, err := guestTryTCP(t, g, netip.AddrPortFrom(pinned, echo.port)); err == nil {
		t.Fatal("address allowed before its name was resolved")
	}
	if m := g.exchange("good.test", 1); m == nil || len(m.Answer) != 1 {
		t.Fatalf("resolve: %v", m)
	}
	// The right name passes: the server gets the ClientHello.
	c, err := guestTryTCP(t, g, netip.AddrPortFrom(pinned, echo.port))
	if err != nil {
		t.Fatal(err)
	}
	_ = clientHelloTo(c, "good.test")
	if !waitFor(func() bool { return bytes.HasPrefix(echo.received(), []byte{0x16, 3}) }) {
		t.Fatal("the ClientHello for the allowed name did not reach the server")
	}
	// Another name at the same address is reset before the host is dialed.
	before := echo.accepted.Load()
	c, err = guestTryTCP(t, g, netip.AddrPortFrom(pinned, echo.port))
	if err != nil {
		t.Fatal(err)
	}
	if err := clientHelloTo(c, "other.test"); err == nil || !isReset(err) {
		t.Errorf("foreign SNI: %v, want a reset", err)
	}
	if echo.accepted.Load() != before {
		t.Error("a flow with a foreign SNI was dialed")
	}
	// A client that waits before its ClientHello is checked all the same.
	got := len(echo.received())
	c, err = guestTryTCP(t, g, netip.AddrPortFrom(pinned, echo.port))
	if err != nil {
		t.Fatal(err)
	}
	time.Sleep(2 * inspectFirstWait)
	if err := clientHelloTo(c, "other.test"); err == nil || !isReset(err) {
		t.Errorf("late foreign SNI: %v, want a reset", err)
	}
	if len(echo.received()) != got {
		t.Error("bytes of a late foreign ClientHello reached the server")
	}
	// A server that speaks first is reached on the pin alone.
	c, err = guestTryTCP(t, g, netip.AddrPortFrom(pinned, banner.port))
	if err != nil {
		t.Fatal(err)
	}
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	line := make([]byte, len("220 hello\r\n"))
	if _, err := io.ReadFull(c, line); err != nil || string(line) != "220 hello\r\n" {
		t.Errorf("banner: %q %v", line, err)
	}
}

func isReset(err error) bool {
	return errors.Is(err, unix.ECONNRESET) || strings.Contains(err.Error(), "reset")
}
