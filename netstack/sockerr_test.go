package netstack

import (
	"encoding/binary"
	"net/netip"
	"testing"
	"time"

	"golang.org/x/sys/unix"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv4"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv6"
)

// extendedErr builds what IP_RECVERR / IPV6_RECVERR put in a control
// message: struct sock_extended_err and the offender's sockaddr.
func extendedErr(origin, typ, code uint8, info uint32, offender netip.Addr) []byte {
	d := make([]byte, 16+28)
	binary.NativeEndian.PutUint32(d[0:], uint32(unix.EMSGSIZE))
	d[4], d[5], d[6] = origin, typ, code
	binary.NativeEndian.PutUint32(d[8:], info)
	sa := d[16:]
	if offender.Is4() {
		binary.NativeEndian.PutUint16(sa, unix.AF_INET)
		copy(sa[4:8], offender.AsSlice())
	} else {
		binary.NativeEndian.PutUint16(sa, unix.AF_INET6)
		copy(sa[8:24], offender.AsSlice())
	}
	return d
}

// noICMP is a type readICMP never matches (reserved in both versions).
const noICMP = 255

// readICMP reads frames from the guest's side of the link until an ICMPv4
// message of type typ4 or an ICMPv6 one of type typ6 arrives, and returns it.
func readICMP(t *testing.T, peer int, typ4, typ6 uint8) []byte {
	t.Helper()
	_ = unix.SetsockoptTimeval(peer, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &unix.Timeval{Sec: 2})
	buf := make([]byte, 65536)
	for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); {
		n, err := readPeer(peer, buf)
		if err != nil {
			break
		}
		var icmp []byte
		typ := typ4
		switch header.Ethernet(buf[:n]).Type() {
		case header.IPv4ProtocolNumber:
			ip := header.IPv4(buf[header.EthernetMinimumSize:n])
			if ip.Protocol() == uint8(header.ICMPv4ProtocolNumber) {
				icmp = ip.Payload()
			}
		case header.IPv6ProtocolNumber:
			ip := header.IPv6(buf[header.EthernetMinimumSize:n])
			if ip.NextHeader() == uint8(header.ICMPv6ProtocolNumber) {
				icmp, typ = ip.Payload(), typ6
			}
		}
		if len(icmp) >= 8 && icmp[0] == typ {
			return append([]byte(nil), icmp...)
		}
	}
	t.Fatalf("no ICMP type %d (ICMPv6 %d) reached the guest", typ4, typ6)
	return nil
}

// "Fragmentation needed" and "packet too big" reach the guest with the MTU
// the router reported (the kernel's ee_info), or path MTU discovery in the
// guest cannot work; the MTU used to arrive as 0.
func TestICMPErrorsCarryMTU(t *testing.T) {
	cfg := DefaultConfig()
	cfg.IPv6 = true
	s, peer := stackOnSocketpair(t, cfg, 0)
	guest6 := netip.MustParseAddr("fd00::100")
	if terr := s.stack.AddStaticNeighbor(nicID, ipv4.ProtocolNumber, tcpipAddr(DefaultGuestAddr), guestMAC); terr != nil {
		t.Fatal(terr)
	}
	if terr := s.stack.AddStaticNeighbor(nicID, ipv6.ProtocolNumber, tcpipAddr(guest6), guestMAC); terr != nil {
		t.Fatal(terr)
	}
	router4, router6 := netip.MustParseAddr("203.0.113.1"), netip.MustParseAddr("2001:db8::1")
	remote4, remote6 := netip.MustParseAddr("198.51.100.5"), netip.MustParseAddr("2001:db8:2::5")

	se := parseExtendedErr(extendedErr(unix.SO_EE_ORIGIN_ICMP, uint8(header.ICMPv4DstUnreachable), uint8(header.ICMPv4FragmentationNeeded), 1280, router4), make([]byte, 8))
	s.relayICMPError(DefaultGuestAddr, remote4, se, quotedPacket(DefaultGuestAddr, remote4, header.UDPProtocolNumber, 64, make([]byte, 8)))
	if m := readICMP(t, peer, uint8(header.ICMPv4DstUnreachable), noICMP); binary.BigEndian.Uint16(m[6:]) != 1280 {
		t.Errorf("fragmentation needed: next-hop MTU %d, want 1280", binary.BigEndian.Uint16(m[6:]))
	}

	se = parseExtendedErr(extendedErr(unix.SO_EE_ORIGIN_ICMP6, uint8(header.ICMPv6PacketTooBig), 0, 1400, router6), make([]byte, 8))
	s.relayICMPError(guest6, remote6, se, quotedPacket(guest6, remote6, header.UDPProtocolNumber, 64, make([]byte, 8)))
	if m := readICMP(t, peer, noICMP, uint8(header.ICMPv6PacketTooBig)); binary.BigEndian.Uint32(m[4:]) != 1400 {
		t.Errorf("packet too big: MTU %d, want 1400", binary.BigEndian.Uint32(m[4:]))
	}

	// A raw ping socket receives the error as a packet: its MTU goes on.
	f := &pingFlow{key: pingKey{DefaultGuestAddr, 9}, mode: pingRaw, wireIdent: 0x7777}
	quoted := make([]byte, 8)
	binary.BigEndian.PutUint16(quoted[4:], 0x7777)
	pkt := append(make([]byte, header.IPv4MinimumSize), 3, 4, 0, 0, 0, 0, 0x05, 0x00)
	header.IPv4(pkt).Encode(&header.IPv4Fields{TotalLength: header.IPv4MinimumSize, TTL: 64})
	pkt = append(pkt, quotedPacket(netip.MustParseAddr("203.0.113.2"), remote4, header.ICMPv4ProtocolNumber, 64, quoted)...)
	f.deliver(s, pkt, router4)
	if m := readICMP(t, peer, uint8(header.ICMPv4DstUnreachable), noICMP); binary.BigEndian.Uint16(m[6:]) != 1280 {
		t.Errorf("raw socket's fragmentation needed: next-hop MTU %d, want 1280", binary.BigEndian.Uint16(m[6:]))
	}
}
