// Package egress is the guest's egress policy: allow and deny rules by
// name, wildcard, address range, port and protocol; the names a guest
// resolved through the DNS forwarder, pinned to the addresses in the
// answers; and the decisions, logged and counted.
//
// The stack asks it about each new flow (Decide), each DNS query (Query)
// and, for TCP flows allowed only through a pinned name, the flow's first
// bytes (Inspect). Rules are matched through maps (exact names, wildcard
// suffixes, one table per prefix length), so their number does not show in
// the cost of a decision.
package egress

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"strconv"
	"strings"
)

// Verdict is what a rule says about what it matches.
type Verdict uint8

const (
	Allow Verdict = iota + 1
	Deny
)

func (v Verdict) String() string {
	switch v {
	case Allow:
		return "allow"
	case Deny:
		return "deny"
	}
	return "?"
}

// ParseVerdict reads "allow" or "deny".
func ParseVerdict(s string) (Verdict, error) {
	switch s {
	case "allow":
		return Allow, nil
	case "deny":
		return Deny, nil
	}
	return 0, fmt.Errorf("verdict %q: want allow or deny", s)
}

// Proto is a set of transport protocols.
type Proto uint8

const (
	TCP Proto = 1 << iota
	UDP
	ICMP

	anyProto = TCP | UDP | ICMP
)

func (p Proto) String() string {
	switch p {
	case TCP:
		return "tcp"
	case UDP:
		return "udp"
	case ICMP:
		return "icmp"
	}
	return "any"
}

// hostKind is what a rule's HOST part names.
type hostKind uint8

const (
	hostName    hostKind = iota // example.com
	hostBelow                   // *.example.com: names below it, not itself
	hostSubtree                 // **.example.com: the name and names below it
	hostPrefix                  // an address or CIDR
)

// portRange is an inclusive range of ports.
type portRange struct{ first, last uint16 }

// Rule is one allow or deny rule: HOST[:PORTS][/tcp|/udp|/icmp].
type Rule struct {
	Verdict Verdict
	kind    hostKind
	name    string // lower case, no trailing dot, no wildcard
	prefix  netip.Prefix
	ports   []portRange // nil: every port
	protos  Proto
}

// maxRuleLen bounds a rule's text: a name is at most 253 bytes, and port
// lists longer than a few hundred bytes are a mistake.
const maxRuleLen = 1024

// ParseRule parses RULE for verdict v. Errors show the rule and what is
// wrong with it.
func ParseRule(v Verdict, s string) (Rule, error) {
	r, err := parseRule(s)
	if err != nil {
		return Rule{}, fmt.Errorf("rule %q: %w", s, err)
	}
	if v != Allow && v != Deny {
		return Rule{}, fmt.Errorf("rule %q: no verdict", s)
	}
	r.Verdict = v
	return r, nil
}

func parseRule(s string) (Rule, error) {
	var r Rule
	if s == "" {
		return r, errors.New("empty")
	}
	if len(s) > maxRuleLen {
		return r, fmt.Errorf("longer than %d bytes", maxRuleLen)
	}
	rest := s
	r.protos = anyProto
	for _, p := range []Proto{TCP, UDP, ICMP} {
		if suffix := "/" + p.String(); len(rest) >= len(suffix) && strings.EqualFold(rest[len(rest)-len(suffix):], suffix) {
			r.protos, rest = p, rest[:len(rest)-len(suffix)]
			break
		}
	}
	host, ports, err := splitHostPorts(rest)
	if err != nil {
		return r, err
	}
	if ports != "" {
		if r.protos == ICMP {
			return r, errors.New("ICMP has no ports: drop the ports or the /icmp")
		}
		if r.ports, err = parsePorts(ports); err != nil {
			return r, err
		}
	}
	if err := r.parseHost(host); err != nil {
		return r, err
	}
	return r, nil
}

