package netstack

import (
	"errors"
	"net"
	"net/netip"
	"time"

	"gvisor.dev/gvisor/pkg/tcpip/adapters/gonet"
	"gvisor.dev/gvisor/pkg/tcpip/transport/tcp"
	"gvisor.dev/gvisor/pkg/waiter"
)

// tcpDialTimeout bounds the host-side connect while the guest's SYN waits;
// about what a guest's own connect would give up after.
const tcpDialTimeout = 75 * time.Second

// handleTCP serves one guest SYN. gVisor calls it on a goroutine of its own.
func (s *Stack) handleTCP(r *tcp.ForwarderRequest) {
	if !s.flows.enter() {
		r.Complete(true)
		return
	}
	defer s.flows.leave()

	id := r.ID()
	dst := netip.AddrPortFrom(netipAddr(id.LocalAddress), id.LocalPort)
	src := netip.AddrPortFrom(netipAddr(id.RemoteAddress), id.RemotePort)
	host, err := s.dialTCP(dst)
	if err != nil {
		s.log.Debug("tcp connect refused", "src", src, "dst", dst, "err", err)
		r.Complete(!errors.Is(err, errSilentDrop))
		return
	}
	var wq waiter.Queue
	ep, terr := r.CreateEndpoint(&wq)
	if terr != nil {
		s.log.Debug("tcp handshake with guest failed", "src", src, "dst", dst, "err", terr)
		r.Complete(true)
		host.Close()
		return
	}
	r.Complete(false)
	start := time.Now()
	up, down := relayTCP(s.ctx, gonet.NewTCPConn(&wq, ep), ep, host)
	s.log.Debug("tcp flow closed", "src", src, "dst", dst, "remote", host.RemoteAddr(),
		"duration", time.Since(start), "bytes_out", up, "bytes_in", down)
}

// dialTCP opens the host side of a guest connection.
func (s *Stack) dialTCP(dst netip.AddrPort) (*net.TCPConn, error) {
	if s.isDNS(dst.Addr()) {
		if s.cfg.DisableDNS {
			return nil, errSilentDrop
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

// outboundAddr is the local address for a host socket to dst: the
// configured outbound address of dst's family, or nil to let the kernel
// choose.
func (s *Stack) outboundAddr(network string, dst netip.Addr) net.Addr {
	a := s.cfg.OutboundAddr4
	if dst.Is6() {
		a = s.cfg.OutboundAddr6
	}
	if !a.IsValid() {
		return nil
	}
	if network == "udp" {
		return net.UDPAddrFromAddrPort(netip.AddrPortFrom(a, 0))
	}
	return net.TCPAddrFromAddrPort(netip.AddrPortFrom(a, 0))
}
