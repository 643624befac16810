package netstack

import (
	"container/list"
	"net/netip"
	"sync"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/checksum"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv4"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv6"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
)

// writeFrame puts an Ethernet frame the stack did not build itself (router
// advertisements, ICMP errors) on the guest's link. A TAP write is one frame,
// so this is safe beside the link endpoint's own writes.
func (s *Stack) writeFrame(frame []byte) {
	if err := s.link.writeFrame(frame); err != nil {
		s.log.Debug("write frame to guest", "err", err)
	}
}

// guardTransport wraps a forwarder's packet handler: flows to the host's
// loopback while it is disabled get ICMP "network unreachable", which is
// what slirp4netns answers and what guests' tools expect ("Network is
// unreachable"), instead of reaching the forwarder.
func (s *Stack) guardTransport(next func(stack.TransportEndpointID, *stack.PacketBuffer) bool) func(stack.TransportEndpointID, *stack.PacketBuffer) bool {
	return func(id stack.TransportEndpointID, pkt *stack.PacketBuffer) bool {
		if s.loopbackBlocked(netipAddr(id.LocalAddress)) {
			s.counters.dropBlocked.Add(1)
			s.sendUnreachable(pkt, header.ICMPv4NetUnreachable, header.ICMPv6NetworkUnreachable)
			return true
		}
		s.noteFirstPacket(id, pkt)
		return next(id, pkt)
	}
}

// firstPacket is what the forwarders need of a flow's first packet that
// gVisor's forwarder requests do not expose.
type firstPacket struct {
	ttl uint8
	// seq is a TCP SYN's sequence number: an ICMP error about the SYN
	// must quote it for the guest's kernel to accept the error.
	seq uint32
	// mac is the guest's Ethernet address it came from.
	mac tcpip.LinkAddress
}

func (s *Stack) noteFirstPacket(id stack.TransportEndpointID, pkt *stack.PacketBuffer) {
	nh := pkt.NetworkHeader().Slice()
	if len(nh) == 0 {
		return
	}
	fp := firstPacket{ttl: header.IPv4(nh).TTL()}
	if eth := header.Ethernet(pkt.LinkHeader().Slice()); len(eth) >= header.EthernetMinimumSize {
		fp.mac = eth.SourceAddress()
	}
	if pkt.NetworkProtocolNumber == header.IPv6ProtocolNumber {
		fp.ttl = header.IPv6(nh).HopLimit()
	}
	if pkt.TransportProtocolNumber == header.TCPProtocolNumber {
		th := header.TCP(pkt.TransportHeader().Slice())
		if len(th) < header.TCPMinimumSize || th.Flags()&(header.TCPFlagSyn|header.TCPFlagAck) != header.TCPFlagSyn {
			return
		}
		fp.seq = th.SequenceNumber()
	}
	s.firstPackets.put(id, fp)
}

// takeFirstPacket returns and forgets what noteFirstPacket saw for id.
func (s *Stack) takeFirstPacket(id stack.TransportEndpointID) (firstPacket, bool) {
	return s.firstPackets.take(id)
}

// maxPendingFirst bounds the first-packet notes waiting for a forwarder.
const maxPendingFirst = 8192

// firstPacketNotes carries notes from the transport guard to the
// forwarders, by endpoint ID. Some are never taken (a SYN the TCP forwarder
// drops at its in-flight limit leaves its note behind), so the oldest note
// makes room for a new one: a full table must not keep new flows from
// getting theirs.
type firstPacketNotes struct {
	mu    sync.Mutex
	byID  map[stack.TransportEndpointID]*list.Element
	order list.List // of *firstPacketNote, oldest first
}

type firstPacketNote struct {
	id stack.TransportEndpointID
	fp firstPacket
}

