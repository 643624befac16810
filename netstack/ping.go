package netstack

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
	"gvisor.dev/gvisor/pkg/tcpip/checksum"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/stack"

	"github.com/netns-run/netns-run/netstack/egress"
)

// Guest echo requests to outside hosts leave through a real ICMP socket on
// the host, never answered by the stack itself: a reply means the host
// answered. Unprivileged ping sockets (SOCK_DGRAM, allowed for the groups in
// net.ipv4.ping_group_range of the helper's network namespace) are preferred;
// raw sockets need CAP_NET_RAW. Go's net package has neither, hence
// x/sys/unix.

type pingMode int

const (
	pingNone  pingMode = iota
	pingDgram          // unprivileged ICMP socket; the kernel owns the identifier
	pingRaw            // raw socket; we choose the identifier and filter replies
)

func (m pingMode) String() string {
	return [...]string{"unavailable", "ping socket", "raw socket"}[m]
}

// A ping flow (one guest ping process) ends pingIdle after its last echo
// request or reply; at maxPingFlows a new one evicts the least recently used.
const (
	pingIdle     = 30 * time.Second
	maxPingFlows = 256
)

// detectPingMode finds the way echo requests can leave, by trying what the
// kernel allows (that is exactly the ping_group_range and CAP_NET_RAW check).
func detectPingMode(v6 bool) pingMode {
	family, proto := unix.AF_INET, unix.IPPROTO_ICMP
	if v6 {
		family, proto = unix.AF_INET6, unix.IPPROTO_ICMPV6
	}
	for _, m := range []pingMode{pingDgram, pingRaw} {
		typ := unix.SOCK_DGRAM
		if m == pingRaw {
			typ = unix.SOCK_RAW
		}
		if fd, err := unix.Socket(family, typ|unix.SOCK_CLOEXEC, proto); err == nil {
			unix.Close(fd)
			return m
		}
	}
	return pingNone
}

type pingKey struct {
	guest netip.Addr
	ident uint16
}

// pinger forwards guest echo requests, one host socket per guest
// (address, identifier) so each ping process gets its own replies.
type pinger struct {
	s            *Stack
	mode4, mode6 pingMode
	warn         sync.Once

	table *flowTable

	mu      sync.Mutex
	flows   map[pingKey]*pingFlow
	nextRaw uint16
}

func newPinger(s *Stack) *pinger {
	p := &pinger{s: s, mode4: detectPingMode(false), flows: map[pingKey]*pingFlow{},
		table: newFlowTable(s.ctx, &s.flows, s.lim.pingFlows, s.lim.ping)}
	if s.cfg.IPv6 {
		p.mode6 = detectPingMode(true)
	}
	s.log.Debug("icmp echo to outside hosts", "ipv4", p.mode4, "ipv6", p.mode6)
	return p
}

