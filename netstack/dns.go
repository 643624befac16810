package netstack

import (
	"bytes"
	"container/list"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"sync"
	"time"

	"github.com/miekg/dns"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/adapters/gonet"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv4"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv6"
	"gvisor.dev/gvisor/pkg/tcpip/transport/udp"
	"gvisor.dev/gvisor/pkg/waiter"
)

// The DNS forwarder answers the guest on the DNS address (UDP port 53) from
// one socket per address family and relays each query over a few shared,
// connected sockets per upstream, with the query ID rewritten. What a guest
// can make it hold is bounded: dnsMaxInFlight queries waiting for an answer
// (a copy of each, no goroutine, no socket), a handful of sockets per
// upstream, and one reader goroutine per socket. A query past the bound, or
// one no upstream can take, is answered SERVFAIL at once.
const (
	// dnsTryTimeout is how long one upstream gets to answer a query
	// before the next one is asked.
	dnsTryTimeout = 2 * time.Second
	// dnsMaxInFlight bounds the queries of all guests waiting for an
	// upstream; each holds a copy of the query.
	dnsMaxInFlight = 1024
	// dnsMaxQuery is the largest query relayed: resolvers send a name and
	// an EDNS record, a few hundred bytes; anything larger is dropped.
	dnsMaxQuery = 4096
	// dnsMaxMessage is the largest DNS message over UDP (EDNS0 allows up
	// to 64 KiB).
	dnsMaxMessage = 65535
	// dnsActiveConns sockets per upstream carry new queries; each is
	// retired (closed once its queries are done) after dnsConnQueries
	// queries, so the source port the upstream sees changes, and at most
	// dnsMaxConns exist per upstream, retired ones included.
	dnsActiveConns = 2
	dnsConnQueries = 512
	dnsMaxConns    = 6
	// An upstream that answered nothing while a query to it timed out is
	// skipped for dnsBackoffMin, doubling up to dnsBackoffMax while it
	// stays silent, instead of costing every query dnsTryTimeout.
	dnsBackoffMin = 5 * time.Second
	dnsBackoffMax = time.Minute
	// dnsGuestRcvBuf is the receive buffer of the guest-facing sockets:
	// a burst from many resolvers waits there; beyond it the stack drops.
	// gVisor counts payload bytes only, ~50 a query: this holds ~2,600
	// queries, about 3 MiB with their packet buffers (1 MiB held 14 MiB
	// under a flood).
	dnsGuestRcvBuf = 128 << 10
)

var errNoUpstream = errors.New("no DNS upstream configured")

// dnsForwarder relays the guest's UDP DNS queries to the upstreams.
type dnsForwarder struct {
	s *Stack

	mu        sync.Mutex
	closed    bool
	upstreams []*dnsUpstream
	inFlight  int
	// bySource counts the queries in flight per guest source address and
	// port, so a flood from some sources cannot keep out the others.
	bySource map[netip.AddrPort]int
	guests   []*gonet.UDPConn
	// waiting holds the queries sent, by deadline: every try gets the
	// same dnsTryTimeout, so the order they were sent in. One goroutine
	// expires them (a timer per query would be a goroutine per query
	// expiring at once).
	waiting list.List
	kick    chan struct{}
}

// dnsQuery is one guest query waiting for an answer.
type dnsQuery struct {
	source   netip.AddrPort // the guest's address and port
	msg      []byte         // as the guest sent it, but for the ID
	guestID  uint16
	question dnsQuestion
	qEnd     int // end of the question section in msg
	reply    func([]byte)

	upstream int // index of the upstream being asked
	conn     *dnsConn
	wireID   uint16
	sent     time.Time
	deadline time.Time
	elem     *list.Element // in dnsForwarder.waiting
}

type dnsQuestion struct {
	name         string
	qtype, class uint16
}

// parseDNSQuestion reads the header and the one question of a DNS message.
func parseDNSQuestion(m []byte) (q dnsQuestion, end int, ok bool) {
	if len(m) < 12 || binary.BigEndian.Uint16(m[4:]) != 1 {
		return q, 0, false
	}
	name, off, err := dns.UnpackDomainName(m, 12)
	if err != nil || off+4 > len(m) {
		return q, 0, false
	}
	q = dnsQuestion{name: name, qtype: binary.BigEndian.Uint16(m[off:]), class: binary.BigEndian.Uint16(m[off+2:])}
	return q, off + 4, true
}

