package netstack

import (
	"net/netip"
	"testing"

	"gvisor.dev/gvisor/pkg/tcpip/header"
)

// raOptions parses the options of s's router advertisement.
func raOptions(t *testing.T, s *Stack) []header.NDPOption {
	t.Helper()
	icmp := s.routerAdvertisement()[header.EthernetMinimumSize+header.IPv6MinimumSize:]
	it, err := header.NDPOptions(icmp[header.ICMPv6HeaderSize+header.NDPRAMinimumSize:]).Iter(true)
	if err != nil {
		t.Fatal(err)
	}
	var opts []header.NDPOption
	for {
		o, done, err := it.Next()
		if err != nil {
			t.Fatalf("the RA's options do not parse: %v", err)
		}
		if done {
			return opts
		}
		opts = append(opts, o)
	}
}

// The RA names a DNS server only where a forwarder answers.
func TestRAOffersDNSOnlyWhenThere(t *testing.T) {
	for _, c := range []struct {
		name string
		mod  func(*Config)
		want bool
	}{
		{"default", func(*Config) {}, true},
		{"--disable-dns", func(c *Config) { c.DisableDNS = true }, false},
		{"pasta without an IPv6 --dns-forward", func(c *Config) {
			c.DNS6 = netip.Addr{}
			c.Network6 = netip.MustParsePrefix("2001:db8::/64")
		}, false},
	} {
		cfg := DefaultConfig()
		cfg.IPv6 = true
		c.mod(&cfg)
		got := false
		for _, o := range raOptions(t, &Stack{cfg: cfg}) {
			if r, ok := o.(header.NDPRecursiveDNSServer); ok {
				addrs, err := r.Addresses()
				got = err == nil && len(addrs) == 1 && netip.AddrFrom16(addrs[0].As16()) == cfg.DNS6
			}
		}
		if got != c.want {
			t.Errorf("%s: RA names the DNS server %v, want %v", c.name, got, c.want)
		}
	}
}