// handle is the stack's default handler for ICMP: echo requests that no
// local address answers.
func (p *pinger) handle(id stack.TransportEndpointID, pkt *stack.PacketBuffer) bool {
	hdr := pkt.TransportHeader().Slice()
	nh := pkt.NetworkHeader().Slice()
	if len(hdr) < 8 || len(nh) == 0 {
		return false
	}
	v6 := pkt.NetworkProtocolNumber == header.IPv6ProtocolNumber
	var ttl uint8
	if v6 {
		if hdr[0] != byte(header.ICMPv6EchoRequest) {
			return false
		}
		ttl = header.IPv6(nh).HopLimit()
	} else {
		if hdr[0] != byte(header.ICMPv4Echo) {
			return false
		}
		ttl = header.IPv4(nh).TTL()
	}
	dst := netipAddr(id.LocalAddress)
	guest := netipAddr(id.RemoteAddress)
	if p.s.ownAddress(dst) {
		return false // the stack answers for its own addresses
	}
	if p.s.loopbackBlocked(dst) {
		p.s.counters.dropBlocked.Add(1)
		p.s.sendUnreachable(pkt, header.ICMPv4NetUnreachable, header.ICMPv6NetworkUnreachable)
		return true
	}
	target, err := p.s.hostTarget(netip.AddrPortFrom(dst, 1))
	if err != nil {
		return true
	}
	if d := p.s.egress.Decide(egress.ICMP, netip.AddrPortFrom(dst, 0), netip.AddrPortFrom(target.Addr(), 0), true); !d.Allowed {
		p.s.sendUnreachable(pkt, header.ICMPv4AdminProhibited, header.ICMPv6Prohibited)
		return true
	}
	mode := p.mode4
	if v6 {
		mode = p.mode6
	}
	if mode == pingNone {
		p.s.counters.dropICMPUnavailable.Add(1)
		p.warn.Do(func() { p.s.log.Warn(pingUnavailable()) })
		return true
	}
	ident, seq := binary.BigEndian.Uint16(hdr[4:]), binary.BigEndian.Uint16(hdr[6:])
	f, err := p.flow(pingKey{guest, ident}, v6, mode)
	if err != nil {
		p.s.log.Debug("icmp echo", "guest", guest, "dst", dst, "err", err)
		return true
	}
	data := pkt.Data().AsRange().ToSlice()
	f.entry.touch(false)
	if err := f.send(dst, seq, ttl, data); errors.Is(err, unix.EAGAIN) {
		// This runs on the TAP reader: never wait for the socket.
		p.s.counters.dropPingFull.Add(1)
	} else if err != nil {
		p.s.log.Debug("icmp echo send", "guest", guest, "dst", dst, "err", err)
	}
	return true
}

// pingUnavailable is the one message printed when a guest pings out and
// the host allows neither kind of ICMP socket.
func pingUnavailable() string {
	r, _ := os.ReadFile("/proc/sys/net/ipv4/ping_group_range")
	return fmt.Sprintf("ping to outside hosts is unavailable: gid %d is not in net.ipv4.ping_group_range (%s) and raw sockets need CAP_NET_RAW; "+
		"allow it with `sudo sysctl -w net.ipv4.ping_group_range=\"0 2147483647\"` (echo requests are dropped until then)",
		os.Getgid(), strings.Join(strings.Fields(string(r)), " "))
}

func (p *pinger) flow(k pingKey, v6 bool, mode pingMode) (*pingFlow, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if f, ok := p.flows[k]; ok && !f.closed.Load() {
		return f, nil
	}
	var wireIdent uint16
	if mode == pingRaw {
		p.nextRaw++
		wireIdent = p.nextRaw ^ uint16(os.Getpid())
	}
	f, err := openPingFlow(k, v6, mode, wireIdent, p.s.outboundIP(k.guest))
	if err != nil {
		return nil, err
	}
	if !p.s.flows.enter() {
		f.file.Close()
		return nil, errors.New("stack closing")
	}
	p.flows[k] = f
	// The table expires the flow on its own echoes and replies (not on
	// whatever else the host receives) and evicts the least recently
	// used one at the cap; closing the socket ends receive.
	f.entry = p.table.add(f.close)
	flowStarted(&p.s.counters.icmpOpen, &p.s.counters.icmpTotal)
	go func() {
		defer p.s.flows.leave()
		defer p.s.counters.icmpOpen.Add(-1)
		// Closing the socket ends receive when the stack stops.
		stop := context.AfterFunc(p.s.ctx, func() { f.file.Close() })
		defer stop()
		f.receive(p.s)
		f.entry.remove()
		p.mu.Lock()
		if p.flows[k] == f {
			delete(p.flows, k)
		}
		p.mu.Unlock()
	}()
	return f, nil
}

// pingFlow is the host socket of one guest ping process.
type pingFlow struct {
	key       pingKey
	v6        bool
	mode      pingMode
	wireIdent uint16 // raw mode: the identifier on the wire
	file      *os.File
	rc        syscall.RawConn
	entry     *tableFlow
	closed    atomic.Bool

	mu      sync.Mutex
	ttl     uint8
	lastDst netip.Addr
}

