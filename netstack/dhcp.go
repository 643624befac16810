package netstack

import (
	"bytes"
	"net"
	"net/netip"
	"sync"
	"time"

	"github.com/insomniacslk/dhcp/dhcpv4"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/checksum"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
)

// A DHCP server on the gateway, as libslirp has one for slirp4netns: a guest
// that is not configured from outside (usernet without -c) configures
// itself. The pool is network+15 .. network+30, one address per client MAC
// for the helper's lifetime (so renewals and a client that forgot its lease
// get the same one); router and DNS are the gateway and the forwarder.
const (
	dhcpServerPort = 67
	dhcpClientPort = 68
	dhcpPoolStart  = 15
	dhcpPoolSize   = 16
	dhcpLeaseTime  = 24 * time.Hour
)

// dhcpServer holds the leases. Its methods are safe for concurrent use (the
// stack's packet goroutines call it).
type dhcpServer struct {
	server, dns netip.Addr // dns invalid: none offered
	mask        net.IPMask
	restricted  bool // no router and no DNS, as libslirp's restricted mode

	mu    sync.Mutex
	pool  []netip.Addr
	slots []dhcpSlot // one per pool address
}

type dhcpSlot struct {
	owner net.HardwareAddr // nil: nobody's
	// declinedUntil: a client found the address in use by someone else;
	// it is not offered until then.
	declinedUntil time.Time
}

// dhcpDeclineHold is how long a declined address is kept out of the pool:
// what used it may be gone, and a pool that only shrinks would in the end
// offer nothing.
const dhcpDeclineHold = 10 * time.Minute

func (s dhcpSlot) free() bool { return s.owner == nil && time.Now().After(s.declinedUntil) }

func newDHCPServer(cfg Config) *dhcpServer {
	d := &dhcpServer{
		server:     cfg.Gateway,
		mask:       net.CIDRMask(cfg.Network.Bits(), 32),
		restricted: cfg.Restrict,
	}
	if !cfg.DisableDNS {
		d.dns = cfg.DNS
	}
	last := lastAddr(cfg.Network)
	a := cfg.Network.Masked().Addr()
	for i := 0; i < dhcpPoolStart && a.IsValid(); i++ {
		a = a.Next()
	}
	for i := 0; i < dhcpPoolSize && a.IsValid() && a.Less(last); i, a = i+1, a.Next() {
		if a != cfg.Gateway && a != cfg.DNS {
			d.pool = append(d.pool, a)
		}
	}
	d.slots = make([]dhcpSlot, len(d.pool))
	return d
}

// lastAddr is p's broadcast address.
func lastAddr(p netip.Prefix) netip.Addr {
	b := p.Masked().Addr().As4()
	for i := p.Bits(); i < 32; i++ {
		b[i/8] |= 0x80 >> (i % 8)
	}
	return netip.AddrFrom4(b)
}

// dhcpFirst wraps the UDP transport handler: DHCP requests to the gateway
// (or broadcast) are answered here, before the loopback guard (a renewal
// goes to the gateway address, which that guard may block) and before the
// forwarder (which would send them to the host).
func (s *Stack) dhcpFirst(next func(stack.TransportEndpointID, *stack.PacketBuffer) bool) func(stack.TransportEndpointID, *stack.PacketBuffer) bool {
	d := newDHCPServer(s.cfg)
	return func(id stack.TransportEndpointID, pkt *stack.PacketBuffer) bool {
		if id.LocalPort != dhcpServerPort || pkt.NetworkProtocolNumber != header.IPv4ProtocolNumber {
			return next(id, pkt)
		}
		if dst := netipAddr(id.LocalAddress); dst != s.cfg.Gateway && dst != limitedBroadcast {
			return next(id, pkt)
		}
		reply, err := d.answer(pkt.Data().AsRange().ToSlice())
		if err != nil {
			s.log.Debug("dhcp request dropped", "err", err)
		}
		if reply != nil {
			s.writeFrame(s.dhcpFrame(reply))
		}
		return true
	}
}

