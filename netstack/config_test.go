package netstack

import (
	"net/netip"
	"reflect"
	"strings"
	"testing"
)

func TestParseDNSUpstream(t *testing.T) {
	good := map[string]string{
		"203.0.113.10":       "203.0.113.10:53",
		"203.0.113.10:5353":  "203.0.113.10:5353",
		"2001:db8::1":        "[2001:db8::1]:53",
		"[2001:db8::1]":      "[2001:db8::1]:53",
		"[2001:db8::1]:5353": "[2001:db8::1]:5353",
	}
	for in, want := range good {
		got, err := ParseDNSUpstream(in)
		if err != nil || got.String() != want {
			t.Errorf("ParseDNSUpstream(%q) = %v, %v; want %s", in, got, err, want)
		}
	}
	for _, in := range []string{"", "example.com", "1.2.3.4:0", "1.2.3.4:99999", "fe80::1%eth0", "[::1", "1.2.3"} {
		if got, err := ParseDNSUpstream(in); err == nil {
			t.Errorf("ParseDNSUpstream(%q) = %v, want error", in, got)
		}
	}
}

func TestParseResolvConf(t *testing.T) {
	conf := `# comment
search example.test
nameserver 203.0.113.53
nameserver   2001:db8::53
nameserver fe80::1%eth0
nameserver bogus
options ndots:2
nameserver
`
	got, err := parseResolvConf(strings.NewReader(conf))
	if err != nil {
		t.Fatal(err)
	}
	want := []netip.AddrPort{
		netip.MustParseAddrPort("203.0.113.53:53"),
		netip.MustParseAddrPort("[2001:db8::53]:53"),
		netip.MustParseAddrPort("[fe80::1%eth0]:53"),
	}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("got %v, want %v", got, want)
	}
}

func FuzzParseDNSUpstream(f *testing.F) {
	for _, s := range []string{"203.0.113.10", "[2001:db8::1]:53", "1.2.3.4:0", "::", "[]:", "%"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		ap, err := ParseDNSUpstream(s)
		if err == nil && (!ap.IsValid() || ap.Port() == 0) {
			t.Fatalf("accepted %q as invalid %v", s, ap)
		}
	})
}

func TestHostTarget(t *testing.T) {
	cfg := DefaultConfig()
	s := &Stack{cfg: cfg}
	blocked := &Stack{cfg: cfg}
	blocked.cfg.DisableHostLoopback = true
	cases := []struct {
		s       *Stack
		dst     string
		want    string
		refused bool
	}{
		{s, "10.0.2.2:80", "127.0.0.1:80", false},
		{blocked, "10.0.2.2:80", "", true},
		{s, "198.51.100.10:443", "198.51.100.10:443", false},
		{blocked, "127.0.0.1:22", "", true},
		{blocked, "[::ffff:127.0.0.1]:22", "", true},
		{s, "10.0.2.77:80", "", true},
		{s, "255.255.255.255:67", "", true},
		{s, "224.0.0.251:5353", "", true},
		{s, "0.0.0.0:80", "", true},
		{s, "198.51.100.10:0", "", true},
	}
	for _, c := range cases {
		got, err := c.s.hostTarget(netip.MustParseAddrPort(c.dst))
		if c.refused != (err != nil) || (!c.refused && got.String() != c.want) {
			t.Errorf("hostTarget(%s, disable=%v) = %v, %v", c.dst, c.s.cfg.DisableHostLoopback, got, err)
		}
	}
}
