package netstack

import (
	"net/netip"

	"golang.org/x/sys/unix"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/checksum"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
)

// writeFrame puts an Ethernet frame the stack did not build itself (router
// advertisements, ICMP errors) on the guest's link. A TAP write is one frame,
// so this is safe beside the link endpoint's own writes.
func (s *Stack) writeFrame(frame []byte) {
	if _, err := unix.Write(int(s.dev.Queues()[0].Fd()), frame); err != nil {
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
			s.sendUnreachable(pkt, header.ICMPv4NetUnreachable, header.ICMPv6NetworkUnreachable)
			return true
		}
		return next(id, pkt)
	}
}

func (s *Stack) loopbackBlocked(dst netip.Addr) bool {
	if !s.cfg.DisableHostLoopback {
		return false
	}
	return dst == s.cfg.Gateway || (s.cfg.IPv6 && dst == s.cfg.Gateway6) || dst.IsLoopback()
}

// sendUnreachable answers pkt with an ICMP destination unreachable from the
// gateway, quoting pkt's network header and the first 8 bytes after it as
// RFC 792 and RFC 4443 ask.
func (s *Stack) sendUnreachable(pkt *stack.PacketBuffer, code4 header.ICMPv4Code, code6 header.ICMPv6Code) {
	eth := header.Ethernet(pkt.LinkHeader().Slice())
	nh := pkt.NetworkHeader().Slice()
	th := pkt.TransportHeader().Slice()
	if len(eth) < header.EthernetMinimumSize || len(nh) == 0 {
		return
	}
	quote := append(append([]byte(nil), nh...), th[:min(8, len(th))]...)
	var frame []byte
	switch pkt.NetworkProtocolNumber {
	case header.IPv4ProtocolNumber:
		guest := header.IPv4(nh).SourceAddress()
		icmp := make([]byte, header.ICMPv4MinimumSize+len(quote))
		icmp[0], icmp[1] = byte(header.ICMPv4DstUnreachable), byte(code4)
		copy(icmp[header.ICMPv4MinimumSize:], quote)
		header.ICMPv4(icmp).SetChecksum(^checksum.Checksum(icmp, 0))
		frame = s.ipFrame(eth.SourceAddress(), header.IPv4ProtocolNumber, tcpipAddr(s.cfg.Gateway), guest, header.ICMPv4ProtocolNumber, icmp)
	case header.IPv6ProtocolNumber:
		guest := header.IPv6(nh).SourceAddress()
		src := tcpipAddr(s.cfg.Gateway6)
		icmp := make([]byte, header.ICMPv6MinimumSize+len(quote))
		icmp[0], icmp[1] = byte(header.ICMPv6DstUnreachable), byte(code6)
		copy(icmp[header.ICMPv6MinimumSize:], quote)
		header.ICMPv6(icmp).SetChecksum(header.ICMPv6Checksum(header.ICMPv6ChecksumParams{Header: icmp, Src: src, Dst: guest}))
		frame = s.ipFrame(eth.SourceAddress(), header.IPv6ProtocolNumber, src, guest, header.ICMPv6ProtocolNumber, icmp)
	default:
		return
	}
	s.writeFrame(frame)
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
