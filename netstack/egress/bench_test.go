package egress

import (
	"fmt"
	"net/netip"
	"testing"

	"github.com/miekg/dns"
)

// manyRules is a policy of n rules: names, wildcards, address ranges of
// several lengths (both families), ports and protocols.
func manyRules(tb testing.TB, n int) []Rule {
	var specs []string
	for i := 0; len(specs) < n; i++ {
		switch i % 5 {
		case 0:
			specs = append(specs, fmt.Sprintf("allow host%d.example.com:443", i))
		case 1:
			specs = append(specs, fmt.Sprintf("allow *.svc%d.example.net", i))
		case 2:
			specs = append(specs, fmt.Sprintf("allow 10.%d.%d.0/24:8000-8099/tcp", i>>8&255, i&255))
		case 3:
			specs = append(specs, fmt.Sprintf("deny 172.%d.%d.%d", 16+i>>16&15, i>>8&255, i&255))
		case 4:
			specs = append(specs, fmt.Sprintf("allow [2001:db8:%x::/48]:53/udp", i))
		}
	}
	return rules(tb, specs...)
}

func benchDecide(b *testing.B, n int) {
	p := New(Config{Rules: append(manyRules(b, n), rules(b, "allow 127.0.0.1", "allow pinned.example:443")...)})
	resolveTTL(b, p, "pinned.example", dns.TypeA, 3600, "A 198.51.100.7")
	for _, c := range []struct {
		name string
		dst  netip.AddrPort
	}{
		{"cidr", netip.MustParseAddrPort("127.0.0.1:16301")},
		{"pin", netip.MustParseAddrPort("198.51.100.7:443")},
		{"denied", netip.MustParseAddrPort("198.51.100.8:443")},
	} {
		b.Run(c.name, func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				p.Decide(TCP, c.dst, c.dst, false)
			}
		})
	}
}

// BenchmarkDecide is the cost of a flow's decision without a policy and
// with 10,000 rules.
func BenchmarkDecide(b *testing.B) {
	b.Run("off", func(b *testing.B) {
		p := New(Config{})
		dst := netip.MustParseAddrPort("127.0.0.1:16301")
		for b.Loop() {
			p.Decide(TCP, dst, dst, false)
		}
	})
	b.Run("rules=10000", func(b *testing.B) { benchDecide(b, 10000) })
}

// BenchmarkQuery is the cost of deciding a DNS query with 10,000 rules.
func BenchmarkQuery(b *testing.B) {
	p := New(Config{Rules: manyRules(b, 10000)})
	q := new(dns.Msg)
	q.SetQuestion("www.api.svc11.example.net.", dns.TypeA)
	qb, _ := q.Pack()
	b.ReportAllocs()
	for b.Loop() {
		p.Query(qb)
	}
}

func TestManyRulesMatch(t *testing.T) {
	p := New(Config{Rules: manyRules(t, 10000)})
	for dst, want := range map[string]bool{
		"10.0.2.7:8050":         true,
		"10.0.2.7:9000":         false,
		"172.16.0.3:8050":       false,
		"[2001:db8:4::1]:53":    false, // TCP: the rule is /udp
		"[2001:db8:4::1]:5353":  false,
		"198.51.100.1:443":      false,
		"[2001:db8:9::abcd]:53": false,
	} {
		if got := p.Decide(TCP, netip.MustParseAddrPort(dst), netip.MustParseAddrPort(dst), false).Allowed; got != want {
			t.Errorf("%s: %v, want %v", dst, got, want)
		}
	}
	if !p.Decide(UDP, netip.MustParseAddrPort("[2001:db8:4::1]:53"), netip.MustParseAddrPort("[2001:db8:4::1]:53"), false).Allowed {
		t.Error("udp to [2001:db8:4::1]:53 denied")
	}
}
