package portfwd

import (
	"net/netip"
	"strings"
	"testing"
)

func TestParseSpec(t *testing.T) {
	v4 := netip.MustParseAddr("127.0.0.1")
	v6 := netip.MustParseAddr("::1")
	cases := []struct {
		spec string
		want []Rule
	}{
		{"8080:80", []Rule{{Proto: "tcp", HostPort: 8080, GuestPort: 80}}},
		{"8080:80/udp", []Rule{{Proto: "udp", HostPort: 8080, GuestPort: 80}}},
		{"127.0.0.1:8080:80/tcp", []Rule{{Proto: "tcp", HostAddr: v4, HostPort: 8080, GuestPort: 80}}},
		{"[::1]:8080:80", []Rule{{Proto: "tcp", HostAddr: v6, HostPort: 8080, GuestPort: 80}}},
		{"8000-8002:9000-9002/udp", []Rule{
			{Proto: "udp", HostPort: 8000, GuestPort: 9000},
			{Proto: "udp", HostPort: 8001, GuestPort: 9001},
			{Proto: "udp", HostPort: 8002, GuestPort: 9002}}},
	}
	for _, c := range cases {
		got, err := ParseSpec(c.spec)
		if err != nil {
			t.Errorf("%s: %v", c.spec, err)
			continue
		}
		if len(got) != len(c.want) {
			t.Errorf("%s: got %v", c.spec, got)
			continue
		}
		for i := range got {
			if got[i] != c.want[i] {
				t.Errorf("%s: rule %d = %+v, want %+v", c.spec, i, got[i], c.want[i])
			}
		}
	}
	for _, spec := range []string{"", "80", "a:80", "0:80", "80:70000", "1.2.3.4.5:80:80", "::1:80:80",
		"[::1:80:80", "[1.2.3.4]:80:80", "8000-8010:80", "9-1:9-1", "80:80/sctp", "1-2000:1-2000", "[fe80::1%eth0]:80:80"} {
		if _, err := ParseSpec(spec); err == nil || !strings.Contains(err.Error(), "publish") {
			t.Errorf("ParseSpec(%q) = %v, want an error naming the spec", spec, err)
		}
	}
}

func FuzzParseSpec(f *testing.F) {
	for _, s := range []string{"8080:80", "127.0.0.1:8080:80/udp", "[::1]:1-3:4-6/tcp", "::", "[]:1:1", "1-:2", "/tcp"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, spec string) {
		rules, err := ParseSpec(spec)
		if err != nil {
			return
		}
		if len(rules) == 0 || len(rules) > maxRangeSize {
			t.Fatalf("%q: %d rules", spec, len(rules))
		}
		for _, r := range rules {
			if r.HostPort == 0 || r.GuestPort == 0 || (r.Proto != "tcp" && r.Proto != "udp") {
				t.Fatalf("%q: bad rule %+v", spec, r)
			}
		}
	})
}
