package netstack

import (
	"encoding/binary"
	"net"
	"net/netip"
	"os"
	"runtime"
	"sync/atomic"
	"testing"
	"time"

	"github.com/miekg/dns"
	"golang.org/x/sys/unix"
	"gvisor.dev/gvisor/pkg/tcpip/adapters/gonet"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv4"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
)

// testDNSServer answers every A query with 192.0.2.1 over UDP and TCP on
// loopback, and counts the queries it saw.
type testDNSServer struct {
	addr    netip.AddrPort
	queries atomic.Int64
}

func startDNSServer(t testing.TB) *testDNSServer {
	t.Helper()
	ts := &testDNSServer{}
	pc, ln := listenUDPAndTCP(t)
	ts.addr = pc.LocalAddr().(*net.UDPAddr).AddrPort()
	h := dns.HandlerFunc(func(w dns.ResponseWriter, r *dns.Msg) {
		ts.queries.Add(1)
		m := new(dns.Msg)
		m.SetReply(r)
		if len(r.Question) == 1 {
			rr, _ := dns.NewRR(r.Question[0].Name + " 60 IN A 192.0.2.1")
			m.Answer = append(m.Answer, rr)
		}
		_ = w.WriteMsg(m)
	})
	for _, srv := range []*dns.Server{{PacketConn: pc, Handler: h}, {Listener: ln, Handler: h}} {
		go func() { _ = srv.ActivateAndServe() }()
		t.Cleanup(func() { _ = srv.Shutdown() })
	}
	return ts
}

// fastUpstream answers every query on loopback from one goroutine without
// allocating (an A record 192.0.2.1 for the question), so that a test
// measuring the process sees the forwarder, not its test server.
func fastUpstream(t testing.TB) (*atomic.Int64, netip.AddrPort) {
	t.Helper()
	c := loopbackUDP(t)
	var n atomic.Int64
	answer := []byte{0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4, 192, 0, 2, 1}
	go func() {
		buf := make([]byte, 65536)
		for {
			l, from, err := c.ReadFromUDPAddrPort(buf)
			if err != nil {
				return
			}
			if _, end, ok := parseDNSQuestion(buf[:l]); ok {
				n.Add(1)
				buf[2] |= 0x80                    // QR
				buf[7], buf[9], buf[11] = 1, 0, 0 // one answer, nothing else
				m := append(buf[:end], answer...)
				_, _ = c.WriteToUDPAddrPort(m, from)
			}
		}
	}()
	return &n, addrOf(c)
}

// listenUDPAndTCP listens on one loopback port with UDP and TCP (trying
// until the UDP port's TCP twin is free too).
func listenUDPAndTCP(t testing.TB) (*net.UDPConn, net.Listener) {
	t.Helper()
	for i := 0; ; i++ {
		pc, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
		if err != nil {
			t.Fatal(err)
		}
		ln, err := net.Listen("tcp4", pc.LocalAddr().String())
		if err == nil {
			return pc, ln
		}
		pc.Close()
		if i == 10 {
			t.Fatal(err)
		}
	}
}

// silentUpstream is a UDP socket on loopback that never reads: queries to
// it get neither an answer nor an ICMP error.
func silentUpstream(t testing.TB) (*net.UDPConn, netip.AddrPort) {
	t.Helper()
	c := loopbackUDP(t)
	return c, addrOf(c)
}

// loopbackUDP is a UDP socket on 127.0.0.1, closed with the test.
func loopbackUDP(t testing.TB) *net.UDPConn {
	t.Helper()
	c, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func addrOf(c *net.UDPConn) netip.AddrPort {
	return c.LocalAddr().(*net.UDPAddr).AddrPort()
}

// dnsStack runs a stack whose DNS forwarder asks upstreams, with a guest
// stack on the other end of its link.
func dnsStack(t *testing.T, upstreams ...netip.AddrPort) (*Stack, int, *guestNet) {
	t.Helper()
	cfg := DefaultConfig()
	cfg.Restrict = true
	cfg.DNSUpstreams = upstreams
	return withGuest(t, cfg)
}

// withGuest runs a stack with cfg and a guest stack on its link.
func withGuest(t *testing.T, cfg Config) (*Stack, int, *guestNet) {
	t.Helper()
	s, peer := stackOnSocketpair(t, cfg, 0)
	return s, peer, &guestNet{t: t, gs: guestStack(t, peer)}
}

// exchange sends one query from a fresh guest socket and returns the
// answer (nil if none came within the resolver-like wait).
func (g *guestNet) exchange(name string, id uint16) *dns.Msg {
	g.t.Helper()
	c := guestDialUDP(g.t, g.gs, netip.AddrPortFrom(DefaultDNS, 53))
	return exchangeOn(g.t, c, name, id)
}

func exchangeOn(t testing.TB, c *gonet.UDPConn, name string, id uint16) *dns.Msg {
	t.Helper()
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := c.Write(packQuery(id, name)); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 65536)
	n, err := c.Read(buf)
	if err != nil {
		return nil
	}
	m := new(dns.Msg)
	if err := m.Unpack(buf[:n]); err != nil {
		t.Fatalf("answer does not parse: %v", err)
	}
	return m
}

