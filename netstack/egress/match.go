package egress

import (
	"net/netip"
	"slices"
	"strings"
)

// entry is a rule in force and the ID the API names it by.
type entry struct {
	id   int
	rule Rule
}

// matcher is an immutable, compiled set of rules: lookups cost a few map
// probes whatever the number of rules. Edits build a new one.
type matcher struct {
	entries []*entry
	// active: any rule, or audit mode; without either the policy is off.
	active bool
	// defaultDeny: what no rule allows is denied (any allow rule; or
	// audit mode without rules, which reports everything).
	defaultDeny bool
	// exact, below and subtree hold name rules by the name after their
	// wildcard: example.com, *.example.com, **.example.com.
	exact, below, subtree map[string][]*entry
	cidr4, cidr6          cidrTable
}

// cidrTable finds the rules whose range holds an address: one map per
// prefix length in use, probed from the longest length down (a handful of
// lengths in practice, at most 33 or 129).
type cidrTable struct {
	bits     []int
	byPrefix map[netip.Prefix][]*entry
}

func compile(entries []*entry, audit bool) *matcher {
	m := &matcher{entries: entries, active: len(entries) > 0 || audit,
		exact: map[string][]*entry{}, below: map[string][]*entry{}, subtree: map[string][]*entry{}}
	for _, e := range entries {
		r := &e.rule
		if r.Verdict == Allow {
			m.defaultDeny = true
		}
		switch r.kind {
		case hostName:
			m.exact[r.name] = append(m.exact[r.name], e)
		case hostBelow:
			m.below[r.name] = append(m.below[r.name], e)
		case hostSubtree:
			m.subtree[r.name] = append(m.subtree[r.name], e)
		case hostPrefix:
			if r.prefix.Addr().Is4() {
				m.cidr4.add(r.prefix, e)
			} else {
				m.cidr6.add(r.prefix, e)
			}
		}
	}
	if audit && len(entries) == 0 {
		m.defaultDeny = true
	}
	return m
}

func (t *cidrTable) add(p netip.Prefix, e *entry) {
	if t.byPrefix == nil {
		t.byPrefix = map[netip.Prefix][]*entry{}
	}
	if !slices.Contains(t.bits, p.Bits()) {
		t.bits = append(t.bits, p.Bits())
		slices.SortFunc(t.bits, func(a, b int) int { return b - a })
	}
	t.byPrefix[p] = append(t.byPrefix[p], e)
}

// visit calls fn with every rule whose range holds a until fn returns false.
func (t *cidrTable) visit(a netip.Addr, fn func(*entry) bool) {
	for _, b := range t.bits {
		p, err := a.Prefix(b)
		if err != nil {
			continue
		}
		for _, e := range t.byPrefix[p] {
			if !fn(e) {
				return
			}
		}
	}
}

func (m *matcher) table(a netip.Addr) *cidrTable {
	if a.Is4() {
		return &m.cidr4
	}
	return &m.cidr6
}

// addrRules returns an allow and a deny rule matching a for protocol p and
// port, if there are any.
func (m *matcher) addrRules(a netip.Addr, p Proto, port uint16) (allow, deny *entry) {
	v := verdicts{proto: p, port: port}
	m.table(a).visit(a, v.see)
	return v.allow, v.deny
}

// verdicts collects, from the rules it sees, the first allow and the first
// deny rule covering a protocol and port.
type verdicts struct {
	proto       Proto
	port        uint16
	allow, deny *entry
}

// see takes one rule; false once a deny rule was seen (it wins).
func (v *verdicts) see(e *entry) bool {
	if !e.rule.covers(v.proto, v.port) {
		return true
	}
	if e.rule.Verdict == Deny {
		v.deny = e
		return false
	}
	if v.allow == nil {
		v.allow = e
	}
	return true
}

// addrAllowedAnyhow reports whether an allow rule's range holds a, for
// any port or protocol (answers pointing there are not rebinding).
func (m *matcher) addrAllowedAnyhow(a netip.Addr) bool {
	found := false
	m.table(a).visit(a, func(e *entry) bool {
		found = e.rule.Verdict == Allow
		return !found
	})
	return found
}

// visitName calls fn with every name rule matching name (lower case, no
// trailing dot) until fn returns false.
func (m *matcher) visitName(name string, fn func(*entry) bool) {
	for _, e := range m.exact[name] {
		if !fn(e) {
			return
		}
	}
	for _, e := range m.subtree[name] {
		if !fn(e) {
			return
		}
	}
	for rest := name; ; {
		i := strings.IndexByte(rest, '.')
		if i < 0 {
			return
		}
		rest = rest[i+1:]
		for _, e := range m.below[rest] {
			if !fn(e) {
				return
			}
		}
		for _, e := range m.subtree[rest] {
			if !fn(e) {
				return
			}
		}
	}
}

// nameRules returns an allow and a deny rule matching name for protocol p
// and port, if there are any.
func (m *matcher) nameRules(name string, p Proto, port uint16) (allow, deny *entry) {
	v := verdicts{proto: p, port: port}
	m.visitName(name, v.see)
	return v.allow, v.deny
}

// queryRules decides whether name may be looked up: it returns an allow
// rule naming it for some port or protocol, and a deny rule that covers
// it entirely (a deny rule for some ports leaves the others usable).
func (m *matcher) queryRules(name string) (allow, deny *entry) {
	m.visitName(name, func(e *entry) bool {
		switch {
		case e.rule.Verdict == Deny && e.rule.everything():
			deny = e
			return false
		case e.rule.Verdict == Allow && allow == nil:
			allow = e
		}
		return true
	})
	return allow, deny
}
