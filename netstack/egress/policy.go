package egress

import (
	"errors"
	"fmt"
	"io"
	"net/netip"
	"strconv"
	"sync"
	"sync/atomic"
	"time"
)

// Config is a policy as given on the command line. Rules and Audit cross
// to a sandboxed engine as JSON; the writers are set where the policy runs.
type Config struct {
	Rules []Rule `json:"rules,omitempty"`
	// Audit decides but blocks nothing: what would have been denied is
	// logged, and Suggested lists what the guest used.
	Audit bool `json:"audit,omitempty"`
	// Log, if set, receives one JSON line per decision.
	Log io.Writer `json:"-"`
	// Notices, if set and Log is not, receives one line per denied
	// destination (rate-limited) naming the rule to add.
	Notices io.Writer `json:"-"`
	// Internal are the guest's own networks: answers pointing there are
	// rebinding attempts, like loopback and link-local ones.
	Internal []netip.Prefix `json:"-"`
	// now replaces the clock (tests).
	now func() time.Time
}

// Policy is a policy in force. Its methods are safe for concurrent use;
// deciding takes no lock but the pin table's read lock.
type Policy struct {
	audit    bool
	internal []netip.Prefix
	now      func() time.Time
	rep      *reporter
	pins     *pinTable

	mu      sync.Mutex // serializes edits of the rules
	entries []*entry
	nextID  int
	m       atomic.Pointer[matcher]

	counters counters
}

type counters struct {
	allowed, denied, audited                   atomic.Uint64
	dnsAllowed, dnsDenied, dnsRefused, dnsNone atomic.Uint64
	answersDropped                             atomic.Uint64
}

// New returns the policy cfg describes. Without rules and audit it is off:
// every decision allows, at the cost of one atomic load.
func New(cfg Config) *Policy {
	p := &Policy{audit: cfg.Audit, internal: cfg.Internal, now: cfg.now, pins: newPinTable(maxPins)}
	if p.now == nil {
		p.now = time.Now
	}
	p.rep = newReporter(cfg.Log, cfg.Notices)
	for _, r := range cfg.Rules {
		p.nextID++
		p.entries = append(p.entries, &entry{id: p.nextID, rule: r})
	}
	p.m.Store(compile(p.entries, p.audit))
	return p
}

// Active reports whether any rule is in force (or audit mode is on).
func (p *Policy) Active() bool { return p.m.Load().active }

// Decision is what Decide said about a new flow.
type Decision struct {
	// Allowed: the flow may proceed (also when audit mode let a denied
	// one through).
	Allowed bool
	// Inspect: a TCP flow allowed only through a pinned name; its first
	// bytes must name an allowed host (see Inspect) before it is dialed.
	Inspect bool

	proto Proto
	// target is where the flow goes on the host (address rules and
	// messages name it), guest the address the guest sent to (names
	// were pinned to it); they differ for the gateway (the host's
	// loopback) and other mapped addresses.
	target netip.AddrPort
	guest  netip.Addr
	name   string // the pinned name the address came from, if any
	rule   *entry
	viaPin bool
	reason string
	// inspected: the first bytes decided (see Inspect).
	inspected bool
}

// Decide rules on a new flow of protocol p that the guest sent to dst and
// that goes to target on the host (127.0.0.1 for the gateway; port 0 for
// ICMP). perPacket says the caller asks per packet (ICMP echoes, datagrams
// of a denied UDP flow), so repeated decisions are logged once in a while.
func (p *Policy) Decide(proto Proto, dst, target netip.AddrPort, perPacket bool) Decision {
	m := p.m.Load()
	if !m.active {
		return Decision{Allowed: true}
	}
	a, port := target.Addr().Unmap(), target.Port()
	if proto == ICMP {
		port = 0
	}
	d := Decision{proto: proto, target: netip.AddrPortFrom(a, port), guest: dst.Addr().Unmap()}
	allow, deny := m.addrRules(a, proto, port)
	switch {
	case deny != nil:
		d.rule = deny
	case allow != nil:
		d.Allowed, d.rule = true, allow
	default:
		p.decideByName(m, &d)
	}
	if !d.Inspect {
		p.settle(&d, "", perPacket)
	}
	return d
}