// dhcpFrame wraps a reply to the client port of the broadcast address, as
// libslirp sends every reply: a client without an address yet receives it
// as well as one renewing.
func (s *Stack) dhcpFrame(msg []byte) []byte {
	src, dst := tcpipAddr(s.cfg.Gateway), tcpipAddr(limitedBroadcast)
	u := make([]byte, header.UDPMinimumSize+len(msg))
	header.UDP(u).Encode(&header.UDPFields{SrcPort: dhcpServerPort, DstPort: dhcpClientPort, Length: uint16(len(u))})
	copy(u[header.UDPMinimumSize:], msg)
	xsum := header.PseudoHeaderChecksum(header.UDPProtocolNumber, src, dst, uint16(len(u)))
	header.UDP(u).SetChecksum(^checksum.Checksum(u, xsum))
	return s.ipFrame(tcpip.LinkAddress(bytes.Repeat([]byte{0xff}, 6)), header.IPv4ProtocolNumber, src, dst, header.UDPProtocolNumber, u)
}

// answer parses one request and returns the reply to send (nil: none).
func (d *dhcpServer) answer(payload []byte) ([]byte, error) {
	req, err := dhcpv4.FromBytes(payload)
	if err != nil {
		return nil, err
	}
	reply := d.reply(req)
	if reply == nil {
		return nil, nil
	}
	return reply.ToBytes(), nil
}

