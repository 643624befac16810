package netstack

import (
	"net/netip"
	"testing"
)

// TestSourceFor: the guest sees inbound clients as they are where it can
// route back to them in the flow's family, else as that family's gateway.
func TestSourceFor(t *testing.T) {
	cfg := DefaultConfig()
	cfg.IPv6 = true
	s := &Stack{cfg: cfg}
	v4, v6 := netip.MustParseAddrPort("10.0.2.100:80"), netip.MustParseAddrPort("[fd00::100]:80")
	for _, c := range []struct {
		client string
		guest  netip.AddrPort
		want   string
	}{
		{"203.0.113.10:4000", v4, "203.0.113.10:4000"},
		{"[::ffff:203.0.113.10]:4000", v4, "203.0.113.10:4000"},
		{"127.0.0.1:4000", v4, "10.0.2.2:4000"},
		{"10.0.2.7:4000", v4, "10.0.2.2:4000"},
		{"[2001:db8:1::10]:4000", v4, "10.0.2.2:4000"},
		{"[2001:db8:1::10]:4000", v6, "[2001:db8:1::10]:4000"},
		{"[::1]:4000", v6, "[fd00::2]:4000"},
		{"[fe80::1]:4000", v6, "[fd00::2]:4000"},
		{"[fd00::7]:4000", v6, "[fd00::2]:4000"},
		{"203.0.113.10:4000", v6, "[fd00::2]:4000"},
		{"[::ffff:203.0.113.10]:4000", v6, "[fd00::2]:4000"},
	} {
		if got := s.ClientSource(netip.MustParseAddrPort(c.client), c.guest); got.String() != c.want {
			t.Errorf("client %s to %s: source %s, want %s", c.client, c.guest, got, c.want)
		}
	}
}

// TestGuestTargetFamily: an IPv6 guest address needs IPv6 in the stack;
// IPv4-mapped addresses count as IPv4.
func TestGuestTargetFamily(t *testing.T) {
	s := &Stack{cfg: DefaultConfig()}
	if _, err := s.guestTarget(netip.MustParseAddrPort("[fd00::100]:80")); err == nil {
		t.Error("IPv6 guest on an IPv4-only stack accepted")
	}
	if g, err := s.guestTarget(netip.MustParseAddrPort("[::ffff:10.0.2.100]:80")); err != nil || g != netip.MustParseAddrPort("10.0.2.100:80") {
		t.Errorf("IPv4-mapped guest: %v, %v", g, err)
	}
}