// The forwarder relays UDP and TCP queries and hands back the guest's ID.
func TestDNSForwarderAnswers(t *testing.T) {
	up := startDNSServer(t)
	_, _, g := dnsStack(t, up.addr)
	m := g.exchange("a.example.test", 4242)
	if m == nil || m.Id != 4242 || !m.Response || len(m.Answer) != 1 {
		t.Fatalf("UDP answer: %v", m)
	}
	tc := guestDialTCP(t, g.gs, netip.AddrPortFrom(DefaultDNS, 53))
	q := new(dns.Msg)
	q.SetQuestion("b.example.test.", dns.TypeA)
	co := &dns.Conn{Conn: tc}
	_ = tc.SetDeadline(time.Now().Add(5 * time.Second))
	if err := co.WriteMsg(q); err != nil {
		t.Fatal(err)
	}
	a, err := co.ReadMsg()
	if err != nil || a.Id != q.Id || len(a.Answer) != 1 {
		t.Fatalf("TCP answer: %v, %v", a, err)
	}
}

// An upstream that does not answer costs one try, not one per query: after
// the first query has timed out on it, the next ones go straight to the
// second upstream.
func TestDNSSkipsSilentUpstream(t *testing.T) {
	silent, silentAddr := silentUpstream(t)
	up := startDNSServer(t)
	_, _, g := dnsStack(t, silentAddr, up.addr)
	for i := 0; i < 5; i++ {
		if m := g.exchange("c.example.test", uint16(i)); m == nil || len(m.Answer) != 1 {
			t.Fatalf("query %d: %v", i, m)
		}
	}
	got := 0
	buf := make([]byte, 512)
	for {
		_ = silent.SetReadDeadline(time.Now().Add(100 * time.Millisecond))
		if _, err := silent.Read(buf); err != nil {
			break
		}
		got++
	}
	if got != 1 {
		t.Errorf("the silent upstream was asked %d times for 5 queries, want once", got)
	}
}

// With every upstream silent the guest gets SERVFAIL (at once, once they
// are known to be down), not a timeout per query.
func TestDNSServfailWhenUpstreamsDown(t *testing.T) {
	_, silentAddr := silentUpstream(t)
	_, _, g := dnsStack(t, silentAddr)
	for i := 0; i < 3; i++ {
		m := g.exchange("d.example.test", uint16(100+i))
		if m == nil || m.Rcode != dns.RcodeServerFailure || m.Id != uint16(100+i) || len(m.Question) != 1 {
			t.Fatalf("query %d: want SERVFAIL, got %v", i, m)
		}
	}
}

// An answer whose question differs from the query's, or that is not a
// response, is not the answer, whatever its ID.
func TestDNSAnswerMustMatchQuestion(t *testing.T) {
	pc := loopbackUDP(t)
	go func() {
		buf := make([]byte, 65536)
		for {
			n, from, err := pc.ReadFromUDPAddrPort(buf)
			if err != nil {
				return
			}
			q := new(dns.Msg)
			if q.Unpack(buf[:n]) != nil {
				continue
			}
			forged := new(dns.Msg)
			forged.SetReply(q)
			forged.Question[0].Name = "evil.test."
			rr, _ := dns.NewRR("evil.test. 60 IN A 203.0.113.66")
			forged.Answer = append(forged.Answer, rr)
			notReply := q.Copy()
			good := new(dns.Msg)
			good.SetReply(q)
			rr, _ = dns.NewRR(q.Question[0].Name + " 60 IN A 192.0.2.1")
			good.Answer = append(good.Answer, rr)
			for _, m := range []*dns.Msg{forged, notReply, good} {
				b, _ := m.Pack()
				_, _ = pc.WriteToUDPAddrPort(b, from)
			}
		}
	}()
	_, _, g := dnsStack(t, addrOf(pc))
	m := g.exchange("e.example.test", 7)
	if m == nil || len(m.Answer) != 1 || m.Answer[0].(*dns.A).A.String() != "192.0.2.1" {
		t.Fatalf("got %v, want the answer to the question asked", m)
	}
}