func (n *firstPacketNotes) put(id stack.TransportEndpointID, fp firstPacket) {
	n.mu.Lock()
	defer n.mu.Unlock()
	if e, ok := n.byID[id]; ok {
		e.Value.(*firstPacketNote).fp = fp
		n.order.MoveToBack(e)
		return
	}
	if n.byID == nil {
		n.byID = map[stack.TransportEndpointID]*list.Element{}
	}
	if n.order.Len() >= maxPendingFirst {
		oldest := n.order.Front()
		delete(n.byID, oldest.Value.(*firstPacketNote).id)
		n.order.Remove(oldest)
	}
	n.byID[id] = n.order.PushBack(&firstPacketNote{id: id, fp: fp})
}

func (n *firstPacketNotes) take(id stack.TransportEndpointID) (firstPacket, bool) {
	n.mu.Lock()
	defer n.mu.Unlock()
	e, ok := n.byID[id]
	if !ok {
		return firstPacket{}, false
	}
	delete(n.byID, id)
	n.order.Remove(e)
	return e.Value.(*firstPacketNote).fp, true
}

func (n *firstPacketNotes) len() int {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.order.Len()
}

// loopbackBlocked reports whether a flow to dst must be refused because
// it would end on the host itself while host loopback is disabled: the
// gateway addresses, loopback addresses (also IPv4-mapped), and every
// address the host's kernel delivers locally (see hostLocal).
func (s *Stack) loopbackBlocked(dst netip.Addr) bool {
	if !s.cfg.DisableHostLoopback {
		return false
	}
	dst = dst.Unmap()
	if dst == s.cfg.Gateway || (s.cfg.IPv6 && dst == s.cfg.Gateway6) || dst.IsLoopback() || dst.IsUnspecified() {
		return true
	}
	return !s.ownAddress(dst) && !s.cfg.Network.Contains(dst) && s.hostLocal.is(dst)
}

// sendUnreachable answers pkt with an ICMP destination unreachable from the
// gateway, quoting pkt's network header and the first 8 bytes after it as
// RFC 792 and RFC 4443 ask.
func (s *Stack) sendUnreachable(pkt *stack.PacketBuffer, code4 header.ICMPv4Code, code6 header.ICMPv6Code) {
	nh := pkt.NetworkHeader().Slice()
	th := pkt.TransportHeader().Slice()
	if len(nh) == 0 {
		return
	}
	quote := append(append([]byte(nil), nh...), th[:min(8, len(th))]...)
	switch pkt.NetworkProtocolNumber {
	case header.IPv4ProtocolNumber:
		guest := netipAddr(header.IPv4(nh).SourceAddress())
		s.sendICMP(guest, s.cfg.Gateway, uint8(header.ICMPv4DstUnreachable), uint8(code4), [4]byte{}, quote, 64)
	case header.IPv6ProtocolNumber:
		guest := netipAddr(header.IPv6(nh).SourceAddress())
		s.sendICMP(guest, s.cfg.Gateway6, uint8(header.ICMPv6DstUnreachable), uint8(code6), [4]byte{}, quote, 64)
	}
}

// sendICMP writes an ICMP (ICMPv6 for an IPv6 guest) message from "from"
// to the guest: type, code, the 4 header bytes after the checksum (echo
// identifier and sequence, or zero for errors) and the body.
func (s *Stack) sendICMP(guest, from netip.Addr, typ, code uint8, rest [4]byte, body []byte, ttl uint8) {
	msg := make([]byte, 8+len(body))
	msg[0], msg[1] = typ, code
	copy(msg[4:8], rest[:])
	copy(msg[8:], body)
	src, dst := tcpipAddr(from), tcpipAddr(guest)
	netProto, proto := header.IPv4ProtocolNumber, header.ICMPv4ProtocolNumber
	if guest.Is6() {
		netProto, proto = header.IPv6ProtocolNumber, header.ICMPv6ProtocolNumber
		header.ICMPv6(msg).SetChecksum(header.ICMPv6Checksum(header.ICMPv6ChecksumParams{Header: msg, Src: src, Dst: dst}))
	} else {
		header.ICMPv4(msg).SetChecksum(^checksum.Checksum(msg, 0))
	}
	frame := s.ipFrame(s.guestMAC(guest), netProto, src, dst, proto, msg)
	ip := frame[header.EthernetMinimumSize:]
	if guest.Is6() {
		header.IPv6(ip).SetHopLimit(ttl)
	} else {
		h := header.IPv4(ip)
		h.SetTTL(ttl)
		h.SetChecksum(0)
		h.SetChecksum(^h.CalculateChecksum())
	}
	s.writeFrame(frame)
}

