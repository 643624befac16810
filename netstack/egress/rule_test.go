package egress

import (
	"encoding/json"
	"strings"
	"testing"
)

func TestParseRule(t *testing.T) {
	for _, c := range []struct{ in, spec string }{
		{"example.com", "example.com"},
		{"Example.COM.", "example.com"},
		{"*.example.com:443", "*.example.com:443"},
		{"**.pypi.org:443/tcp", "**.pypi.org:443/tcp"},
		{"example.com:80,443", "example.com:80,443"},
		{"example.com:8000-8099/udp", "example.com:8000-8099/udp"},
		{"example.com/ICMP", "example.com/icmp"},
		{"192.0.2.1", "192.0.2.1"},
		{"192.0.2.0/24", "192.0.2.0/24"},
		{"192.0.2.0/24:53/udp", "192.0.2.0/24:53/udp"},
		{"192.0.2.0/24/tcp", "192.0.2.0/24/tcp"},
		{"[2001:db8::1]:443", "[2001:db8::1]:443"},
		{"[2001:db8::/32]", "[2001:db8::/32]"},
		{"[::ffff:192.0.2.0/120]:80", "192.0.2.0/24:80"},
		{"[::ffff:192.0.2.7]", "192.0.2.7"},
		{"127.0.0.1:8080", "127.0.0.1:8080"},
		{"localhost", "localhost"},
		{"_srv.example.com", "_srv.example.com"},
	} {
		r, err := ParseRule(Allow, c.in)
		if err != nil {
			t.Errorf("%q: %v", c.in, err)
			continue
		}
		if r.Spec() != c.spec {
			t.Errorf("%q: spec %q, want %q", c.in, r.Spec(), c.spec)
		}
		// The canonical form parses to itself.
		again, err := ParseRule(Allow, r.Spec())
		if err != nil || again.Spec() != r.Spec() {
			t.Errorf("%q: canonical %q reparses to %q, %v", c.in, r.Spec(), again.Spec(), err)
		}
	}
}

func TestParseRuleErrors(t *testing.T) {
	for _, c := range []struct{ in, want string }{
		{"", "empty"},
		{"example.com:", "empty port list"},
		{"example.com:0", "out of range"},
		{"example.com:65536", "out of range"},
		{"example.com:99-10", "above the last"},
		{"example.com:http", "not a number"},
		{"example.com:+80", "not a number"},
		{"example.com:80,", "empty port"},
		{"example.com:443/icmp", "ICMP has no ports"},
		{"2001:db8::1", "brackets"},
		{"[2001:db8::1", "missing ]"},
		{"[2001:db8::1]x", "unexpected"},
		{"[]", "empty address"},
		{"192.0.2.1/24", "host bits set: the range is 192.0.2.0/24"},
		{"192.0.2.0/33", "not an address range"},
		{"10.0.2", "neither an address nor a name"},
		{"2130706433", "neither an address nor a name"},
		{"foo.*.com", "wildcard may only start"},
		{"*", "wildcard may only start"},
		{"*.", "no name after the wildcard"},
		{"**.", "no name after the wildcard"},
		{"exa mple.com", "not allowed in host names"},
		{"example..com", "empty label"},
		{"example.123", "ends in a number"},
		{strings.Repeat("a", 64) + ".com", "longer than 63"},
		{"[fe80::1%eth0]", "zoned"},
		{"/tcp", "no host"},
	} {
		_, err := ParseRule(Allow, c.in)
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%q: error %v, want one containing %q", c.in, err, c.want)
			continue
		}
		if !strings.Contains(err.Error(), "rule ") {
			t.Errorf("%q: error %q does not show the rule", c.in, err)
		}
	}
}

func TestParsePolicy(t *testing.T) {
	in := "# CI policy\nallow github.com:443   # the forge\n\n  deny  bad.example.com\nallow **.pypi.org:443\n"
	rules, err := ParsePolicy(strings.NewReader(in), "ci.policy")
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, r := range rules {
		got = append(got, r.String())
	}
	if want := "allow github.com:443|deny bad.example.com|allow **.pypi.org:443"; strings.Join(got, "|") != want {
		t.Errorf("got %q, want %q", strings.Join(got, "|"), want)
	}
	for _, c := range []struct{ in, want string }{
		{"allow\n", "ci.policy:1: want"},
		{"\npermit x.com\n", `ci.policy:2: verdict "permit"`},
		{"allow x.com:0\n", `ci.policy:1: rule "x.com:0"`},
		{"allow a.com b.com\n", "ci.policy:1: want"},
	} {
		_, err := ParsePolicy(strings.NewReader(c.in), "ci.policy")
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%q: error %v, want %q", c.in, err, c.want)
		}
	}
}

func TestRuleJSON(t *testing.T) {
	r, _ := ParseRule(Deny, "[2001:db8::/32]:53/udp")
	b, err := json.Marshal(Config{Rules: []Rule{r}, Audit: true})
	if err != nil {
		t.Fatal(err)
	}
	var back Config
	if err := json.Unmarshal(b, &back); err != nil {
		t.Fatal(err)
	}
	if len(back.Rules) != 1 || back.Rules[0].String() != r.String() || !back.Audit {
		t.Errorf("round trip: %s -> %+v", b, back)
	}
	if err := json.Unmarshal([]byte(`{"rules":["maybe x.com"]}`), &back); err == nil {
		t.Error("bad verdict accepted")
	}
}

// FuzzParseRule: no input crashes the parser, and every accepted rule has
// a canonical form that parses back to itself.
func FuzzParseRule(f *testing.F) {
	for _, s := range []string{"example.com", "*.example.com:443", "**.pypi.org:443/tcp", "192.0.2.0/24:53,853/udp",
		"[2001:db8::/32]:1-65535", "[::ffff:1.2.3.4]", "x.com/icmp", "a:b:c", "[", "*.*", "1.2.3.4:", "EXAMPLE.com."} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		r, err := ParseRule(Allow, s)
		if err != nil {
			return
		}
		again, err := ParseRule(Allow, r.Spec())
		if err != nil {
			t.Fatalf("%q: canonical %q does not parse: %v", s, r.Spec(), err)
		}
		if again.Spec() != r.Spec() {
			t.Fatalf("%q: canonical %q reparses to %q", s, r.Spec(), again.Spec())
		}
	})
}

func TestRulesFile(t *testing.T) {
	var in []Rule
	for i := 0; i < 10000; i++ {
		in = append(in, rules(t, "allow host"+strings.Repeat("x", i%7)+".example.com:443", "deny [2001:db8::/32]:53/udp")...)
	}
	f, err := RulesFile(in)
	if err != nil {
		t.Fatal(err)
	}
	out, err := ReadRulesFile(f)
	if err != nil || len(out) != len(in) || out[len(out)-1].String() != in[len(in)-1].String() {
		t.Fatalf("round trip of %d rules: %d back, %v", len(in), len(out), err)
	}
}
