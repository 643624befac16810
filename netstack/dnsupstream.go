package netstack

import (
	"encoding/binary"
	"errors"
	"math/rand/v2"
	"net"
	"net/netip"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// The upstream side of the DNS forwarder: its sockets to each upstream,
// what it knows of each upstream's health, and the queries waiting there.

// dnsUpstream is one upstream server and what the forwarder knows of it.
type dnsUpstream struct {
	addr       netip.AddrPort
	conns      []*dnsConn // active ones first, up to dnsActiveConns
	lastAnswer time.Time
	fails      int
	downUntil  time.Time
}

// dnsConn is one connected socket to an upstream and the queries sent on
// it, by wire ID.
type dnsConn struct {
	up      *dnsUpstream
	c       *net.UDPConn
	rc      syscall.RawConn
	pending map[uint16]*dnsQuery
	sent    int
	retired bool
}

// sendLocked sends q to the first upstream from index "from" on that is not
// known to be down. False: none could take it (q is no longer in flight).
func (f *dnsForwarder) sendLocked(q *dnsQuery, from int) bool {
	now := time.Now()
	for i := from; i < len(f.upstreams); i++ {
		up := f.upstreams[i]
		if now.Before(up.downUntil) {
			continue
		}
		c, err := f.connLocked(up)
		if err == nil {
			id := c.freeID()
			binary.BigEndian.PutUint16(q.msg, id)
			if err = c.send(q.msg); err == nil {
				c.pending[id] = q
				c.sent++
				q.upstream, q.conn, q.wireID, q.sent = i, c, id, now
				q.deadline = now.Add(dnsTryTimeout)
				q.elem = f.waiting.PushBack(q)
				if f.waiting.Len() == 1 {
					select {
					case f.kick <- struct{}{}:
					default:
					}
				}
				return true
			}
			f.closeIfDoneLocked(c)
		}
		f.s.log.Debug("dns upstream", "upstream", up.addr, "err", err)
		if !errors.Is(err, unix.EAGAIN) {
			f.markDownLocked(up, now)
		}
	}
	f.doneLocked(q)
	return false
}

// connLocked returns an active socket to up, opening one if there are
// fewer than dnsActiveConns.
func (f *dnsForwarder) connLocked(up *dnsUpstream) (*dnsConn, error) {
	active := 0
	for _, c := range up.conns {
		if !c.retired {
			active++
		}
	}
	if active < dnsActiveConns && len(up.conns) < dnsMaxConns {
		var laddr *net.UDPAddr
		if a := f.s.outboundAddr("udp", up.addr.Addr()); a != nil {
			laddr = a.(*net.UDPAddr)
		}
		uc, err := net.DialUDP("udp", laddr, net.UDPAddrFromAddrPort(up.addr))
		if err != nil {
			return nil, err
		}
		rc, err := uc.SyscallConn()
		if err != nil {
			uc.Close()
			return nil, err
		}
		c := &dnsConn{up: up, c: uc, rc: rc, pending: map[uint16]*dnsQuery{}}
		if !f.s.flows.enter() {
			uc.Close()
			return nil, net.ErrClosed
		}
		up.conns = append(up.conns, c)
		go func() {
			defer f.s.flows.leave()
			f.readUpstream(c)
		}()
	}
	var pick *dnsConn
	n := 0
	for _, c := range up.conns {
		if c.retired {
			continue
		}
		// A random active socket (reservoir sampling).
		if n++; rand.N(n) == 0 {
			pick = c
		}
	}
	if pick == nil {
		return nil, errors.New("no socket")
	}
	if pick.sent+1 >= dnsConnQueries && len(up.conns) < dnsMaxConns {
		pick.retired = true // closed once its last query is done
	}
	return pick, nil
}

// send writes one query without waiting: the forwarder's lock is held, and
// a socket that cannot take a datagram now is as good as a lost one.
func (c *dnsConn) send(m []byte) error {
	var serr error
	err := c.rc.Write(func(fd uintptr) bool {
		serr = unix.Send(int(fd), m, unix.MSG_DONTWAIT)
		return true
	})
	return errors.Join(err, serr)
}

// freeID picks a random wire ID not in use on c.
func (c *dnsConn) freeID() uint16 {
	for {
		id := uint16(rand.N(1 << 16))
		if _, busy := c.pending[id]; !busy {
			return id
		}
	}
}

// closeIfDoneLocked closes a retired socket once no query waits on it.
func (f *dnsForwarder) closeIfDoneLocked(c *dnsConn) {
	if !c.retired || len(c.pending) > 0 {
		return
	}
	c.c.Close()
	up := c.up
	for i, o := range up.conns {
		if o == c {
			up.conns = append(up.conns[:i], up.conns[i+1:]...)
			break
		}
	}
}

func (f *dnsForwarder) markDownLocked(up *dnsUpstream, now time.Time) {
	if now.Before(up.downUntil) {
		return // already down: one failure per backoff period counts
	}
	up.fails++
	if up.fails == 1 {
		f.s.log.Warn("dns upstream does not answer; trying the others first", "upstream", up.addr)
	}
	backoff := dnsBackoffMax
	if up.fails <= 4 {
		backoff = min(dnsBackoffMin<<(up.fails-1), dnsBackoffMax)
	}
	up.downUntil = now.Add(backoff)
}

// expireLoop ends the tries whose time is up, until the forwarder closes.
func (f *dnsForwarder) expireLoop() {
	t := time.NewTimer(dnsTryTimeout)
	defer t.Stop()
	for {
		f.mu.Lock()
		if f.closed || f.s.ctx.Err() != nil {
			f.mu.Unlock()
			return
		}
		now := time.Now()
		var failed []*dnsQuery
		for e := f.waiting.Front(); e != nil && !now.Before(e.Value.(*dnsQuery).deadline); e = f.waiting.Front() {
			if q := e.Value.(*dnsQuery); f.expireLocked(q, now) {
				failed = append(failed, q)
			}
		}
		wait := dnsTryTimeout
		if e := f.waiting.Front(); e != nil {
			wait = e.Value.(*dnsQuery).deadline.Sub(now)
		}
		f.mu.Unlock()
		for _, q := range failed {
			q.reply(servfail(q))
		}
		t.Reset(wait)
		select {
		case <-t.C:
		case <-f.kick:
		case <-f.s.ctx.Done():
		}
	}
}

// expireLocked ends q's try: the next upstream gets it, or the guest a
// SERVFAIL (true) when the upstreams are down. When the one asked last is
// alive (it answered other queries meanwhile), only this query is slow: it
// is dropped and the guest's resolver asks again.
func (f *dnsForwarder) expireLocked(q *dnsQuery, now time.Time) (servfail bool) {
	c := q.conn
	f.waiting.Remove(q.elem)
	delete(c.pending, q.wireID)
	f.closeIfDoneLocked(c)
	silent := c.up.lastAnswer.Before(q.sent)
	if silent {
		f.markDownLocked(c.up, now)
	}
	if f.sendLocked(q, q.upstream+1) {
		return false
	}
	f.s.counters.dnsTimeouts.Add(1)
	return silent
}

// readUpstream hands the answers arriving on c to the guests that asked.
func (f *dnsForwarder) readUpstream(c *dnsConn) {
	buf := make([]byte, dnsMaxMessage)
	for {
		n, err := c.c.Read(buf)
		if errors.Is(err, net.ErrClosed) {
			return
		}
		if err != nil {
			// An ICMP error for an earlier query (port unreachable:
			// nothing listens there): the upstream is down, and what
			// waits on it moves on now rather than after the timeout.
			f.upstreamFailed(c)
			continue
		}
		m := buf[:n]
		if n < 12 || m[2]&0x80 == 0 {
			continue
		}
		question, _, ok := parseDNSQuestion(m)
		f.mu.Lock()
		q := c.pending[binary.BigEndian.Uint16(m)]
		// The ID alone is 16 bits: the question must match too, or this
		// is not the answer (a late one for a reused ID, or forged).
		if q == nil || !ok || question.qtype != q.question.qtype || question.class != q.question.class ||
			!strings.EqualFold(question.name, q.question.name) {
			f.mu.Unlock()
			continue
		}
		delete(c.pending, q.wireID)
		f.waiting.Remove(q.elem)
		c.up.lastAnswer, c.up.fails, c.up.downUntil = time.Now(), 0, time.Time{}
		f.doneLocked(q)
		f.closeIfDoneLocked(c)
		f.mu.Unlock()
		answer := append([]byte(nil), m...)
		binary.BigEndian.PutUint16(answer, q.guestID)
		q.reply(answer)
	}
}

// upstreamFailed marks c's upstream down and moves every query waiting on
// c to the next upstream, or answers it SERVFAIL.
func (f *dnsForwarder) upstreamFailed(c *dnsConn) {
	var failed []*dnsQuery
	f.mu.Lock()
	if f.closed {
		f.mu.Unlock()
		return
	}
	f.markDownLocked(c.up, time.Now())
	for id, q := range c.pending {
		delete(c.pending, id)
		f.waiting.Remove(q.elem)
		if !f.sendLocked(q, q.upstream+1) {
			failed = append(failed, q)
		}
	}
	f.closeIfDoneLocked(c)
	f.mu.Unlock()
	for _, q := range failed {
		q.reply(servfail(q))
	}
}
