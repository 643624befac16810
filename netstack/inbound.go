package netstack

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"time"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/adapters/gonet"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv4"
	"gvisor.dev/gvisor/pkg/tcpip/transport/tcp"
	"gvisor.dev/gvisor/pkg/tcpip/transport/udp"
	"gvisor.dev/gvisor/pkg/waiter"
)

// guestConnectTimeout bounds a connection attempt into the guest; a guest
// that does not answer SYNs is not worth waiting for longer.
const guestConnectTimeout = 20 * time.Second

// sourceFor is the address the guest sees a host-side client as: the real
// client address, so servers in the guest log and filter real peers, except
// for clients the guest could not route back to (the host's loopback, IPv6
// clients of an IPv4 guest), which appear as the gateway like in slirp4netns.
func (s *Stack) sourceFor(client netip.AddrPort) netip.AddrPort {
	a := client.Addr().Unmap()
	if a.IsLoopback() || a.IsUnspecified() || !a.Is4() || s.cfg.Network.Contains(a) {
		return netip.AddrPortFrom(s.cfg.Gateway, client.Port())
	}
	return netip.AddrPortFrom(a, client.Port())
}

// ForwardTCP connects to guest through the stack with the client's address
// as the source (see sourceFor) and relays conn to it until both sides are
// done. It takes ownership of conn. If the guest refuses, conn is reset.
func (s *Stack) ForwardTCP(conn *net.TCPConn, guest netip.AddrPort) error {
	if !s.flows.enter() {
		conn.Close()
		return net.ErrClosed
	}
	defer s.flows.leave()
	client, _ := netip.ParseAddrPort(conn.RemoteAddr().String())
	src := s.sourceFor(client)
	gc, ep, err := s.dialGuestTCP(src, guest)
	if err != nil {
		_ = conn.SetLinger(0)
		conn.Close()
		return fmt.Errorf("connect to guest %s: %w", guest, err)
	}
	if err := s.lim.keepalive.set(ep); err != nil {
		s.log.Debug("tcp keepalive", "client", client, "guest", guest, "err", err)
	}
	start := time.Now()
	flowStarted(&s.counters.tcpOpen, &s.counters.tcpTotal)
	defer s.counters.tcpOpen.Add(-1)
	s.log.Debug("inbound tcp flow opened", "client", client, "src", src, "guest", guest)
	up, down := relayTCP(s.ctx, gc, ep, conn)
	s.counters.bytesFromGuest.Add(uint64(up))
	s.counters.bytesToGuest.Add(uint64(down))
	s.log.Debug("inbound tcp flow closed", "client", client, "src", src, "guest", guest,
		"duration", time.Since(start), "bytes_in", up, "bytes_out", down)
	return nil
}

func (s *Stack) dialGuestTCP(src, dst netip.AddrPort) (*gonet.TCPConn, tcpip.Endpoint, error) {
	ctx, cancel := context.WithTimeout(s.ctx, guestConnectTimeout)
	defer cancel()
	gc, ep, err := s.connectTCP(ctx, src, dst)
	if errors.Is(err, errSourceInUse) {
		// The client's port is taken by another flow from that address;
		// keep the address, let the stack pick a port.
		gc, ep, err = s.connectTCP(ctx, netip.AddrPortFrom(src.Addr(), 0), dst)
	}
	return gc, ep, err
}

var errSourceInUse = errors.New("source address and port in use")

func (s *Stack) connectTCP(ctx context.Context, src, dst netip.AddrPort) (*gonet.TCPConn, tcpip.Endpoint, error) {
	var wq waiter.Queue
	ep, terr := s.stack.NewEndpoint(tcp.ProtocolNumber, ipv4.ProtocolNumber, &wq)
	if terr != nil {
		return nil, nil, errors.New(terr.String())
	}
	entry, notify := waiter.NewChannelEntry(waiter.WritableEvents)
	wq.EventRegister(&entry)
	defer wq.EventUnregister(&entry)
	if terr := ep.Bind(s.fullAddress(src)); terr != nil {
		ep.Close()
		if _, ok := terr.(*tcpip.ErrPortInUse); ok {
			return nil, nil, errSourceInUse
		}
		return nil, nil, fmt.Errorf("bind %s: %s", src, terr)
	}
	terr = ep.Connect(s.fullAddress(dst))
	if _, ok := terr.(*tcpip.ErrConnectStarted); ok {
		select {
		case <-ctx.Done():
			ep.Abort()
			return nil, nil, ctx.Err()
		case <-notify:
		}
		terr = ep.LastError()
	}
	if terr != nil {
		ep.Close()
		return nil, nil, errors.New(terr.String())
	}
	return gonet.NewTCPConn(&wq, ep), ep, nil
}

// DialGuestUDP opens a UDP flow to guest whose datagrams carry the source
// the guest should see for client (see sourceFor).
func (s *Stack) DialGuestUDP(client, guest netip.AddrPort) (net.Conn, error) {
	src := s.sourceFor(client)
	c, err := s.dialUDP(src, guest)
	if err != nil {
		c, err = s.dialUDP(netip.AddrPortFrom(src.Addr(), 0), guest)
	}
	return c, err
}

func (s *Stack) dialUDP(src, dst netip.AddrPort) (net.Conn, error) {
	var wq waiter.Queue
	ep, terr := s.stack.NewEndpoint(udp.ProtocolNumber, ipv4.ProtocolNumber, &wq)
	if terr != nil {
		return nil, errors.New(terr.String())
	}
	if terr := ep.Bind(s.fullAddress(src)); terr != nil {
		ep.Close()
		return nil, fmt.Errorf("bind %s: %s", src, terr)
	}
	if terr := ep.Connect(s.fullAddress(dst)); terr != nil {
		ep.Close()
		return nil, fmt.Errorf("connect %s: %s", dst, terr)
	}
	return gonet.NewUDPConn(&wq, ep), nil
}

func (s *Stack) fullAddress(ap netip.AddrPort) tcpip.FullAddress {
	return tcpip.FullAddress{NIC: nicID, Addr: tcpipAddr(ap.Addr()), Port: ap.Port()}
}
