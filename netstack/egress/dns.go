package egress

import (
	"net/netip"
	"strconv"
	"time"

	"github.com/miekg/dns"
)

// The policy's side of the DNS forwarder: names become addresses only
// here. A query for a name the rules do not allow is answered NXDOMAIN at
// once and never leaves the helper (so nothing leaks through query names);
// under an allow list only A, AAAA and CNAME queries are forwarded, HTTPS
// and SVCB get an empty answer (clients fall back to A/AAAA, and no ECH
// config hides the server name), anything else is REFUSED. Answers lose
// addresses that point back inside (rebinding), and the rest are pinned to
// the name asked before the guest sees them.

// Query rules on a guest's DNS query. If forward is false, reply (nil:
// none, the query is dropped) is the answer to send; else the query goes
// upstream, and its answer through filter (nil: as it is).
func (p *Policy) Query(msg []byte) (reply []byte, forward bool, filter func([]byte) []byte) {
	m := p.m.Load()
	if !m.active {
		return nil, true, nil
	}
	var q dns.Msg
	if err := q.Unpack(msg); err != nil || q.Response || len(q.Question) != 1 {
		// Under a policy nothing unparsed is forwarded: the query
		// itself could carry the data.
		return nil, false, nil
	}
	question := q.Question[0]
	name := normalName(question.Name)
	qtype := dns.TypeToString[question.Qtype]
	if qtype == "" {
		qtype = "TYPE" + strconv.Itoa(int(question.Qtype))
	}
	rec := record{Proto: "dns", Name: name, QType: qtype, Verdict: verdictAllow}
	allow, deny := m.queryRules(name)
	switch {
	case deny != nil:
		rec.Rule = deny.rule.String()
	case allow != nil:
		rec.Rule = allow.rule.String()
	}
	rcode := -1 // forward
	switch {
	case q.Opcode != dns.OpcodeQuery || question.Qclass != dns.ClassINET:
		rcode, rec.Reason = dns.RcodeRefused, "only standard queries of class IN are answered"
	case deny != nil || allow == nil && m.defaultDeny:
		rcode = dns.RcodeNameError
	case !m.defaultDeny:
		// Only deny rules: every type of the other names is forwarded.
	case question.Qtype == dns.TypeA, question.Qtype == dns.TypeAAAA, question.Qtype == dns.TypeCNAME:
	case question.Qtype == dns.TypeHTTPS, question.Qtype == dns.TypeSVCB:
		rcode, rec.Reason = dns.RcodeSuccess, "HTTPS and SVCB records are answered empty"
	default:
		rcode, rec.Reason = dns.RcodeRefused, "only A, AAAA and CNAME queries are forwarded under an allow list"
	}
	suggest := ""
	switch {
	case rcode == dns.RcodeNameError && deny == nil:
		suggest = name
		rec.Verdict = verdictDeny
		p.counters.dnsDenied.Add(1)
	case rcode == dns.RcodeNameError || rcode == dns.RcodeRefused:
		rec.Verdict = verdictDeny
		if rcode == dns.RcodeNameError {
			p.counters.dnsDenied.Add(1)
		} else {
			p.counters.dnsRefused.Add(1)
		}
	case rcode == dns.RcodeSuccess:
		p.counters.dnsNone.Add(1)
	default:
		p.counters.dnsAllowed.Add(1)
	}
	if rec.Verdict == verdictDeny && p.audit {
		rec.Verdict, rcode = verdictAudit, -1
	}
	p.rep.report(rec, p.now(), false, suggest)
	if rcode >= 0 {
		return localAnswer(&q, rcode), false, nil
	}
	return nil, true, p.answerFilter(name, &q, m.defaultDeny)
}

// localAnswer is the helper's own answer to q: rcode and no records.
func localAnswer(q *dns.Msg, rcode int) []byte {
	r := new(dns.Msg)
	r.SetRcode(q, rcode)
	r.RecursionAvailable = true
	b, err := r.Pack()
	if err != nil {
		return nil
	}
	return b
}