// openPingFlow opens the host socket of one ping flow, bound to local if
// that is valid; wireIdent is the identifier a raw socket sends with.
func openPingFlow(k pingKey, v6 bool, mode pingMode, wireIdent uint16, local netip.Addr) (*pingFlow, error) {
	family, proto := unix.AF_INET, unix.IPPROTO_ICMP
	if v6 {
		family, proto = unix.AF_INET6, unix.IPPROTO_ICMPV6
	}
	typ := unix.SOCK_DGRAM
	if mode == pingRaw {
		typ = unix.SOCK_RAW
	}
	fd, err := unix.Socket(family, typ|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, proto)
	if err != nil {
		return nil, fmt.Errorf("icmp socket: %w", err)
	}
	f := &pingFlow{key: k, v6: v6, mode: mode, wireIdent: wireIdent, file: os.NewFile(uintptr(fd), "icmp")}
	if local.IsValid() {
		var sa unix.Sockaddr = &unix.SockaddrInet4{Addr: local.As4()}
		if v6 {
			sa = &unix.SockaddrInet6{Addr: local.As16()}
		}
		if err = unix.Bind(fd, sa); err != nil {
			err = fmt.Errorf("icmp socket: bind %s: %w", local, err)
		}
	}
	if err == nil {
		f.rc, err = f.file.SyscallConn()
	}
	if err == nil && mode == pingDgram {
		err = enableRecvErr(f.rc, v6)
	}
	if err == nil && mode == pingRaw {
		err = filterRaw(fd, v6, wireIdent)
	}
	if err != nil {
		f.file.Close()
		return nil, err
	}
	return f, nil
}

// close ends the flow (its socket, and with it receive); the flow table
// calls it when the flow expires or is evicted.
func (f *pingFlow) close() {
	f.closed.Store(true)
	f.file.Close()
}

func (f *pingFlow) send(dst netip.Addr, seq uint16, ttl uint8, data []byte) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if ttl != f.ttl {
		if err := setHopLimit(f.rc, f.v6, int(ttl)); err != nil {
			return err
		}
		f.ttl = ttl
	}
	f.lastDst = dst
	msg := make([]byte, 8+len(data))
	msg[0] = byte(header.ICMPv4Echo)
	if f.v6 {
		msg[0] = byte(header.ICMPv6EchoRequest)
	}
	binary.BigEndian.PutUint16(msg[4:], f.wireIdent) // ping sockets overwrite it
	binary.BigEndian.PutUint16(msg[6:], seq)
	copy(msg[8:], data)
	if f.mode == pingRaw && !f.v6 {
		// The kernel checksums ICMPv6 itself, and ping sockets both.
		binary.BigEndian.PutUint16(msg[2:], ^checksum.Checksum(msg, 0))
	}
	var sa unix.Sockaddr
	if f.v6 {
		sa = &unix.SockaddrInet6{Addr: dst.As16()}
	} else {
		sa = &unix.SockaddrInet4{Addr: dst.As4()}
	}
	// Never wait: this runs on the TAP reader, and a full socket drops
	// the request as a full link would.
	var serr error
	err := f.rc.Control(func(fd uintptr) {
		serr = unix.Sendto(int(fd), msg, unix.MSG_DONTWAIT, sa)
	})
	return errors.Join(err, serr)
}