// A guest flooding the forwarder while the first upstream is silent holds
// a bounded number of descriptors, goroutines and bytes (before: one socket,
// one goroutine and 64 KiB per query; 4096 queries added 4096 fds, 4352
// goroutines and 278 MiB), and a resolver's query is still answered by the
// second upstream while the flood goes on.
func TestDNSFloodSilentUpstream(t *testing.T) {
	_, silentAddr := silentUpstream(t)
	upQueries, upAddr := fastUpstream(t)
	cfg := DefaultConfig()
	cfg.Restrict = true
	cfg.DNSUpstreams = []netip.AddrPort{silentAddr, upAddr}
	s, peer := stackOnSocketpair(t, cfg, 0)
	// No guest answers ARP here: tell the stack where the guest is.
	if terr := s.stack.AddStaticNeighbor(nicID, ipv4.ProtocolNumber, tcpipAddr(DefaultGuestAddr), guestMAC); terr != nil {
		t.Fatal(terr)
	}
	const probePort = 5353
	answers := make(chan *dns.Msg, 16)
	go func() {
		buf := make([]byte, 65536)
		for {
			n, err := readPeer(peer, buf)
			if err != nil {
				return // the test closed the socket
			}
			if m := dnsAnswerTo(buf[:n], probePort); m != nil {
				select {
				case answers <- m:
				default:
				}
			}
		}
	}()
	before := footprint()

	frames := make([][]byte, 4096)
	for i := range frames {
		src := netip.AddrPortFrom(DefaultGuestAddr, uint16(10000+i%256))
		frames[i] = udpFrame(src, netip.AddrPortFrom(DefaultDNS, 53), packQuery(uint16(i), "flood.example.test"))
	}
	stop := make(chan struct{})
	flooded := make(chan int)
	var sentSoFar atomic.Int64
	go func() {
		defer func() { flooded <- int(sentSoFar.Load()) }()
		for i := 0; ; i++ {
			select {
			case <-stop:
				return
			default:
			}
			if unix.Send(peer, frames[i%len(frames)], unix.MSG_DONTWAIT) == nil {
				sentSoFar.Add(1)
			}
		}
	}()
	// A resolver asks during the flood, again every 200 ms with a new ID,
	// until one answer comes back: under the flood the forwarder's socket
	// is often full (the flood's own queries are dropped there by the
	// thousand) and answers queue behind the flood's, so how long that
	// takes depends on the machine; the bound is only there to end a
	// broken run.
	var peak footprintStats
	answered := false
	src := netip.AddrPortFrom(DefaultGuestAddr, probePort)
	resend := time.NewTicker(200 * time.Millisecond)
	defer resend.Stop()
	giveUp := time.After(2 * time.Minute)
	// ...and the flood goes on until it has sent more than the forwarder
	// holds.
	for id := uint16(1000); !answered || sentSoFar.Load() < 4*dnsMaxInFlight; {
		peak = peak.max(footprint())
		peak.pending = max(peak.pending, s.dns.pending())
		select {
		case m := <-answers:
			answered = answered || m.Id >= 1000 && len(m.Answer) == 1
		case <-resend.C:
			if _, err := unix.Write(peer, udpFrame(src, netip.AddrPortFrom(DefaultDNS, 53), packQuery(id, "real.example.test"))); err != nil {
				t.Fatal(err)
			}
			id++
		case <-giveUp:
			t.Fatal("no query was answered during the flood")
		}
	}
	close(stop)
	sent := <-flooded
	peak = peak.max(footprint())
	t.Logf("flood of %d queries: before %+v, peak %+v, upstream answered %d", sent, before, peak, upQueries.Load())
	if sent < 4*dnsMaxInFlight {
		t.Errorf("the flood sent only %d queries; the test wants more than the forwarder holds", sent)
	}
	if peak.pending > dnsMaxInFlight {
		t.Errorf("%d queries in flight, bound %d", peak.pending, dnsMaxInFlight)
	}
	// Sockets and their readers: at most dnsMaxConns per upstream.
	if d := peak.fds - before.fds; d > 2*dnsMaxConns {
		t.Errorf("descriptors grew by %d during the flood", d)
	}
	if d := peak.goroutines - before.goroutines; d > 2*dnsMaxConns+16 {
		t.Errorf("goroutines grew by %d during the flood", d)
	}
	if d := int64(peak.heap) - int64(before.heap); d > 32<<20 {
		t.Errorf("heap grew by %d MiB during the flood", d>>20)
	}
}

// dnsAnswerTo parses frame as a DNS answer to the guest's port, or nil.
func dnsAnswerTo(frame []byte, port uint16) *dns.Msg {
	if len(frame) < header.EthernetMinimumSize+header.IPv4MinimumSize || header.Ethernet(frame).Type() != header.IPv4ProtocolNumber {
		return nil
	}
	ip := header.IPv4(frame[header.EthernetMinimumSize:])
	if !ip.IsValid(len(ip)) || ip.Protocol() != uint8(header.UDPProtocolNumber) || len(ip.Payload()) < header.UDPMinimumSize {
		return nil
	}
	u := header.UDP(ip.Payload())
	if u.DestinationPort() != port {
		return nil
	}
	m := new(dns.Msg)
	if m.Unpack(u.Payload()) != nil {
		return nil
	}
	return m
}