// decideByName rules on a destination no address rule covers: by the
// names pinned to it.
func (p *Policy) decideByName(m *matcher, d *Decision) {
	a, port := d.target.Addr(), d.target.Port()
	switch {
	case isLinkLocal(a):
		d.reason = "link-local and metadata addresses need an address rule"
	case d.proto != ICMP && (port == 53 || port == 853):
		d.reason = "DNS goes to the built-in resolver only, unless an address rule names this server"
	}
	var denied, neutral string
	var denyRule *entry
	p.pins.each(d.guest, p.now(), func(name string) bool {
		if d.reason != "" {
			d.name = name // for the message only
			return false
		}
		allow, deny := m.nameRules(name, d.proto, port)
		switch {
		case deny != nil:
			if denied == "" {
				denied, denyRule = name, deny
			}
		case allow != nil:
			d.Allowed, d.viaPin, d.name, d.rule = true, true, name, allow
			return false
		default:
			if neutral == "" {
				neutral = name
			}
		}
		return true
	})
	switch {
	case d.reason != "":
		d.Allowed = false
	case d.Allowed:
		d.Inspect = d.proto == TCP && m.defaultDeny
	case m.defaultDeny:
		d.name = firstOf(neutral, denied)
		if neutral == "" && denied != "" {
			d.rule = denyRule
		}
	case denied != "" && neutral == "":
		d.name, d.rule = denied, denyRule
	default:
		// Allowed by default; a TCP flow to an address that a denied
		// name shares with others must show which name it is for.
		d.Allowed, d.viaPin, d.name = true, neutral != "", neutral
		d.Inspect = d.proto == TCP && denied != ""
	}
}

func firstOf(a, b string) string {
	if a != "" {
		return a
	}
	return b
}

// isLinkLocal covers 169.254.0.0/16 (cloud metadata at 169.254.169.254)
// and fe80::/10.
func isLinkLocal(a netip.Addr) bool {
	return a.IsLinkLocalUnicast() || a.IsLinkLocalMulticast()
}

// settle turns a decision into its final verdict (audit mode lets denied
// flows through), counts, logs and, in audit mode, remembers it.
func (p *Policy) settle(d *Decision, sni string, perPacket bool) {
	verdict := verdictAllow
	switch {
	case d.Allowed:
		p.counters.allowed.Add(1)
	case p.audit:
		verdict = verdictAudit
		d.Allowed = true
		p.counters.audited.Add(1)
	default:
		verdict = verdictDeny
		p.counters.denied.Add(1)
	}
	if !p.rep.wants(verdict) && !p.audit {
		return
	}
	rec := record{Proto: d.proto.String(), Addr: d.target.Addr().String(), Port: d.target.Port(), Name: d.name, SNI: sni,
		Verdict: verdict, Reason: d.reason}
	if d.rule != nil {
		rec.Rule = d.rule.rule.String()
	}
	// The host to allow: the name the flow is for, if it is known and
	// a name may open it; else the address.
	host := d.target.Addr().String()
	switch {
	case sni != "" && !isAddress(sni) && checkName(normalName(sni)) == nil:
		// (A server name no rule could hold is no advice to copy.)
		host = normalName(sni)
	case d.name != "" && d.reason == "":
		host = d.name
	}
	suggest := ""
	deniedByRule := d.rule != nil && d.rule.rule.Verdict == Deny
	if verdict != verdictAllow && !deniedByRule && (!d.inspected || host != d.target.Addr().String()) {
		suggest = suggestion(host, d.proto, strconv.Itoa(int(d.target.Port())))
	}
	p.rep.report(rec, p.now(), perPacket, suggest)
	if p.audit {
		p.rep.use(host, d.proto, d.target.Port())
	}
}

// Inspect rules on the first bytes of a flow Decide marked Inspect: a TLS
// ClientHello's server name or an HTTP request's host must be a name the
// rules allow for the flow's port, pinned to its address; a ClientHello
// without a server name is denied; other protocols pass on the pin.
// decided is false while more bytes are needed (final: no more will come,
// the guest closed or time is up).
func (p *Policy) Inspect(d *Decision, b []byte, final bool) (decided bool) {
	f := parseFirstBytes(b)
	if !f.complete && !final && len(b) < MaxFirstBytes {
		return false
	}
	d.Allowed, d.inspected = false, true
	switch {
	case f.kind == firstOther || len(b) == 0:
		// Nothing sent (the server speaks first), or another protocol:
		// the pin alone decides.
		d.Allowed = true
	case !f.complete:
		d.reason = "incomplete " + f.kind.String() + " request"
	case f.bad != "":
		d.reason = f.bad
	case f.name == "" && f.kind == firstTLS:
		d.reason = "TLS without a server name (SNI)"
	case f.name == "":
		d.reason = "HTTP request without a Host"
	default:
		d.Allowed = p.nameFits(d, normalName(f.name))
		if !d.Allowed {
			d.reason = f.kind.String() + " names a host not allowed here"
		}
	}
	p.settle(d, f.name, false)
	return true
}