// receive relays replies and errors to the guest until the socket closes.
func (f *pingFlow) receive(s *Stack) {
	defer f.file.Close()
	buf := make([]byte, 65536)
	for {
		var n int
		var from unix.Sockaddr
		var rerr error
		err := f.rc.Read(func(fd uintptr) bool {
			n, from, rerr = unix.Recvfrom(int(fd), buf, unix.MSG_DONTWAIT)
			return !errors.Is(rerr, unix.EAGAIN)
		})
		if err != nil {
			return // closed: expired, evicted or the stack stopped
		}
		if rerr != nil {
			if f.mode == pingDgram {
				if se := readSockError(f.rc); se != nil {
					f.relayError(s, se)
				}
			}
			continue
		}
		f.deliver(s, buf[:n], sockaddrAddr(from))
	}
}

// deliver handles one datagram read from the socket.
func (f *pingFlow) deliver(s *Stack, b []byte, from netip.Addr) {
	if f.mode == pingRaw && !f.v6 {
		// IPv4 raw sockets see the IP header too.
		if len(b) < header.IPv4MinimumSize {
			return
		}
		b = b[header.IPv4(b).HeaderLength():]
	}
	if len(b) < 8 {
		return
	}
	replyType, errTypes := byte(header.ICMPv4EchoReply), []byte{byte(header.ICMPv4DstUnreachable), byte(header.ICMPv4TimeExceeded)}
	if f.v6 {
		replyType = byte(header.ICMPv6EchoReply)
		errTypes = []byte{byte(header.ICMPv6DstUnreachable), byte(header.ICMPv6PacketTooBig), byte(header.ICMPv6TimeExceeded)}
	}
	switch {
	case b[0] == replyType:
		if f.mode == pingRaw && binary.BigEndian.Uint16(b[4:]) != f.wireIdent {
			return // another process's reply (the socket filter lets none through)
		}
		f.entry.touch(true)
		var rest [4]byte
		binary.BigEndian.PutUint16(rest[:], f.key.ident)
		copy(rest[2:], b[6:8])
		s.sendICMP(f.key.guest, from, replyType, 0, rest, b[8:], 64)
	case f.mode == pingRaw && bytes.IndexByte(errTypes, b[0]) >= 0:
		// A raw socket receives errors as packets: match the quoted echo.
		q := b[8:]
		ipLen := header.IPv6MinimumSize
		if !f.v6 {
			if len(q) < header.IPv4MinimumSize {
				return
			}
			ipLen = int(header.IPv4(q).HeaderLength())
		}
		if len(q) < ipLen+8 || binary.BigEndian.Uint16(q[ipLen+4:]) != f.wireIdent {
			return
		}
		var dst netip.Addr
		if f.v6 {
			dst = netipAddr(header.IPv6(q).DestinationAddress())
		} else {
			dst = netipAddr(header.IPv4(q).DestinationAddress())
		}
		f.relayError(s, &sockError{icmpType: b[0], icmpCode: b[1], rest: [4]byte(b[4:8]), offender: from, payload: q[ipLen:], dest: dst})
	}
}

// relayError passes an ICMP error about one of our echo requests to the
// guest, quoting the request as the guest sent it.
func (f *pingFlow) relayError(s *Stack, se *sockError) {
	if len(se.payload) < 8 {
		return
	}
	dst := se.dest
	if !dst.IsValid() {
		f.mu.Lock()
		dst = f.lastDst
		f.mu.Unlock()
	}
	echo := append([]byte(nil), se.payload[:8]...)
	binary.BigEndian.PutUint16(echo[4:], f.key.ident)
	proto := header.ICMPv4ProtocolNumber
	if f.v6 {
		proto = header.ICMPv6ProtocolNumber
	}
	quote := quotedPacket(f.key.guest, dst, proto, 1, echo)
	s.sendICMP(f.key.guest, se.offender, se.icmpType, se.icmpCode, se.rest, quote, 64)
}

func sockaddrAddr(sa unix.Sockaddr) netip.Addr {
	switch sa := sa.(type) {
	case *unix.SockaddrInet4:
		return netip.AddrFrom4(sa.Addr)
	case *unix.SockaddrInet6:
		return netip.AddrFrom16(sa.Addr).Unmap()
	}
	return netip.Addr{}
}