type footprintStats struct {
	fds, goroutines, pending int
	heap                     uint64
}

// footprint measures the process: open descriptors, goroutines, and the
// heap in use after a collection.
func footprint() footprintStats {
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	var fs footprintStats
	fs.goroutines = runtime.NumGoroutine()
	fs.heap = ms.HeapInuse
	if fds, err := os.ReadDir("/proc/self/fd"); err == nil {
		fs.fds = len(fds)
	}
	return fs
}

func (a footprintStats) max(b footprintStats) footprintStats {
	return footprintStats{fds: max(a.fds, b.fds), goroutines: max(a.goroutines, b.goroutines),
		pending: max(a.pending, b.pending), heap: max(a.heap, b.heap)}
}

// guestNet is the guest side of a test: its gVisor stack.
type guestNet struct {
	t  *testing.T
	gs *stack.Stack
}

// silentForwarder is a stack whose DNS forwarder asks an upstream that
// never answers: queries stay in flight.
func silentForwarder(t *testing.T) *Stack {
	t.Helper()
	_, silentAddr := silentUpstream(t)
	cfg := DefaultConfig()
	cfg.Restrict = true
	cfg.DNSUpstreams = []netip.AddrPort{silentAddr}
	s, _ := stackOnSocketpair(t, cfg, 0)
	return s
}

// queryTaken sends a query from source to s's full forwarder, which must
// take it (not answer at once).
func queryTaken(t *testing.T, s *Stack, source netip.AddrPort) {
	t.Helper()
	got := make(chan []byte, 1)
	s.dns.query(source, packQuery(7, "real.example.test"), func(m []byte) { got <- m })
	select {
	case m := <-got:
		t.Fatalf("the other source's query was answered at once (rcode %d), not taken", rcode(m))
	default:
	}
}

// rcode is a DNS message's response code.
func rcode(m []byte) int { return int(m[3] & 0xf) }

// A source that fills the forwarder fails its own queries, not others':
// at the bound, a query from another source takes the place of the
// heaviest source's oldest one (which gets SERVFAIL), and the heaviest
// source's next query is refused at once.
func TestDNSFloodCannotLockOutOthers(t *testing.T) {
	s := silentForwarder(t)
	flood := netip.MustParseAddrPort("10.0.2.100:10000")
	var floodFails atomic.Int64
	for i := range dnsMaxInFlight {
		s.dns.query(flood, packQuery(uint16(i), "flood.example.test"), func(m []byte) {
			if rcode(m) == dns.RcodeServerFailure {
				floodFails.Add(1)
			}
		})
	}
	if n := s.dns.pending(); n != dnsMaxInFlight {
		t.Fatalf("%d queries in flight, want the bound %d", n, dnsMaxInFlight)
	}
	queryTaken(t, s, netip.MustParseAddrPort("10.0.2.100:5353"))
	if n := floodFails.Load(); n != 1 {
		t.Errorf("the flood lost %d queries to make room, want 1", n)
	}
	refused := make(chan []byte, 1)
	s.dns.query(flood, packQuery(9999, "flood.example.test"), func(m []byte) { refused <- m })
	select {
	case m := <-refused:
		if rcode(m) != dns.RcodeServerFailure {
			t.Errorf("the flood's next query: rcode %d, want SERVFAIL", rcode(m))
		}
	default:
		t.Error("the flood's next query was taken while the forwarder is full")
	}
}

// A flood from a fresh port per query holds one query per source: a
// query from another source still gets in, in place of the oldest one.
func TestDNSFloodFromFreshPortsCannotLockOutOthers(t *testing.T) {
	s := silentForwarder(t)
	failed := make(chan uint16, dnsMaxInFlight)
	for i := range dnsMaxInFlight {
		s.dns.query(netip.AddrPortFrom(netip.MustParseAddr("10.0.2.100"), uint16(20000+i)), packQuery(uint16(i), "flood.example.test"), func(m []byte) {
			if rcode(m) == dns.RcodeServerFailure {
				failed <- binary.BigEndian.Uint16(m)
			}
		})
	}
	queryTaken(t, s, netip.MustParseAddrPort("10.0.2.100:5353"))
	select {
	case id := <-failed:
		if id != 0 {
			t.Errorf("the flood's query %d made room, want its oldest (0)", id)
		}
	default:
		t.Error("no query made room")
	}
}