// reply decides what to answer to req, and updates the leases.
func (d *dhcpServer) reply(req *dhcpv4.DHCPv4) *dhcpv4.DHCPv4 {
	mac := req.ClientHWAddr
	if req.OpCode != dhcpv4.OpcodeBootRequest || len(mac) != 6 {
		return nil
	}
	typ := req.MessageType()
	if typ == dhcpv4.MessageTypeNone {
		typ = dhcpv4.MessageTypeRequest // a BOOTP client, answered like libslirp does
	}
	// A request or release meant for another server is not ours.
	if sid := req.ServerIdentifier(); sid != nil && !sid.Equal(net.IP(d.server.AsSlice())) {
		return nil
	}
	wanted := ip4(req.RequestedIPAddress())
	if !wanted.IsValid() && typ == dhcpv4.MessageTypeRequest {
		wanted = ip4(req.ClientIPAddr) // renewing or rebinding
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	switch typ {
	case dhcpv4.MessageTypeDiscover:
		a, ok := d.lease(mac, wanted, false)
		if !ok {
			return nil // pool exhausted: stay silent, as libslirp does
		}
		return d.offer(req, dhcpv4.MessageTypeOffer, a)
	case dhcpv4.MessageTypeRequest:
		a, ok := d.lease(mac, wanted, wanted.IsValid())
		if !ok {
			if !wanted.IsValid() {
				return nil
			}
			return d.nak(req)
		}
		return d.offer(req, dhcpv4.MessageTypeAck, a)
	case dhcpv4.MessageTypeInform:
		// The client has its address; it asks for the rest (RFC 2131
		// section 4.3.5: no lease, no yiaddr).
		return d.build(req, dhcpv4.MessageTypeAck, netip.Addr{}, d.params()...)
	case dhcpv4.MessageTypeRelease, dhcpv4.MessageTypeDecline:
		// Release: the slot is free again. Decline: the client found
		// the address in use; it asks again and gets another one.
		if i := d.slotOf(mac); i >= 0 && (typ == dhcpv4.MessageTypeDecline || d.pool[i] == ip4(req.ClientIPAddr)) {
			d.slots[i] = dhcpSlot{}
			if typ == dhcpv4.MessageTypeDecline {
				d.slots[i].declinedUntil = time.Now().Add(dhcpDeclineHold)
			}
		}
	}
	return nil
}

// lease returns the address for mac (d.mu held): want if it is in the pool
// and free or already mac's; otherwise, unless exact, mac's own address or
// the first free one.
func (d *dhcpServer) lease(mac net.HardwareAddr, want netip.Addr, exact bool) (netip.Addr, bool) {
	if want.IsValid() {
		for i, a := range d.pool {
			if a == want && (d.slots[i].free() || bytes.Equal(d.slots[i].owner, mac)) {
				d.bind(i, mac)
				return a, true
			}
		}
		if exact {
			return netip.Addr{}, false
		}
	}
	i := d.slotOf(mac)
	if i < 0 {
		for j := range d.slots {
			if d.slots[j].free() {
				i = j
				break
			}
		}
	}
	if i < 0 {
		return netip.Addr{}, false
	}
	d.bind(i, mac)
	return d.pool[i], true
}

// bind gives slot i to mac, taking it from any other slot mac held.
func (d *dhcpServer) bind(i int, mac net.HardwareAddr) {
	if j := d.slotOf(mac); j >= 0 && j != i {
		d.slots[j] = dhcpSlot{}
	}
	d.slots[i] = dhcpSlot{owner: append(net.HardwareAddr(nil), mac...)}
}

func (d *dhcpServer) slotOf(mac net.HardwareAddr) int {
	for i, sl := range d.slots {
		if sl.owner != nil && bytes.Equal(sl.owner, mac) {
			return i
		}
	}
	return -1
}

// params are the options every positive answer carries.
func (d *dhcpServer) params() []dhcpv4.Modifier {
	mods := []dhcpv4.Modifier{dhcpv4.WithNetmask(d.mask)}
	if !d.restricted {
		mods = append(mods, dhcpv4.WithOption(dhcpv4.OptRouter(net.IP(d.server.AsSlice()))))
		if d.dns.IsValid() {
			mods = append(mods, dhcpv4.WithOption(dhcpv4.OptDNS(net.IP(d.dns.AsSlice()))))
		}
	}
	return mods
}

func (d *dhcpServer) offer(req *dhcpv4.DHCPv4, typ dhcpv4.MessageType, a netip.Addr) *dhcpv4.DHCPv4 {
	mods := append(d.params(), dhcpv4.WithLeaseTime(uint32(dhcpLeaseTime/time.Second)))
	return d.build(req, typ, a, mods...)
}

func (d *dhcpServer) nak(req *dhcpv4.DHCPv4) *dhcpv4.DHCPv4 {
	return d.build(req, dhcpv4.MessageTypeNak, netip.Addr{}, dhcpv4.WithOption(dhcpv4.OptMessage("requested address not available")))
}

// build makes a reply of type typ giving address a (invalid: none).
func (d *dhcpServer) build(req *dhcpv4.DHCPv4, typ dhcpv4.MessageType, a netip.Addr, mods ...dhcpv4.Modifier) *dhcpv4.DHCPv4 {
	server := net.IP(d.server.AsSlice())
	mods = append([]dhcpv4.Modifier{
		dhcpv4.WithMessageType(typ),
		dhcpv4.WithServerIP(server),
		dhcpv4.WithOption(dhcpv4.OptServerIdentifier(server)),
	}, mods...)
	if a.IsValid() {
		mods = append(mods, dhcpv4.WithYourIP(net.IP(a.AsSlice())))
	}
	if typ == dhcpv4.MessageTypeAck && !a.IsValid() {
		mods = append(mods, dhcpv4.WithClientIP(req.ClientIPAddr))
	}
	reply, err := dhcpv4.NewReplyFromRequest(req, mods...)
	if err != nil {
		return nil // no transaction ID from the random source: the client retries
	}
	return reply
}

// ip4 converts an IPv4 address from the library; invalid if it is none or
// 0.0.0.0.
func ip4(ip net.IP) netip.Addr {
	a, ok := netip.AddrFromSlice(ip.To4())
	if !ok || a.IsUnspecified() {
		return netip.Addr{}
	}
	return a
}
