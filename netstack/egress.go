package netstack

import (
	"encoding/binary"
	"net/netip"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/header"

	"github.com/netns-run/netns-run/netstack/egress"
)

// The stack's side of the egress policy (package egress): which flows it
// is asked about, and what the guest sees when one is denied.

// newEgress builds the policy of cfg; the guest's own networks are
// where answers must not point (DNS rebinding).
func newEgress(cfg Config) *egress.Policy {
	e := cfg.Egress
	e.Internal = append([]netip.Prefix(nil), cfg.Network)
	if cfg.IPv6 && cfg.Network6.IsValid() {
		e.Internal = append(e.Internal, cfg.Network6)
	}
	return egress.New(e)
}

// allowed is the decision for flows the policy is not asked about.
var allowed = egress.Decision{Allowed: true}

// decideTCP asks the policy about a guest TCP connection to dst. The
// forwarder's own address is not asked: its queries are decided one by one.
func (s *Stack) decideTCP(dst netip.AddrPort) egress.Decision {
	if !s.egress.Active() || s.isDNS(dst.Addr()) {
		return allowed
	}
	target, err := s.hostTarget(dst)
	if err != nil {
		return allowed // refused on its own
	}
	return s.egress.Decide(egress.TCP, dst, target, false)
}

// sendProhibited tells the guest that its packet from src to dst (proto,
// its first 8 transport bytes, its TTL) was refused by policy: ICMP
// administratively prohibited (IPv4 type 3 code 13, IPv6 type 1 code 1).
func (s *Stack) sendProhibited(src, dst netip.AddrPort, proto tcpip.TransportProtocolNumber, ttl uint8) {
	var th [8]byte
	binary.BigEndian.PutUint16(th[0:], src.Port())
	binary.BigEndian.PutUint16(th[2:], dst.Port())
	quote := quotedPacket(src.Addr(), dst.Addr(), proto, max(ttl, 1), th[:])
	if src.Addr().Is6() {
		s.sendICMP(src.Addr(), s.cfg.Gateway6, uint8(header.ICMPv6DstUnreachable), uint8(header.ICMPv6Prohibited), [4]byte{}, quote, 64)
		return
	}
	s.sendICMP(src.Addr(), s.cfg.Gateway, uint8(header.ICMPv4DstUnreachable), uint8(header.ICMPv4AdminProhibited), [4]byte{}, quote, 64)
}

// EgressPolicy returns the rules in force (the API's get_egress_policy).
func (s *Stack) EgressPolicy() (any, error) { return s.egress.List(), nil }

// AddEgressRule puts "verdict rule" in force for new flows and queries
// and returns its ID (add_egress_rule).
func (s *Stack) AddEgressRule(verdict, rule string) (int, error) {
	v, err := egress.ParseVerdict(verdict)
	if err != nil {
		return 0, err
	}
	r, err := egress.ParseRule(v, rule)
	if err != nil {
		return 0, err
	}
	return s.egress.Add(r), nil
}

// RemoveEgressRule takes rule id out of force (remove_egress_rule).
func (s *Stack) RemoveEgressRule(id int) error { return s.egress.Remove(id) }