// splitHostPorts cuts HOST[:PORTS], where an IPv6 HOST is in brackets.
func splitHostPorts(s string) (host, ports string, err error) {
	if strings.HasPrefix(s, "[") {
		end := strings.IndexByte(s, ']')
		if end < 0 {
			return "", "", errors.New("missing ] after the IPv6 address")
		}
		host, rest := s[1:end], s[end+1:]
		if host == "" {
			return "", "", errors.New("empty address in brackets")
		}
		if rest == "" {
			return host, "", nil
		}
		if rest[0] != ':' || len(rest) == 1 {
			return "", "", fmt.Errorf("unexpected %q after the address: want :PORTS or /tcp, /udp, /icmp", rest)
		}
		return host, rest[1:], nil
	}
	switch strings.Count(s, ":") {
	case 0:
		return s, "", nil
	case 1:
		host, ports, _ := strings.Cut(s, ":")
		if ports == "" {
			return "", "", errors.New("empty port list after ':'")
		}
		return host, ports, nil
	}
	return "", "", errors.New("an IPv6 address goes in brackets: [2001:db8::1]:443, [2001:db8::/32]")
}

// parsePorts reads 443, 80,443 or 8000-8099 (and lists of them).
func parsePorts(s string) ([]portRange, error) {
	var out []portRange
	for _, part := range strings.Split(s, ",") {
		lo, hi, isRange := strings.Cut(part, "-")
		first, err := parsePort(lo)
		if err != nil {
			return nil, err
		}
		last := first
		if isRange {
			if last, err = parsePort(hi); err != nil {
				return nil, err
			}
			if last < first {
				return nil, fmt.Errorf("port range %s: the first port is above the last", part)
			}
		}
		out = append(out, portRange{first, last})
	}
	return out, nil
}

func parsePort(s string) (uint16, error) {
	if s == "" {
		return 0, errors.New("empty port")
	}
	n, err := strconv.ParseUint(s, 10, 32)
	if err != nil || s[0] == '+' {
		return 0, fmt.Errorf("port %q: not a number", s)
	}
	if n < 1 || n > 65535 {
		return 0, fmt.Errorf("port %s out of range 1-65535", s)
	}
	return uint16(n), nil
}

// parseHost reads an address, a CIDR or a (wildcard) name.
func (r *Rule) parseHost(h string) error {
	if h == "" {
		return errors.New("no host")
	}
	if strings.ContainsAny(h, "/") || strings.Contains(h, ":") || isAddressLike(h) {
		return r.parseAddress(h)
	}
	name := strings.ToLower(h)
	switch {
	case strings.HasPrefix(name, "**."):
		r.kind, name = hostSubtree, name[3:]
	case strings.HasPrefix(name, "*."):
		r.kind, name = hostBelow, name[2:]
	default:
		r.kind = hostName
	}
	name = strings.TrimSuffix(name, ".")
	if err := checkName(name); err != nil {
		return err
	}
	r.name = name
	return nil
}

// isAddressLike reports whether h looks like an IPv4 address (only digits
// and dots): such a host is parsed as one, so that "10.0.2" or
// "2130706433" is an error rather than a name.
func isAddressLike(h string) bool {
	return strings.Trim(h, "0123456789.") == ""
}

func (r *Rule) parseAddress(h string) error {
	r.kind = hostPrefix
	if strings.Contains(h, "%") {
		return errors.New("zoned addresses are not supported")
	}
	if strings.Contains(h, "/") {
		p, err := netip.ParsePrefix(h)
		if err != nil {
			return fmt.Errorf("%q is not an address range (want 192.0.2.0/24 or [2001:db8::/32])", h)
		}
		if p.Masked() != p {
			return fmt.Errorf("%s has host bits set: the range is %s", h, p.Masked())
		}
		r.prefix = unmapPrefix(p)
		return nil
	}
	a, err := netip.ParseAddr(h)
	if err != nil {
		return fmt.Errorf("%q is neither an address nor a name", h)
	}
	a = a.Unmap()
	r.prefix = netip.PrefixFrom(a, a.BitLen())
	return nil
}

// unmapPrefix turns ::ffff:192.0.2.0/120 into 192.0.2.0/24: guest flows
// to IPv4-mapped addresses are matched as IPv4.
func unmapPrefix(p netip.Prefix) netip.Prefix {
	if a := p.Addr(); a.Is4In6() && p.Bits() >= 96 {
		return netip.PrefixFrom(a.Unmap(), p.Bits()-96)
	}
	return p
}

