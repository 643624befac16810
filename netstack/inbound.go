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
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv6"
	"gvisor.dev/gvisor/pkg/tcpip/transport/tcp"
	"gvisor.dev/gvisor/pkg/tcpip/transport/udp"
	"gvisor.dev/gvisor/pkg/waiter"
)

// guestConnectTimeout bounds a connection attempt into the guest; a guest
// that does not answer SYNs is not worth waiting for longer.
const guestConnectTimeout = 20 * time.Second

// ClientSource is the address the guest sees a host-side client as on a
// flow to guest (see Config.ClientSource; in pasta mode the host's own
// addresses count as the guest's subnet).
func (s *Stack) ClientSource(client, guest netip.AddrPort) netip.AddrPort {
	return clientSource(client, guest, s.cfg.Gateway, s.cfg.Gateway6, s.cfg.Network6, s.sharesGuestSubnet)
}

// ClientSource is the address the guest sees a host-side client as on a
// published port's connection to guest: the real client address, so
// servers in the guest log and filter real peers, except for clients the
// guest could not route back to (the host's loopback, addresses in the
// guest's own subnet, clients of the other family), which appear as the
// gateway of guest's family, as the host's loopback does in slirp4netns.
// (In pasta mode the stack decides with the host's addresses as well.)
func (c Config) ClientSource(client, guest netip.AddrPort) netip.AddrPort {
	return clientSource(client, guest, c.Gateway, c.Gateway6, c.Network6, c.Network.Contains)
}

func clientSource(client, guest netip.AddrPort, gw, gw6 netip.Addr, network6 netip.Prefix, inSubnet func(netip.Addr) bool) netip.AddrPort {
	a := client.Addr().Unmap()
	if guest.Addr().Is6() {
		if a.Is6() && a.IsGlobalUnicast() && !network6.Contains(a) {
			return netip.AddrPortFrom(a, client.Port())
		}
		return netip.AddrPortFrom(gw6, client.Port())
	}
	if a.IsLoopback() || a.IsUnspecified() || !a.Is4() || inSubnet(a) {
		return netip.AddrPortFrom(gw, client.Port())
	}
	return netip.AddrPortFrom(a, client.Port())
}

// guestTarget checks the guest address of an inbound flow: an IPv6 one
// needs a stack with IPv6 (else gVisor fails with "endpoint is in invalid
// state"). IPv4-mapped addresses are IPv4.
func (s *Stack) guestTarget(guest netip.AddrPort) (netip.AddrPort, error) {
	guest = netip.AddrPortFrom(guest.Addr().Unmap(), guest.Port())
	if guest.Addr().Is6() && !s.cfg.IPv6 {
		return guest, fmt.Errorf("guest address %s: the guest network has no IPv6", guest.Addr())
	}
	return guest, nil
}

// ForwardTCP connects to guest through the stack with the client's address
// as the source (see ClientSource) and relays conn to it until both sides are
// done. It takes ownership of conn. If the guest refuses, conn is reset.
func (s *Stack) ForwardTCP(conn *net.TCPConn, guest netip.AddrPort) error {
	if !s.flows.enter() {
		conn.Close()
		return net.ErrClosed
	}
	defer s.flows.leave()
	// Published ports' clients have a bound of their own: counted with
	// the guest's flows, outside clients holding connections open would
	// refuse the guest's own outbound connections.
	if !reserve(&s.counters.tcpInboundOpen, s.lim.tcpFlows) {
		s.counters.dropFlowLimit.Add(1)
		_ = conn.SetLinger(0)
		conn.Close()
		return errors.New("too many published-port connections")
	}
	defer s.counters.tcpInboundOpen.Add(-1)
	client, _ := netip.ParseAddrPort(conn.RemoteAddr().String())
	guest, err := s.guestTarget(guest)
	src := s.ClientSource(client, guest)
	var gc guestConn
	if err == nil {
		gc, err = s.dialGuestTCP(src, guest)
	}
	if err != nil {
		_ = conn.SetLinger(0)
		conn.Close()
		return fmt.Errorf("connect to guest %s: %w", guest, err)
	}
	if err := s.lim.keepalive.set(gc.ep); err != nil {
		s.log.Debug("tcp keepalive", "client", client, "guest", guest, "err", err)
	}
	gc.bufs = s.tcpBufs.add(gc.ep)
	defer s.tcpBufs.remove(gc.ep)
	start := time.Now()
	s.counters.tcpTotal.Add(1)
	s.log.Debug("inbound tcp flow opened", "client", client, "src", src, "guest", guest)
	up, down := relayTCP(s.ctx, gc, conn)
	s.counters.bytesFromGuest.Add(uint64(up))
	s.counters.bytesToGuest.Add(uint64(down))
	s.log.Debug("inbound tcp flow closed", "client", client, "src", src, "guest", guest,
		"duration", time.Since(start), "bytes_in", up, "bytes_out", down)
	return nil
}

