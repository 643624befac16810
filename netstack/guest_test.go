package netstack

import (
	"context"
	"net/netip"
	"testing"
	"time"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/adapters/gonet"
	"gvisor.dev/gvisor/pkg/tcpip/checksum"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/link/fdbased"
	"gvisor.dev/gvisor/pkg/tcpip/network/arp"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv4"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
	"gvisor.dev/gvisor/pkg/tcpip/transport/tcp"
	"gvisor.dev/gvisor/pkg/tcpip/transport/udp"
)

// udpFrame builds a guest UDP datagram from src to dst (IPv4) with valid
// checksums.
func udpFrame(src, dst netip.AddrPort, payload []byte) []byte {
	u := make([]byte, header.UDPMinimumSize+len(payload))
	header.UDP(u).Encode(&header.UDPFields{SrcPort: src.Port(), DstPort: dst.Port(), Length: uint16(len(u))})
	copy(u[header.UDPMinimumSize:], payload)
	s, d := tcpipAddr(src.Addr()), tcpipAddr(dst.Addr())
	xsum := header.PseudoHeaderChecksum(header.UDPProtocolNumber, s, d, uint16(len(u)))
	header.UDP(u).SetChecksum(^checksum.Checksum(u, xsum))
	frame := make([]byte, header.EthernetMinimumSize+header.IPv4MinimumSize)
	header.Ethernet(frame).Encode(&header.EthernetFields{SrcAddr: guestMAC, DstAddr: tcpip.LinkAddress(DefaultGatewayMAC), Type: header.IPv4ProtocolNumber})
	h := header.IPv4(frame[header.EthernetMinimumSize:])
	h.Encode(&header.IPv4Fields{TotalLength: uint16(header.IPv4MinimumSize + len(u)), TTL: 64,
		Protocol: uint8(header.UDPProtocolNumber), SrcAddr: s, DstAddr: d})
	h.SetChecksum(^h.CalculateChecksum())
	return append(frame, u...)
}

// isICMPUnreachable reports whether frame is an ICMPv4 destination
// unreachable with the given code.
func isICMPUnreachable(frame []byte, code header.ICMPv4Code) bool {
	if len(frame) < header.EthernetMinimumSize+header.IPv4MinimumSize+8 || header.Ethernet(frame).Type() != header.IPv4ProtocolNumber {
		return false
	}
	ip := header.IPv4(frame[header.EthernetMinimumSize:])
	if ip.Protocol() != uint8(header.ICMPv4ProtocolNumber) || len(ip.Payload()) < 8 {
		return false
	}
	m := header.ICMPv4(ip.Payload())
	return m.Type() == header.ICMPv4DstUnreachable && m.Code() == code
}

// guestStack runs a second gVisor stack on the other end of the
// socketpair, as the guest's kernel: 10.0.2.100/24, default route via the
// gateway. It closes before the test's socketpair does.
func guestStack(t testing.TB, peer int) *stack.Stack {
	t.Helper()
	gs := stack.New(stack.Options{
		NetworkProtocols:   []stack.NetworkProtocolFactory{ipv4.NewProtocol, arp.NewProtocol},
		TransportProtocols: []stack.TransportProtocolFactory{tcp.NewProtocol, udp.NewProtocol},
	})
	ep, err := fdbased.New(&fdbased.Options{FDs: []int{peer}, MTU: 1500, EthernetHeader: true, Address: guestMAC})
	if err != nil {
		t.Fatal(err)
	}
	if terr := gs.CreateNIC(1, ep); terr != nil {
		t.Fatal(terr)
	}
	pa := tcpip.ProtocolAddress{Protocol: ipv4.ProtocolNumber,
		AddressWithPrefix: tcpip.AddressWithPrefix{Address: tcpipAddr(DefaultGuestAddr), PrefixLen: 24}}
	if terr := gs.AddProtocolAddress(1, pa, stack.AddressProperties{}); terr != nil {
		t.Fatal(terr)
	}
	gs.SetRouteTable([]tcpip.Route{{Destination: header.IPv4EmptySubnet, Gateway: tcpipAddr(DefaultGateway), NIC: 1}})
	t.Cleanup(func() {
		gs.Close()
		gs.Wait()
	})
	return gs
}

// guestDialUDP opens a UDP socket in the guest stack connected to dst.
func guestDialUDP(t testing.TB, gs *stack.Stack, dst netip.AddrPort) *gonet.UDPConn {
	t.Helper()
	c, err := gonet.DialUDP(gs, nil, &tcpip.FullAddress{NIC: 1, Addr: tcpipAddr(dst.Addr()), Port: dst.Port()}, ipv4.ProtocolNumber)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// guestDialTCP connects from the guest stack to dst.
func guestDialTCP(t testing.TB, gs *stack.Stack, dst netip.AddrPort) *gonet.TCPConn {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := gonet.DialContextTCP(ctx, gs, tcpip.FullAddress{NIC: 1, Addr: tcpipAddr(dst.Addr()), Port: dst.Port()}, ipv4.ProtocolNumber)
	if err != nil {
		t.Fatalf("guest connect %s: %v", dst, err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}
