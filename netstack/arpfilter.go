package netstack

import (
	"encoding/binary"
	"net/netip"

	"gvisor.dev/gvisor/pkg/tcpip/header"
)

// The stack answers ARP for every IPv4 address (promiscuous mode: on-link
// destinations, as every other, are reached through it), but not for what
// a guest asks to learn whether an address is free: a probe (RFC 5227,
// from 0.0.0.0) or an announcement (sender = target) of any address but
// the stack's own. Answering those made every address look taken, and a
// DHCP client that checks (dhcpcd, udhcpc -a, NetworkManager) declined
// every offer.

// arpUnanswered reports whether frame (Ethernet, at least its first part)
// is such an ARP request; own are the stack's IPv4 addresses.
func arpUnanswered(frame []byte, own []netip.Addr) bool {
	const (
		opOff  = header.EthernetMinimumSize + 6
		spaOff = header.EthernetMinimumSize + 14
		tpaOff = header.EthernetMinimumSize + 24
	)
	if len(frame) < tpaOff+4 || binary.BigEndian.Uint16(frame[12:]) != uint16(header.ARPProtocolNumber) ||
		binary.BigEndian.Uint16(frame[opOff:]) != 1 {
		return false
	}
	sender := netip.AddrFrom4([4]byte(frame[spaOff : spaOff+4]))
	target := netip.AddrFrom4([4]byte(frame[tpaOff : tpaOff+4]))
	if !sender.IsUnspecified() && sender != target {
		return false
	}
	for _, a := range own {
		if a == target {
			return false
		}
	}
	return true
}