// nameFits reports whether name may be reached at d's destination: no
// rule denies it there, and (under an allow list) a rule allows it and it
// is pinned to the address.
func (p *Policy) nameFits(d *Decision, name string) bool {
	if isAddress(name) {
		return false
	}
	m := p.m.Load()
	allow, deny := m.nameRules(name, d.proto, d.target.Port())
	if deny != nil {
		d.rule = deny
		return false
	}
	if !m.defaultDeny {
		return true
	}
	if allow == nil || !p.pins.has(d.guest, name, p.now()) {
		return false
	}
	d.rule, d.name = allow, name
	return true
}

// Hold keeps the pins d's flow was allowed through alive until release is
// called (the flow ends); a no-op for other flows.
func (p *Policy) Hold(d Decision) (release func()) {
	if !d.viaPin {
		return func() {}
	}
	return p.pins.hold(d.guest)
}

// Listed is one rule in force, as the API lists it.
type Listed struct {
	ID      int    `json:"id"`
	Verdict string `json:"verdict"`
	Rule    string `json:"rule"`
}

// Listing is the policy in force, for get_egress_policy.
type Listing struct {
	Active      bool     `json:"active"`
	Audit       bool     `json:"audit"`
	DefaultDeny bool     `json:"default_deny"`
	Rules       []Listed `json:"rules"`
	// Suggested is, in audit mode, the allow list of what the guest
	// used so far.
	Suggested []string `json:"suggested,omitempty"`
}

// List returns the rules in force.
func (p *Policy) List() Listing {
	m := p.m.Load()
	l := Listing{Active: m.active, Audit: p.audit, DefaultDeny: m.defaultDeny, Rules: []Listed{}}
	for _, e := range m.entries {
		l.Rules = append(l.Rules, Listed{ID: e.id, Verdict: e.rule.Verdict.String(), Rule: e.rule.Spec()})
	}
	if p.audit {
		l.Suggested = p.rep.suggested()
	}
	return l
}

// Add puts a rule in force for new flows and queries and returns its ID.
func (p *Policy) Add(r Rule) int {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.nextID++
	p.entries = append(p.entries[:len(p.entries):len(p.entries)], &entry{id: p.nextID, rule: r})
	p.m.Store(compile(p.entries, p.audit))
	return p.nextID
}

// errNoRule: Remove was given an ID no rule has.
var errNoRule = errors.New("no rule with that id")

// Remove takes rule id out of force; open flows stay.
func (p *Policy) Remove(id int) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	for i, e := range p.entries {
		if e.id == id {
			entries := append(append([]*entry(nil), p.entries[:i]...), p.entries[i+1:]...)
			p.entries = entries
			p.m.Store(compile(p.entries, p.audit))
			return nil
		}
	}
	return fmt.Errorf("%w: %d", errNoRule, id)
}

// Stats counts the decisions made.
type Stats struct {
	Active bool `json:"active"`
	Audit  bool `json:"audit,omitempty"`
	Rules  int  `json:"rules"`
	// Flows by verdict; Audited were denied and let through (audit mode).
	Allowed uint64 `json:"allowed"`
	Denied  uint64 `json:"denied"`
	Audited uint64 `json:"audited"`
	// DNS queries: forwarded, answered NXDOMAIN (name not allowed),
	// REFUSED (a type other than A, AAAA, CNAME), empty (HTTPS, SVCB).
	DNSForwarded uint64 `json:"dns_forwarded"`
	DNSDenied    uint64 `json:"dns_denied"`
	DNSRefused   uint64 `json:"dns_refused"`
	DNSEmpty     uint64 `json:"dns_empty"`
	// AnswersDropped counts addresses taken out of answers (loopback,
	// link-local, the guest's network: DNS rebinding).
	AnswersDropped uint64 `json:"answers_dropped"`
	Pins           int    `json:"pins"`
	// NoticesSuppressed counts stderr notices the rate limit held back.
	NoticesSuppressed uint64 `json:"notices_suppressed"`
}

// Stats returns the counts so far.
func (p *Policy) Stats() Stats {
	m := p.m.Load()
	c := &p.counters
	return Stats{Active: m.active, Audit: p.audit, Rules: len(m.entries),
		Allowed: c.allowed.Load(), Denied: c.denied.Load(), Audited: c.audited.Load(),
		DNSForwarded: c.dnsAllowed.Load(), DNSDenied: c.dnsDenied.Load(), DNSRefused: c.dnsRefused.Load(), DNSEmpty: c.dnsNone.Load(),
		AnswersDropped: c.answersDropped.Load(), Pins: p.pins.size(), NoticesSuppressed: p.rep.suppressedNotices()}
}
