package netstack

import (
	"net/netip"
)

var (
	hostLoopback4 = netip.MustParseAddr("127.0.0.1")
	hostLoopback6 = netip.IPv6Loopback()
)

// ownAddress reports whether the stack itself owns a (and answers for it).
func (s *Stack) ownAddress(a netip.Addr) bool {
	if a == s.cfg.Gateway || a == s.cfg.DNS {
		return true
	}
	return s.cfg.IPv6 && (a == s.cfg.Gateway6 || a == s.cfg.DNS6 || a == linkLocalGateway)
}

// isDNS reports whether a is one of the forwarder's addresses.
func (s *Stack) isDNS(a netip.Addr) bool {
	return a == s.cfg.DNS || (s.cfg.IPv6 && a == s.cfg.DNS6)
}

// hostTarget maps the destination a guest flow was sent to onto the address
// the helper connects to on the host, or refuses it.
//
// The DNS address is not handled here: its flows go to the forwarder.
func (s *Stack) hostTarget(dst netip.AddrPort) (netip.AddrPort, error) {
	a := dst.Addr().Unmap()
	if t, ok := s.cfg.Pasta.HostMap[a]; ok && !s.cfg.Restrict {
		return netip.AddrPortFrom(t, dst.Port()), nil
	}
	switch {
	case s.cfg.Restrict, s.loopbackBlocked(a):
		// loopbackBlocked is the one rule for host loopback; the
		// transport guard applies it first, this repeats it for every
		// other caller.
		return netip.AddrPort{}, errBlocked
	case a == s.cfg.Gateway && !s.cfg.Pasta.NoGatewayMap:
		return netip.AddrPortFrom(hostLoopback4, dst.Port()), nil
	case s.cfg.IPv6 && a == s.cfg.Gateway6 && !s.cfg.Pasta.NoGatewayMap:
		return netip.AddrPortFrom(hostLoopback6, dst.Port()), nil
	case a.IsUnspecified(), a.IsMulticast(), a == limitedBroadcast, a.Is6() && a.IsLinkLocalUnicast():
		return netip.AddrPort{}, errBlocked
	case !s.cfg.Pasta.Enabled && (s.cfg.Network.Contains(a) || s.cfg.IPv6 && s.cfg.Network6.Contains(a)):
		// Nothing but the gateway and DNS lives in the guest subnet
		// (in pasta's addressing it is the host's, with real hosts).
		return netip.AddrPort{}, errBlocked
	}
	if dst.Port() == 0 {
		return netip.AddrPort{}, errBlocked
	}
	return netip.AddrPortFrom(a, dst.Port()), nil
}

var limitedBroadcast = netip.MustParseAddr("255.255.255.255")
