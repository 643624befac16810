package netstack

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"syscall"
	"time"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/transport/tcp"
	"gvisor.dev/gvisor/pkg/waiter"

	"github.com/netns-run/netns-run/netstack/egress"
	"github.com/netns-run/netns-run/netstack/sockrelay"
)

// tcpDialTimeout bounds the host-side connect while the guest's SYN waits;
// about what a guest's own connect would give up after.
const tcpDialTimeout = 75 * time.Second

// maxTCPFlows bounds guest TCP flows, open or being dialed: each holds a host
// socket, two goroutines and gVisor buffers.
const maxTCPFlows = 16384

// The stack's side of a guest connection probes an idle guest: one that
// vanished without a word (its state lost, its address gone) would otherwise
// hold the flow, and the host connection behind it, forever. A guest that
// is alive answers the probes itself, so only idle connections cost a few
// bytes every keepaliveIdle.
const (
	keepaliveIdle     = 2 * time.Minute
	keepaliveInterval = 30 * time.Second
	keepaliveCount    = 4
)

// handleTCP serves one guest SYN. gVisor calls it on a goroutine of its own.
func (s *Stack) handleTCP(r *tcp.ForwarderRequest) {
	if !s.flows.enter() {
		r.Complete(true)
		return
	}
	defer s.flows.leave()

	id := r.ID()
	// The slot is taken before the dial, atomically: counting the flow
	// only once it was up let every SYN being dialed past the limit.
	if !reserve(&s.counters.tcpOpen, s.lim.tcpFlows) {
		s.takeFirstPacket(id)
		s.counters.dropFlowLimit.Add(1)
		r.Complete(true)
		return
	}
	defer s.counters.tcpOpen.Add(-1)
	dst := netip.AddrPortFrom(netipAddr(id.LocalAddress), id.LocalPort)
	src := netip.AddrPortFrom(netipAddr(id.RemoteAddress), id.RemotePort)
	if s.egress.Active() && s.isDNS(dst.Addr()) && !s.cfg.DisableDNS {
		s.serveDNSTCP(r, dst)
		return
	}
	h, _ := s.ktcp.takeHandoff(src, dst)
	var d egress.Decision
	if h.decided {
		d = h.decision
	} else {
		d = s.decideTCP(dst)
	}
	switch {
	case !d.Allowed:
		s.takeFirstPacket(id)
		r.Complete(true)
		return
	case d.Inspect:
		s.serveInspected(r, src, dst, d)
		return
	}
	defer s.egress.Hold(d)()
	var host *net.TCPConn
	var err error
	if h.dialed {
		err = h.dialErr
	} else {
		host, err = s.dialTCP(dst)
	}
	// The note is taken after the dial: a SYN the guest resends while the
	// dial is slow notes it again, and that note would stay behind.
	first, _ := s.takeFirstPacket(id)
	if err != nil {
		s.log.Debug("tcp connect failed", "src", src, "dst", dst, "err", err)
		s.refuseSYN(r, src, dst, first, err)
		return
	}
	var wq waiter.Queue
	ep, terr := r.CreateEndpoint(&wq)
	if terr != nil {
		s.log.Debug("tcp handshake with guest failed", "src", src, "dst", dst, "err", terr)
		r.Complete(true)
		// The host's peer must not take this for a clean close.
		_ = host.SetLinger(0)
		host.Close()
		return
	}
	r.Complete(false)
	if err := s.lim.keepalive.set(ep); err != nil {
		s.log.Debug("tcp keepalive", "src", src, "dst", dst, "err", err)
	}
	s.relayFlow(guestConn{ep: ep, wq: &wq}, host, src, dst, 0)
}

// relayFlow relays an accepted guest connection and its host socket until
// both are done, and counts the flow; sent is what was already written to
// host on the guest's behalf.
func (s *Stack) relayFlow(g guestConn, host *net.TCPConn, src, dst netip.AddrPort, sent int) {
	g.bufs = s.tcpBufs.add(g.ep)
	defer s.tcpBufs.remove(g.ep)
	start := time.Now()
	s.counters.tcpTotal.Add(1)
	s.log.Debug("tcp flow opened", "src", src, "dst", dst, "remote", host.RemoteAddr())
	up, down := relayTCP(s.ctx, g, host)
	up += int64(sent)
	s.counters.bytesFromGuest.Add(uint64(up))
	s.counters.bytesToGuest.Add(uint64(down))
	s.log.Debug("tcp flow closed", "src", src, "dst", dst, "remote", host.RemoteAddr(),
		"duration", time.Since(start), "bytes_out", up, "bytes_in", down)
}