// startDNS binds the forwarder's guest sockets: UDP port 53 on the DNS
// addresses. Flows to other ports there, and TCP, go through the ordinary
// forwarders.
func (s *Stack) startDNS() error {
	f := &dnsForwarder{s: s, kick: make(chan struct{}, 1), bySource: make(map[netip.AddrPort]int)}
	for _, up := range s.cfg.DNSUpstreams {
		f.upstreams = append(f.upstreams, &dnsUpstream{addr: up})
	}
	s.dns = f
	context.AfterFunc(s.ctx, f.close)
	if !s.flows.spawn(f.expireLoop) {
		return net.ErrClosed
	}
	addrs := []netip.Addr{s.cfg.DNS}
	if s.cfg.IPv6 {
		addrs = append(addrs, s.cfg.DNS6)
	}
	for _, a := range addrs {
		if !a.IsValid() {
			continue // no DNS address of this family (pasta without --dns-forward)
		}
		proto := ipv4.ProtocolNumber
		if a.Is6() {
			proto = ipv6.ProtocolNumber
		}
		var wq waiter.Queue
		ep, terr := s.stack.NewEndpoint(udp.ProtocolNumber, proto, &wq)
		if terr != nil {
			return fmt.Errorf("dns socket: %s", terr)
		}
		ep.SocketOptions().SetReceiveBufferSize(dnsGuestRcvBuf, true)
		if terr := ep.Bind(s.fullAddress(netip.AddrPortFrom(a, dnsPort))); terr != nil {
			ep.Close()
			return fmt.Errorf("dns socket %s: %s", a, terr)
		}
		g := gonet.NewUDPConn(&wq, ep)
		f.mu.Lock()
		closed := f.closed
		if !closed {
			f.guests = append(f.guests, g)
		}
		f.mu.Unlock()
		if closed || !s.flows.spawn(func() { f.serveGuest(g, ep) }) {
			g.Close()
			return net.ErrClosed
		}
	}
	return nil
}

// serveGuest reads the guest's queries from one DNS socket until it closes.
func (f *dnsForwarder) serveGuest(g *gonet.UDPConn, ep tcpip.Endpoint) {
	s := f.s
	buf := make([]byte, dnsMaxMessage)
	for {
		n, from, err := g.ReadFrom(buf)
		if err != nil {
			return
		}
		ua, ok := from.(*net.UDPAddr)
		if !ok {
			continue
		}
		to := s.fullAddress(ua.AddrPort())
		f.query(ua.AddrPort(), buf[:n], func(m []byte) {
			// Never wait on the guest: a full socket drops the answer
			// as a full network would.
			_, _ = ep.Write(bytes.NewReader(m), tcpip.WriteOptions{To: &to})
		})
	}
}

// query relays one guest query from source; reply is called at most once,
// with the answer or a SERVFAIL.
func (f *dnsForwarder) query(source netip.AddrPort, m []byte, reply func([]byte)) {
	if len(m) < 12 || len(m) > dnsMaxQuery || m[2]&0x80 != 0 {
		return // not a query
	}
	if local, forward, filter := f.s.egress.Query(m); !forward {
		if local != nil {
			reply(local)
		}
		return
	} else if filter != nil {
		guest := reply
		reply = func(answer []byte) { guest(filter(answer)) }
	}
	question, qEnd, ok := parseDNSQuestion(m)
	if !ok {
		f.s.log.Debug("dns: malformed query dropped")
		return
	}
	q := &dnsQuery{source: source, msg: append([]byte(nil), m...), guestID: binary.BigEndian.Uint16(m), question: question, qEnd: qEnd, reply: reply}
	f.mu.Lock()
	if f.closed {
		f.mu.Unlock()
		return
	}
	var displaced *dnsQuery
	if f.inFlight >= dnsMaxInFlight {
		// Full: the query goes in only in place of the oldest one of
		// the source that holds most, and only if that source holds
		// more than this one's would: a flood fails its own queries,
		// not everyone's (see displaceLocked for floods from many
		// sources).
		if displaced = f.displaceLocked(source); displaced == nil {
			f.mu.Unlock()
			f.s.counters.dropDNSOverload.Add(1)
			reply(servfail(q))
			return
		}
		f.s.counters.dropDNSOverload.Add(1)
	}
	f.inFlight++
	f.bySource[source]++
	sent := f.sendLocked(q, 0)
	f.mu.Unlock()
	if displaced != nil {
		displaced.reply(servfail(displaced))
	}
	if !sent {
		reply(servfail(q))
	}
}