// checkName accepts host names: labels of letters, digits, '-' and '_',
// 1 to 63 bytes each, 253 in all, not all digits at the end.
func checkName(name string) error {
	if name == "" {
		return errors.New("no name after the wildcard")
	}
	if len(name) > 253 {
		return errors.New("name longer than 253 bytes")
	}
	labels := strings.Split(name, ".")
	for _, l := range labels {
		if l == "" {
			return fmt.Errorf("name %q has an empty label", name)
		}
		if len(l) > 63 {
			return fmt.Errorf("label %q is longer than 63 bytes", l)
		}
		for i := 0; i < len(l); i++ {
			c := l[i]
			if !(c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '-' || c == '_') {
				if c == '*' {
					return errors.New("a wildcard may only start the name: *.example.com (names below it) or **.example.com (it and names below it)")
				}
				return fmt.Errorf("name %q: character %q is not allowed in host names", name, rune(c))
			}
		}
	}
	if isAddressLike(labels[len(labels)-1]) {
		return fmt.Errorf("name %q ends in a number: not a host name", name)
	}
	return nil
}

// Spec is the rule without its verdict, in canonical form.
func (r Rule) Spec() string {
	var b strings.Builder
	switch r.kind {
	case hostBelow:
		b.WriteString("*." + r.name)
	case hostSubtree:
		b.WriteString("**." + r.name)
	case hostName:
		b.WriteString(r.name)
	case hostPrefix:
		s := r.prefix.String()
		if r.prefix.IsSingleIP() {
			s = r.prefix.Addr().String()
		}
		if r.prefix.Addr().Is6() {
			s = "[" + s + "]"
		}
		b.WriteString(s)
	}
	for i, p := range r.ports {
		if i == 0 {
			b.WriteByte(':')
		} else {
			b.WriteByte(',')
		}
		b.WriteString(strconv.Itoa(int(p.first)))
		if p.last != p.first {
			b.WriteString("-" + strconv.Itoa(int(p.last)))
		}
	}
	if r.protos != anyProto {
		b.WriteString("/" + r.protos.String())
	}
	return b.String()
}

// String is the rule as a policy file line: "allow github.com:443".
func (r Rule) String() string { return r.Verdict.String() + " " + r.Spec() }

// MarshalText implements encoding.TextMarshaler (the engine gets its rules
// as JSON).
func (r Rule) MarshalText() ([]byte, error) { return []byte(r.String()), nil }

// UnmarshalText implements encoding.TextUnmarshaler.
func (r *Rule) UnmarshalText(b []byte) error {
	v, spec, ok := strings.Cut(string(b), " ")
	if !ok {
		return fmt.Errorf("rule %q: want \"allow RULE\" or \"deny RULE\"", b)
	}
	verdict, err := ParseVerdict(v)
	if err != nil {
		return err
	}
	*r, err = ParseRule(verdict, spec)
	return err
}

// covers reports whether the rule matches port (0: ICMP, which only
// rules without ports match) for protocol p.
func (r *Rule) covers(p Proto, port uint16) bool {
	if r.protos&p == 0 {
		return false
	}
	if r.ports == nil {
		return true
	}
	if p == ICMP {
		return false
	}
	for _, pr := range r.ports {
		if port >= pr.first && port <= pr.last {
			return true
		}
	}
	return false
}

// everything reports whether the rule covers every port and protocol.
func (r *Rule) everything() bool { return r.ports == nil && r.protos == anyProto }

// ParsePolicy reads a policy file: one "allow RULE" or "deny RULE" per
// line; blank lines and '#' comments are skipped. name is for messages.
func ParsePolicy(rd io.Reader, name string) ([]Rule, error) {
	var rules []Rule
	sc := bufio.NewScanner(rd)
	for n := 1; sc.Scan(); n++ {
		line := sc.Text()
		if i := strings.IndexByte(line, '#'); i >= 0 {
			line = line[:i]
		}
		f := strings.Fields(line)
		if len(f) == 0 {
			continue
		}
		if len(f) != 2 {
			return nil, fmt.Errorf("%s:%d: want \"allow RULE\" or \"deny RULE\", got %q", name, n, strings.TrimSpace(line))
		}
		v, err := ParseVerdict(f[0])
		if err != nil {
			return nil, fmt.Errorf("%s:%d: %w", name, n, err)
		}
		r, err := ParseRule(v, f[1])
		if err != nil {
			return nil, fmt.Errorf("%s:%d: %w", name, n, err)
		}
		rules = append(rules, r)
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("%s: %w", name, err)
	}
	return rules, nil
}