// set turns keepalive on for a gVisor TCP endpoint.
func (k tcpKeepalive) set(ep tcpip.Endpoint) error {
	idle, interval := tcpip.KeepaliveIdleOption(k.idle), tcpip.KeepaliveIntervalOption(k.interval)
	for _, o := range []tcpip.SettableSocketOption{&idle, &interval} {
		if terr := ep.SetSockOpt(o); terr != nil {
			return fmt.Errorf("%T: %s", o, terr)
		}
	}
	if terr := ep.SetSockOptInt(tcpip.KeepaliveCountOption, k.count); terr != nil {
		return fmt.Errorf("keepalive count: %s", terr)
	}
	ep.SocketOptions().SetKeepAlive(true)
	return nil
}

// refuseSYN tells the guest its connection failed the way the host's
// kernel saw it fail: refused and policy blocks as a reset; unreachable
// destinations as ICMP unreachable (so the guest sees EHOSTUNREACH or
// ENETUNREACH); a timeout or a silent drop as nothing at all (the guest's own
// connect times out).
func (s *Stack) refuseSYN(r *tcp.ForwarderRequest, src, dst netip.AddrPort, first firstPacket, err error) {
	var code4 uint8
	var code6 uint8
	switch {
	case errors.Is(err, syscall.EHOSTUNREACH):
		code4, code6 = uint8(header.ICMPv4HostUnreachable), uint8(header.ICMPv6AddressUnreachable)
	case errors.Is(err, syscall.ENETUNREACH):
		code4, code6 = uint8(header.ICMPv4NetUnreachable), uint8(header.ICMPv6NetworkUnreachable)
	case errors.Is(err, errSilentDrop), errors.Is(err, syscall.ETIMEDOUT), errors.Is(err, context.DeadlineExceeded):
		r.Complete(false)
		return
	default:
		r.Complete(true)
		return
	}
	r.Complete(false)
	if first.seq == 0 && first.ttl == 0 {
		return // not noted: the guest's connect times out instead
	}
	var th [8]byte
	binary.BigEndian.PutUint16(th[0:], src.Port())
	binary.BigEndian.PutUint16(th[2:], dst.Port())
	binary.BigEndian.PutUint32(th[4:], first.seq)
	quote := quotedPacket(src.Addr(), dst.Addr(), tcp.ProtocolNumber, max(first.ttl, 1), th[:])
	from, typ, code := s.cfg.Gateway, uint8(header.ICMPv4DstUnreachable), code4
	if src.Addr().Is6() {
		from, typ, code = s.cfg.Gateway6, uint8(header.ICMPv6DstUnreachable), code6
	}
	s.sendICMP(src.Addr(), from, typ, code, [4]byte{}, quote, 64)
}

// dialTCP opens the host side of a guest connection.
func (s *Stack) dialTCP(dst netip.AddrPort) (*net.TCPConn, error) {
	if s.isDNS(dst.Addr()) {
		if s.cfg.DisableDNS {
			return nil, errSilentDrop
		}
		if dst.Port() == dnsTLSPort && s.cfg.Pasta.Enabled {
			return s.dialUpstreamTLS()
		}
		if dst.Port() != dnsPort {
			return nil, errBlocked
		}
		return s.dialDNSUpstreamTCP()
	}
	target, err := s.hostTarget(dst)
	if err != nil {
		return nil, err
	}
	d := net.Dialer{Timeout: tcpDialTimeout, LocalAddr: s.outboundAddr("tcp", target.Addr())}
	c, err := d.DialContext(s.ctx, "tcp", target.String())
	if err != nil {
		return nil, err
	}
	return c.(*net.TCPConn), nil
}

// dialHostSocket opens the host side of a kernel-path connection, as
// dialTCP does for other destinations than the DNS forwarder, as a raw
// descriptor for the relay loops (sockrelay.Dial).
func (s *Stack) dialHostSocket(dst netip.AddrPort) (int, error) {
	target, err := s.hostTarget(dst)
	if err != nil {
		return -1, err
	}
	return sockrelay.Dial(s.ctx, s.outboundIP(target.Addr()), target, tcpDialTimeout)
}

// outboundAddr is the local address for a host socket to dst: the
// configured outbound address of dst's family, or nil to let the kernel
// choose.
func (s *Stack) outboundAddr(network string, dst netip.Addr) net.Addr {
	a := s.outboundIP(dst)
	if !a.IsValid() {
		return nil
	}
	if network == "udp" {
		return net.UDPAddrFromAddrPort(netip.AddrPortFrom(a, 0))
	}
	return net.TCPAddrFromAddrPort(netip.AddrPortFrom(a, 0))
}

// outboundIP is the configured outbound address of dst's family, or the
// zero Addr.
func (s *Stack) outboundIP(dst netip.Addr) netip.Addr {
	if dst.Is6() {
		return s.cfg.OutboundAddr6
	}
	return s.cfg.OutboundAddr4
}
