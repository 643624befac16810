package netstack

import (
	"encoding/binary"
	"net"
	"net/netip"
	"syscall"
	"time"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/adapters/gonet"
	"gvisor.dev/gvisor/pkg/tcpip/transport/udp"
	"gvisor.dev/gvisor/pkg/waiter"

	"github.com/netns-run/netns-run/netstack/egress"
)

// UDP flows expire as conntrack's do (nf_conntrack_udp_timeout and
// udp_timeout_stream): 30 s while nothing came back or after a single
// exchange, 120 s once the flow is a conversation (still active 2 s after its
// first answer). 120 s is also the least RFC 4787 (REQ-5) allows a NAT's UDP
// mappings, so a peer's keepalives every minute or so keep a flow open,
// while a guest spraying ports holds each port only 30 s.
const (
	udpUnrepliedTimeout = 30 * time.Second
	udpAssuredTimeout   = 120 * time.Second
)

// maxUDPFlows bounds concurrent guest UDP flows (each holds a host socket and
// a goroutine); at the cap a new flow evicts the least recently used one.
const maxUDPFlows = 4096

// handleUDP serves the first datagram of a new guest UDP flow. gVisor calls
// it on the packet path, so anything that may block runs in a goroutine.
// Returning false makes the stack answer with ICMP port unreachable.
func (s *Stack) handleUDP(r *udp.ForwarderRequest) bool {
	id := r.ID()
	first, _ := s.takeFirstPacket(id)
	dst := netip.AddrPortFrom(netipAddr(id.LocalAddress), id.LocalPort)
	src := netip.AddrPortFrom(netipAddr(id.RemoteAddress), id.RemotePort)

	if s.isDNS(dst.Addr()) {
		// Port 53 has the forwarder's own socket (dns.go); what
		// reaches here is for other ports, or the forwarder is off.
		if s.cfg.DisableDNS || dst.Port() == dnsPort {
			return true // dropped without an ICMP error, as slirp4netns does
		}
		return false
	}
	target, err := s.hostTarget(dst)
	if err != nil {
		s.log.Debug("udp flow refused", "src", src, "dst", dst, "err", err)
		return false
	}
	// A denied flow's every datagram comes here (no endpoint is made
	// for it), and is answered.
	d := s.egress.Decide(egress.UDP, dst, target, true)
	if !d.Allowed {
		s.sendProhibited(src, dst, udp.ProtocolNumber, first.ttl)
		return true
	}
	release := s.egress.Hold(d)
	// The host socket is opened here, on the packet path, so that
	// evicting a flow closes both its sockets at once: a guest spraying
	// ports holds at most the table's worth of host sockets, however far
	// behind the flows' own goroutines are.
	host, rc, err := s.dialUDPHost(target, first.ttl)
	if err != nil {
		release()
		s.log.Debug("udp socket", "src", src, "dst", dst, "err", err)
		return true
	}
	if !s.flows.enter() {
		release()
		host.Close()
		return true
	}
	var wq waiter.Queue
	ep, terr := r.CreateEndpoint(&wq)
	if terr != nil {
		release()
		s.flows.leave()
		host.Close()
		s.log.Debug("udp endpoint", "src", src, "dst", dst, "err", terr)
		return true
	}
	// At the cap the least recently used flow goes; closing its sockets
	// ends its relay.
	fl := s.udpFlows.add(func() {
		ep.Abort()
		host.Close()
	})
	flowStarted(&s.counters.udpOpen, &s.counters.udpTotal)
	go func() {
		defer s.flows.leave()
		defer release()
		defer s.counters.udpOpen.Add(-1)
		defer fl.remove()
		s.serveUDP(ep, &wq, host, rc, fl, udpKey{guest: src, remote: dst}, target, first)
	}()
	return true
}

// dialUDPHost opens the host socket of a UDP flow to target, with the
// guest's TTL (traceroute's probes expire where they would have without the
// helper) and ICMP errors reported.
func (s *Stack) dialUDPHost(target netip.AddrPort, ttl uint8) (*net.UDPConn, syscall.RawConn, error) {
	var laddr *net.UDPAddr
	if a := s.outboundAddr("udp", target.Addr()); a != nil {
		laddr = a.(*net.UDPAddr)
	}
	host, err := net.DialUDP("udp", laddr, net.UDPAddrFromAddrPort(target))
	if err != nil {
		return nil, nil, err
	}
	v6 := target.Addr().Is6()
	rc, err := host.SyscallConn()
	if err == nil {
		err = enableRecvErr(rc, v6)
	}
	if err == nil && ttl > 0 {
		err = setHopLimit(rc, v6, int(ttl))
	}
	if err != nil {
		s.log.Debug("udp socket options", "dst", target, "err", err)
	}
	return host, rc, nil
}

func (s *Stack) serveUDP(ep tcpip.Endpoint, wq *waiter.Queue, host *net.UDPConn, rc syscall.RawConn, fl *tableFlow, key udpKey, target netip.AddrPort, first firstPacket) {
	src, dst, ttl := key.guest, key.remote, first.ttl
	hostErr := func() {
		se := readSockError(rc)
		if se == nil {
			return
		}
		var udpHdr [8]byte
		binary.BigEndian.PutUint16(udpHdr[0:], src.Port())
		binary.BigEndian.PutUint16(udpHdr[2:], dst.Port())
		quote := quotedPacket(src.Addr(), dst.Addr(), udp.ProtocolNumber, max(ttl, 1), udpHdr[:])
		s.relayICMPError(src.Addr(), dst.Addr(), se, quote)
	}
	start := time.Now()
	s.log.Debug("udp flow opened", "src", src, "dst", dst, "remote", target)
	// The flow table expires the flow by what it exchanged; the relay's
	// own idle timeout is the longest of those.
	var up, down int64
	if s.udpFast != nil {
		up, down = s.relayUDPFast(s.ctx, ep, wq, host, rc, fl, key, first, hostErr)
	} else {
		guest := gonet.NewUDPConn(wq, ep)
		up, down = relayDatagrams(s.ctx, fl.watch(guest, false), fl.watch(host, true), s.lim.udp.assured, hostErr)
	}
	s.counters.bytesFromGuest.Add(uint64(up))
	s.counters.bytesToGuest.Add(uint64(down))
	s.log.Debug("udp flow closed", "src", src, "dst", dst, "duration", time.Since(start), "bytes_out", up, "bytes_in", down)
}

// relayICMPError hands an ICMP error the host received for a guest flow
// to the guest, from the router that sent it. Errors about the host's
// loopback (the gateway mapping) come from the gateway instead.
func (s *Stack) relayICMPError(guest, remote netip.Addr, se *sockError, quote []byte) {
	from := se.offender
	if from.IsLoopback() {
		from = remote
	}
	if guest.Is4() != from.Is4() {
		return
	}
	s.sendICMP(guest, from, se.icmpType, se.icmpCode, se.rest, quote, 64)
}