// guestMAC is the guest's Ethernet address for a, from the stack's
// neighbor table; broadcast (which the guest accepts) if not known yet.
func (s *Stack) guestMAC(a netip.Addr) tcpip.LinkAddress {
	proto := ipv4.ProtocolNumber
	if a.Is6() {
		proto = ipv6.ProtocolNumber
	}
	if entries, err := s.stack.Neighbors(nicID, proto); err == nil {
		want := tcpipAddr(a)
		for _, e := range entries {
			if e.Addr == want && len(e.LinkAddr) == 6 {
				return e.LinkAddr
			}
		}
	}
	return tcpip.LinkAddress([]byte{0xff, 0xff, 0xff, 0xff, 0xff, 0xff})
}

// quotedPacket rebuilds the start of a packet the guest sent (its IP header
// and first 8 bytes of transport header) for the body of an ICMP error the
// host reported on our socket: the guest's kernel matches errors to its
// sockets by exactly these fields.
func quotedPacket(guest, remote netip.Addr, proto tcpip.TransportProtocolNumber, ttl uint8, transport8 []byte) []byte {
	if guest.Is6() {
		q := make([]byte, header.IPv6MinimumSize+len(transport8))
		header.IPv6(q).Encode(&header.IPv6Fields{PayloadLength: uint16(len(transport8)), TransportProtocol: proto, HopLimit: ttl,
			SrcAddr: tcpipAddr(guest), DstAddr: tcpipAddr(remote)})
		copy(q[header.IPv6MinimumSize:], transport8)
		return q
	}
	q := make([]byte, header.IPv4MinimumSize+len(transport8))
	h := header.IPv4(q)
	h.Encode(&header.IPv4Fields{TotalLength: uint16(len(q)), TTL: ttl, Protocol: uint8(proto),
		SrcAddr: tcpipAddr(guest), DstAddr: tcpipAddr(remote)})
	h.SetChecksum(^h.CalculateChecksum())
	copy(q[header.IPv4MinimumSize:], transport8)
	return q
}

// ipFrame wraps payload in IP and Ethernet headers from the gateway to dstMAC.
func (s *Stack) ipFrame(dstMAC tcpip.LinkAddress, netProto tcpip.NetworkProtocolNumber, src, dst tcpip.Address, proto tcpip.TransportProtocolNumber, payload []byte) []byte {
	ipLen := header.IPv4MinimumSize
	if netProto == header.IPv6ProtocolNumber {
		ipLen = header.IPv6MinimumSize
	}
	frame := make([]byte, header.EthernetMinimumSize+ipLen, header.EthernetMinimumSize+ipLen+len(payload))
	header.Ethernet(frame).Encode(&header.EthernetFields{SrcAddr: tcpip.LinkAddress(s.cfg.GatewayMAC), DstAddr: dstMAC, Type: netProto})
	ip := frame[header.EthernetMinimumSize:]
	if netProto == header.IPv4ProtocolNumber {
		h := header.IPv4(ip)
		h.Encode(&header.IPv4Fields{TotalLength: uint16(ipLen + len(payload)), TTL: 64, Protocol: uint8(proto), SrcAddr: src, DstAddr: dst})
		h.SetChecksum(^h.CalculateChecksum())
	} else {
		header.IPv6(ip).Encode(&header.IPv6Fields{PayloadLength: uint16(len(payload)), TransportProtocol: proto, HopLimit: 64, SrcAddr: src, DstAddr: dst})
	}
	return append(frame, payload...)
}