// displaceLocked takes the oldest query of the source with the most in
// flight out, if that source holds more than one more than source does,
// and returns it (nil: nothing to displace). If no source holds more than
// one, and source none, the oldest query of all goes: a flood from a fresh
// port per query looks like that many clients, and refusing every new
// query would let it lock the others out; this way each gets its turn
// (the flood's rate decides how long).
func (f *dnsForwarder) displaceLocked(source netip.AddrPort) *dnsQuery {
	var heaviest netip.AddrPort
	most := 0
	for src, n := range f.bySource {
		if n > most {
			heaviest, most = src, n
		}
	}
	oldest := false
	switch {
	case most > f.bySource[source]+1:
	case most <= 1 && f.bySource[source] == 0:
		oldest = true
	default:
		return nil
	}
	for e := f.waiting.Front(); e != nil; e = e.Next() {
		q := e.Value.(*dnsQuery)
		if !oldest && q.source != heaviest {
			continue
		}
		f.waiting.Remove(q.elem)
		delete(q.conn.pending, q.wireID)
		f.closeIfDoneLocked(q.conn)
		f.doneLocked(q)
		return q
	}
	return nil
}

// doneLocked counts q out of the queries in flight.
func (f *dnsForwarder) doneLocked(q *dnsQuery) {
	f.inFlight--
	if f.bySource[q.source]--; f.bySource[q.source] <= 0 {
		delete(f.bySource, q.source)
	}
}

// servfail is the answer to q when no upstream could give one.
func servfail(q *dnsQuery) []byte {
	m := append([]byte(nil), q.msg[:q.qEnd]...)
	binary.BigEndian.PutUint16(m, q.guestID)
	m[2] = 0x80 | q.msg[2]&0x79 // QR, the query's opcode and RD
	m[3] = 0x80 | dns.RcodeServerFailure
	clear(m[6:12]) // no answer, authority or additional records
	return m
}

// close stops the forwarder: its sockets close and its goroutines end.
func (f *dnsForwarder) close() {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.closed = true
	for _, g := range f.guests {
		g.Close()
	}
	for _, up := range f.upstreams {
		for _, c := range up.conns {
			c.c.Close()
		}
		up.conns = nil
	}
}

// pending is the number of queries waiting for an upstream.
func (f *dnsForwarder) pending() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.inFlight
}

// tcpOrder is the order to try the upstreams in for a TCP query: those not
// known to be down first.
func (f *dnsForwarder) tcpOrder() []netip.AddrPort {
	f.mu.Lock()
	defer f.mu.Unlock()
	now := time.Now()
	var up, down []netip.AddrPort
	for _, u := range f.upstreams {
		if now.Before(u.downUntil) {
			down = append(down, u.addr)
		} else {
			up = append(up, u.addr)
		}
	}
	return append(up, down...)
}

// dialDNSUpstreamTCP connects to the first upstream that accepts TCP.
func (s *Stack) dialDNSUpstreamTCP() (*net.TCPConn, error) {
	if len(s.cfg.DNSUpstreams) == 0 {
		return nil, errNoUpstream
	}
	var errs []error
	for _, up := range s.dns.tcpOrder() {
		d := net.Dialer{Timeout: dnsTryTimeout, LocalAddr: s.outboundAddr("tcp", up.Addr())}
		c, err := d.DialContext(s.ctx, "tcp", up.String())
		if err == nil {
			return c.(*net.TCPConn), nil
		}
		errs = append(errs, err)
	}
	return nil, errors.Join(errs...)
}
