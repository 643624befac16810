package netstack

import (
	"encoding/binary"
	"net/netip"
	"time"

	"gvisor.dev/gvisor/pkg/tcpip/header"
)

// Router advertisements give an IPv6 guest its prefix (SLAAC), default
// router, MTU and DNS server (RDNSS), as libslirp does for slirp4netns -6.
// gVisor only consumes RAs, so the stack writes them itself: unsolicited, a
// few times at start-up (the guest's own solicitation may predate the
// stack) and then well within the router lifetime.
const (
	raRouterLifetime = 1800 // seconds
	raValidLifetime  = 86400
	raPreferred      = 14400
	raPeriod         = 200 * time.Second
)

var (
	linkLocalGateway = netip.MustParseAddr("fe80::2")
	allNodes         = netip.MustParseAddr("ff02::1")
)

// routerAdvertisement builds the Ethernet frame of one RA.
func (s *Stack) routerAdvertisement() []byte {
	mac := s.cfg.GatewayMAC
	var icmp []byte
	// Type, code, checksum, hop limit 64, no M/O flags, router lifetime,
	// reachable time and retransmit timer unspecified.
	icmp = append(icmp, byte(header.ICMPv6RouterAdvert), 0, 0, 0, 64, 0)
	icmp = binary.BigEndian.AppendUint16(icmp, raRouterLifetime)
	icmp = append(icmp, 0, 0, 0, 0, 0, 0, 0, 0)
	// Source link-layer address.
	icmp = append(icmp, 1, 1)
	icmp = append(icmp, mac...)
	// MTU.
	icmp = append(icmp, 5, 1, 0, 0)
	icmp = binary.BigEndian.AppendUint32(icmp, s.cfg.MTU)
	// Prefix information: on-link, autonomous.
	prefix := s.cfg.Network6.Masked().Addr().As16()
	icmp = append(icmp, 3, 4, byte(s.cfg.Network6.Bits()), 0xc0)
	icmp = binary.BigEndian.AppendUint32(icmp, raValidLifetime)
	icmp = binary.BigEndian.AppendUint32(icmp, raPreferred)
	icmp = append(icmp, 0, 0, 0, 0)
	icmp = append(icmp, prefix[:]...)
	// Recursive DNS server: only a forwarder that answers (none with
	// DisableDNS; none in pasta mode without an IPv6 --dns-forward,
	// where :: would make strict receivers drop the whole RA).
	if s.cfg.DNS6.Is6() && !s.cfg.DNS6.IsUnspecified() && !s.cfg.DisableDNS {
		dns := s.cfg.DNS6.As16()
		icmp = append(icmp, 25, 3, 0, 0)
		icmp = binary.BigEndian.AppendUint32(icmp, raRouterLifetime)
		icmp = append(icmp, dns[:]...)
	}

	src, dst := tcpipAddr(linkLocalGateway), tcpipAddr(allNodes)
	binary.BigEndian.PutUint16(icmp[2:], header.ICMPv6Checksum(header.ICMPv6ChecksumParams{Header: icmp, Src: src, Dst: dst}))

	frame := s.ipFrame(header.EthernetAddressFromMulticastIPv6Address(dst), header.IPv6ProtocolNumber, src, dst, header.ICMPv6ProtocolNumber, icmp)
	// Neighbor discovery messages must arrive with hop limit 255.
	header.IPv6(frame[header.EthernetMinimumSize:]).SetHopLimit(255)
	return frame
}

// advertiseRouter sends RAs until the stack closes.
func (s *Stack) advertiseRouter() {
	frame := s.routerAdvertisement()
	send := func() { s.writeFrame(frame) }
	for _, d := range []time.Duration{0, 500 * time.Millisecond, time.Second, 2 * time.Second, 4 * time.Second} {
		select {
		case <-s.ctx.Done():
			return
		case <-time.After(d):
			send()
		}
	}
	t := time.NewTicker(raPeriod)
	defer t.Stop()
	for {
		select {
		case <-s.ctx.Done():
			return
		case <-t.C:
			send()
		}
	}
}