func (s *Stack) dialGuestTCP(src, dst netip.AddrPort) (guestConn, error) {
	ctx, cancel := context.WithTimeout(s.ctx, guestConnectTimeout)
	defer cancel()
	gc, err := s.connectTCP(ctx, src, dst)
	if errors.Is(err, errSourceInUse) {
		// The client's port is taken by another flow from that address;
		// keep the address, let the stack pick a port.
		gc, err = s.connectTCP(ctx, netip.AddrPortFrom(src.Addr(), 0), dst)
	}
	return gc, err
}

var errSourceInUse = errors.New("source address and port in use")

func (s *Stack) connectTCP(ctx context.Context, src, dst netip.AddrPort) (guestConn, error) {
	wq := new(waiter.Queue)
	ep, terr := s.stack.NewEndpoint(tcp.ProtocolNumber, netProto(dst.Addr()), wq)
	if terr != nil {
		return guestConn{}, errors.New(terr.String())
	}
	entry, notify := waiter.NewChannelEntry(waiter.WritableEvents)
	wq.EventRegister(&entry)
	defer wq.EventUnregister(&entry)
	if terr := ep.Bind(s.fullAddress(src)); terr != nil {
		ep.Close()
		if _, ok := terr.(*tcpip.ErrPortInUse); ok {
			return guestConn{}, errSourceInUse
		}
		return guestConn{}, fmt.Errorf("bind %s: %s", src, terr)
	}
	terr = ep.Connect(s.fullAddress(dst))
	if _, ok := terr.(*tcpip.ErrConnectStarted); ok {
		select {
		case <-ctx.Done():
			ep.Abort()
			return guestConn{}, ctx.Err()
		case <-notify:
		}
		terr = ep.LastError()
	}
	if terr != nil {
		ep.Close()
		return guestConn{}, errors.New(terr.String())
	}
	return guestConn{ep: ep, wq: wq}, nil
}

// DialGuestUDP opens a UDP flow to guest whose datagrams carry the source
// the guest should see for client (see ClientSource).
func (s *Stack) DialGuestUDP(client, guest netip.AddrPort) (net.Conn, error) {
	guest, err := s.guestTarget(guest)
	if err != nil {
		return nil, err
	}
	src := s.ClientSource(client, guest)
	c, err := s.dialUDP(src, guest)
	if err != nil {
		c, err = s.dialUDP(netip.AddrPortFrom(src.Addr(), 0), guest)
	}
	return c, err
}

func (s *Stack) dialUDP(src, dst netip.AddrPort) (net.Conn, error) {
	var wq waiter.Queue
	ep, terr := s.stack.NewEndpoint(udp.ProtocolNumber, netProto(dst.Addr()), &wq)
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

// netProto is the network protocol of a's family.
func netProto(a netip.Addr) tcpip.NetworkProtocolNumber {
	if a.Is6() {
		return ipv6.ProtocolNumber
	}
	return ipv4.ProtocolNumber
}

func (s *Stack) fullAddress(ap netip.AddrPort) tcpip.FullAddress {
	return tcpip.FullAddress{NIC: nicID, Addr: tcpipAddr(ap.Addr()), Port: ap.Port()}
}
