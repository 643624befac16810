package netstack

import (
	"errors"
	"net"
	"net/netip"
	"syscall"
	"time"

	"gvisor.dev/gvisor/pkg/tcpip/adapters/gonet"
	"gvisor.dev/gvisor/pkg/tcpip/transport/udp"
	"gvisor.dev/gvisor/pkg/waiter"
)

// udpIdleTimeout ends a UDP flow (and frees its host socket) after this long
// without a datagram in either direction, like a NAT mapping.
const udpIdleTimeout = 60 * time.Second

// handleUDP serves the first datagram of a new guest UDP flow. gVisor calls
// it on the packet path, so anything that may block runs in a goroutine.
// Returning false makes the stack answer with ICMP port unreachable.
func (s *Stack) handleUDP(r *udp.ForwarderRequest) bool {
	id := r.ID()
	dst := netip.AddrPortFrom(netipAddr(id.LocalAddress), id.LocalPort)
	src := netip.AddrPortFrom(netipAddr(id.RemoteAddress), id.RemotePort)

	var target netip.AddrPort
	isDNS := s.isDNS(dst.Addr())
	if isDNS {
		if s.cfg.DisableDNS {
			return true // dropped without an ICMP error, as slirp4netns does
		}
		if dst.Port() != dnsPort {
			return false
		}
	} else {
		var err error
		if target, err = s.hostTarget(dst); err != nil {
			s.log.Debug("udp flow refused", "src", src, "dst", dst, "err", err)
			return false
		}
	}
	if !s.flows.enter() {
		return true
	}
	var wq waiter.Queue
	ep, terr := r.CreateEndpoint(&wq)
	if terr != nil {
		s.flows.leave()
		s.log.Debug("udp endpoint", "src", src, "dst", dst, "err", terr)
		return true
	}
	guest := gonet.NewUDPConn(&wq, ep)
	go func() {
		defer s.flows.leave()
		if isDNS {
			s.serveDNS(guest)
			return
		}
		s.serveUDP(guest, src, dst, target)
	}()
	return true
}

func (s *Stack) serveUDP(guest *gonet.UDPConn, src, dst, target netip.AddrPort) {
	var laddr *net.UDPAddr
	if a := s.outboundAddr("udp", target.Addr()); a != nil {
		laddr = a.(*net.UDPAddr)
	}
	host, err := net.DialUDP("udp", laddr, net.UDPAddrFromAddrPort(target))
	if err != nil {
		s.log.Debug("udp socket", "src", src, "dst", dst, "err", err)
		guest.Close()
		return
	}
	start := time.Now()
	relayDatagrams(s.ctx, guest, host, udpIdleTimeout)
	s.log.Debug("udp flow closed", "src", src, "dst", dst, "duration", time.Since(start))
}

func isRefused(err error) bool {
	return errors.Is(err, syscall.ECONNREFUSED)
}