// answerFilter returns the filter for the answer to q, a query for name.
// strict (an allow list): only the answer's CNAME chain from name, with
// its addresses, is kept.
func (p *Policy) answerFilter(name string, q *dns.Msg, strict bool) func([]byte) []byte {
	return func(b []byte) []byte {
		var r dns.Msg
		if err := r.Unpack(b); err != nil {
			// Whatever the guest's parser would make of it, it did
			// not pass the filter.
			return localAnswer(q, dns.RcodeServerFailure)
		}
		if target := deniedInChain(p.m.Load(), &r, name); target != "" {
			// A denied name stays unknown also behind an alias: its
			// addresses would be pinned to the alias, which no
			// rule denies.
			rec := record{Proto: "dns", Name: name, QType: dns.TypeToString[q.Question[0].Qtype], Verdict: verdictDeny,
				Reason: "its CNAME chain reaches " + target + ", which is denied"}
			if p.audit {
				rec.Verdict = verdictAudit
			}
			p.rep.report(rec, p.now(), false, "")
			if !p.audit {
				p.counters.dnsDenied.Add(1)
				return localAnswer(q, dns.RcodeNameError)
			}
		}
		p.filterAnswer(&r, name, strict)
		out, err := r.Pack()
		if err != nil {
			return localAnswer(q, dns.RcodeServerFailure)
		}
		return out
	}
}

// filterAnswer drops what r must not carry to the guest and pins the
// addresses of name.
func (p *Policy) filterAnswer(r *dns.Msg, name string, strict bool) {
	m := p.m.Load()
	now := p.now()
	chain := map[string]bool{name: true}
	kept := r.Answer[:0]
	for _, rr := range r.Answer {
		owner := normalName(rr.Header().Name)
		var addr netip.Addr
		switch v := rr.(type) {
		case *dns.CNAME:
			if chain[owner] {
				chain[normalName(v.Target)] = true
			} else if strict {
				continue
			}
			kept = append(kept, rr)
			continue
		case *dns.A:
			addr, _ = netip.AddrFromSlice(v.A)
		case *dns.AAAA:
			addr, _ = netip.AddrFromSlice(v.AAAA)
		default:
			if !strict {
				kept = append(kept, rr)
			}
			continue
		}
		addr = addr.Unmap()
		if !addr.IsValid() || strict && !chain[owner] {
			continue
		}
		if p.rebinding(m, addr) {
			p.counters.answersDropped.Add(1)
			rec := record{Proto: "dns", Addr: addr.String(), Name: name, QType: dns.TypeToString[rr.Header().Rrtype],
				Verdict: verdictDeny, Reason: "it points inside (loopback, link-local or the guest's network), dropped"}
			if p.audit {
				rec.Verdict = verdictAudit
			}
			p.rep.report(rec, now, false, "")
			if !p.audit {
				continue
			}
		}
		ttl := max(time.Duration(rr.Header().Ttl)*time.Second, minPinTTL)
		if chain[owner] {
			p.pins.pin(addr, name, now.Add(ttl), now)
		}
		kept = append(kept, rr)
	}
	r.Answer = kept
	if strict {
		r.Ns = keepTypes(r.Ns, dns.TypeSOA)
		r.Extra = keepTypes(r.Extra, dns.TypeOPT)
	}
	r.Compress = true
}

// deniedInChain follows r's CNAME chain from name and returns the first
// name on it that a deny rule covers entirely ("" if none).
func deniedInChain(m *matcher, r *dns.Msg, name string) string {
	for range r.Answer {
		next := ""
		for _, rr := range r.Answer {
			if c, ok := rr.(*dns.CNAME); ok && normalName(c.Hdr.Name) == name {
				next = normalName(c.Target)
				break
			}
		}
		if next == "" {
			return ""
		}
		if _, deny := m.queryRules(next); deny != nil {
			return next
		}
		name = next
	}
	return ""
}

// keepTypes keeps the records of type t.
func keepTypes(rrs []dns.RR, t uint16) []dns.RR {
	kept := rrs[:0]
	for _, rr := range rrs {
		if rr.Header().Rrtype == t {
			kept = append(kept, rr)
		}
	}
	return kept
}

// rebinding reports whether an answer's address points back at the
// guest's side (loopback, link-local, unspecified, multicast, the guest's
// network) where no address rule allows it.
func (p *Policy) rebinding(m *matcher, a netip.Addr) bool {
	inside := a.IsLoopback() || isLinkLocal(a) || a.IsUnspecified() || a.IsMulticast()
	for _, n := range p.internal {
		inside = inside || n.Contains(a)
	}
	return inside && !m.addrAllowedAnyhow(a)
}
