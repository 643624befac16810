package portfwd

import (
	"net/netip"
	"reflect"
	"testing"
)

func TestPastaSpec(t *testing.T) {
	v4 := netip.MustParseAddr("192.0.2.1")
	v6 := netip.MustParseAddr("::1")
	for _, tc := range []struct {
		values []string
		want   PortSpec
	}{
		{[]string{"none"}, PortSpec{Mode: PortsNone}},
		{[]string{"auto"}, PortSpec{Mode: PortsAuto}},
		{[]string{"none", "none"}, PortSpec{Mode: PortsNone}},
		{[]string{"22"}, PortSpec{Mode: PortsList, Ranges: []PortRange{{First: 22, Last: 22, To: 22}}}},
		{[]string{"22:23"}, PortSpec{Mode: PortsList, Ranges: []PortRange{{First: 22, Last: 22, To: 23}}}},
		{[]string{"22,25"}, PortSpec{Mode: PortsList, Ranges: []PortRange{{First: 22, Last: 22, To: 22}, {First: 25, Last: 25, To: 25}}}},
		{[]string{"22-80:32-90"}, PortSpec{Mode: PortsList, Ranges: []PortRange{{First: 22, Last: 80, To: 32}}}},
		// podman's form, one option per published port
		{[]string{"8080-8080:80-80", "192.0.2.1/5353-5353:53-53"}, PortSpec{Mode: PortsList, Ranges: []PortRange{
			{First: 8080, Last: 8080, To: 80}, {Addr: v4, First: 5353, Last: 5353, To: 53}}}},
		{[]string{"::1/8080"}, PortSpec{Mode: PortsList, Ranges: []PortRange{{Addr: v6, First: 8080, Last: 8080, To: 8080}}}},
		{[]string{"192.0.2.1%eth0/22"}, PortSpec{Mode: PortsList, Ranges: []PortRange{{Addr: v4, Iface: "eth0", First: 22, Last: 22, To: 22}}}},
		{[]string{"%eth0/22"}, PortSpec{Mode: PortsList, Ranges: []PortRange{{Iface: "eth0", First: 22, Last: 22, To: 22}}}},
		{[]string{"2000-2010,~2003-2004"}, PortSpec{Mode: PortsList, Ranges: []PortRange{{First: 2000, Last: 2002, To: 2000}, {First: 2005, Last: 2010, To: 2005}}}},
		{[]string{"192.0.2.1/20-30:120-130,~25"}, PortSpec{Mode: PortsList, Ranges: []PortRange{
			{Addr: v4, First: 20, Last: 24, To: 120}, {Addr: v4, First: 26, Last: 30, To: 126}}}},
		{[]string{"~20,20-21"}, PortSpec{Mode: PortsList, Ranges: []PortRange{{First: 21, Last: 21, To: 21}}}},
		{[]string{"1-65535,~2-65535"}, PortSpec{Mode: PortsList, Ranges: []PortRange{{First: 1, Last: 1, To: 1}}}},
	} {
		var s PortSpec
		for _, v := range tc.values {
			if err := s.Add(v); err != nil {
				t.Fatalf("%q: %v", tc.values, err)
			}
		}
		if !reflect.DeepEqual(s, tc.want) {
			t.Errorf("%q: got %+v, want %+v", tc.values, s, tc.want)
		}
	}
}

func TestPastaSpecRefused(t *testing.T) {
	for _, values := range [][]string{
		{"all"}, {"~20000-20010"}, {"none", "22"}, {"22", "auto"}, {"auto", "none"},
		{"0"}, {"65536"}, {"22-21"}, {"22-30:40-41"}, {"x"}, {""}, {"/22"}, {"1.2.3/22"},
		{"192.0.2.1/"}, {"%/22"}, {"22:"}, {":22"}, {"22,"}, {"-5"},
	} {
		var s PortSpec
		var err error
		for _, v := range values {
			if err = s.Add(v); err != nil {
				break
			}
		}
		if err == nil {
			t.Errorf("%q accepted: %+v", values, s)
		}
	}
}

func TestPastaSpecRules(t *testing.T) {
	var s PortSpec
	if err := s.Add("127.0.0.1/8000-8001:9000-9001"); err != nil {
		t.Fatal(err)
	}
	g := netip.MustParseAddr("10.0.2.100")
	got := s.Rules("udp", g)
	lo := netip.MustParseAddr("127.0.0.1")
	want := []Rule{
		{Proto: "udp", HostAddr: lo, HostPort: 8000, GuestAddr: g, GuestPort: 9000},
		{Proto: "udp", HostAddr: lo, HostPort: 8001, GuestAddr: g, GuestPort: 9001},
	}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("got %+v", got)
	}
}

// FuzzPastaSpec: any value is parsed or refused, never a panic, and what
// is accepted maps every port inside 1-65535.
func FuzzPastaSpec(f *testing.F) {
	for _, s := range []string{"none", "auto", "22", "22-80:32-90", "192.0.2.1%eth0/20-30,~25", "::1/8080-8080:80-80", "~1", "1-65535", "65535:1"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, v string) {
		var s PortSpec
		if err := s.Add(v); err != nil {
			return
		}
		for _, r := range s.Ranges {
			if r.First == 0 || r.Last < r.First || r.To == 0 || int(r.To)+int(r.Last-r.First) > 65535 {
				t.Fatalf("%q: bad range %+v", v, r)
			}
		}
	})
}
