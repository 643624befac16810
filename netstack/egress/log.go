package egress

import (
	"encoding/json"
	"fmt"
	"io"
	"net/netip"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"
)

// Where decisions are reported: a JSON line each to the decision log, or
// without one, a line on the helper's stderr for each denied destination
// (rate-limited) that names the rule to add. In audit mode the flows are
// also remembered for the suggested allow list.

const (
	// noticeEvery is how often one destination's denial is told again.
	noticeEvery = time.Minute
	// noticeRate and noticeBurst bound the notices of all destinations:
	// a guest spraying addresses must not flood the terminal.
	noticeRate  = 5.0 // per second
	noticeBurst = 20.0
	// repeatWindow collapses decisions made per packet (ICMP echoes,
	// datagrams of a denied UDP flow) about one destination.
	repeatWindow = time.Second
	// maxRemembered bounds each of the tables of recent destinations
	// and of flows seen in audit mode.
	maxRemembered = 4096
)

// record is one line of the decision log.
type record struct {
	Time    string `json:"time"`
	Proto   string `json:"proto"`
	Addr    string `json:"addr,omitempty"`
	Port    uint16 `json:"port,omitempty"`
	Name    string `json:"name,omitempty"`
	QType   string `json:"qtype,omitempty"`
	SNI     string `json:"sni,omitempty"`
	Rule    string `json:"rule,omitempty"`
	Verdict string `json:"verdict"`
	Reason  string `json:"reason,omitempty"`
}

// Verdicts in the log: allow, deny, and audit (would have been denied,
// let through by --egress-audit).
const (
	verdictAllow = "allow"
	verdictDeny  = "deny"
	verdictAudit = "audit"
)

type reporter struct {
	log     io.Writer
	notices io.Writer

	mu         sync.Mutex
	lastNotice map[string]time.Time
	repeats    map[string]time.Time
	tokens     float64
	refilled   time.Time
	suppressed uint64
	used       map[usageKey]struct{}
}

// usageKey is one (host, protocol, port) the guest used, for audit
// mode's suggested allow list.
type usageKey struct {
	host  string
	proto Proto
	port  uint16
}

func newReporter(log, notices io.Writer) *reporter {
	return &reporter{log: log, notices: notices, lastNotice: map[string]time.Time{},
		repeats: map[string]time.Time{}, tokens: noticeBurst, used: map[usageKey]struct{}{}}
}

// report logs one decision; suggest is the allow rule that would have let
// a denied one through ("" if none would). perPacket decisions about a
// destination are collapsed within repeatWindow.
func (r *reporter) report(rec record, now time.Time, perPacket bool, suggest string) {
	if !r.wants(rec.Verdict) {
		return
	}
	key := rec.Proto + " " + rec.Addr + " " + strconv.Itoa(int(rec.Port)) + " " + rec.Name + " " + rec.QType + " " + rec.Verdict
	r.mu.Lock()
	defer r.mu.Unlock()
	if perPacket {
		if last, ok := r.repeats[key]; ok && now.Sub(last) < repeatWindow {
			return
		}
		remember(r.repeats, key, now)
	}
	if r.log != nil {
		rec.Time = now.UTC().Format(time.RFC3339Nano)
		b, err := json.Marshal(rec)
		if err == nil {
			_, _ = r.log.Write(append(b, '\n'))
		}
		return
	}
	if last, ok := r.lastNotice[key]; ok && now.Sub(last) < noticeEvery {
		return
	}
	r.tokens = min(noticeBurst, r.tokens+now.Sub(r.refilled).Seconds()*noticeRate)
	r.refilled = now
	if r.tokens < 1 {
		r.suppressed++
		return
	}
	r.tokens--
	remember(r.lastNotice, key, now)
	_, _ = io.WriteString(r.notices, notice(rec, suggest))
}

// wants reports whether a decision with this verdict is logged at all.
func (r *reporter) wants(verdict string) bool {
	return r.log != nil || verdict != verdictAllow && r.notices != nil
}

// remember sets m[key], starting over when the table is full.
func remember(m map[string]time.Time, key string, now time.Time) {
	if len(m) >= maxRemembered {
		clear(m)
	}
	m[key] = now
}

// notice is the stderr line for a denied (or audited) decision.
func notice(rec record, suggest string) string {
	what := "denied"
	if rec.Verdict == verdictAudit {
		what = "audit: would deny"
	}
	var b strings.Builder
	fmt.Fprintf(&b, "egress: %s %s", what, rec.Proto)
	switch {
	case rec.Proto == "dns" && rec.Addr != "":
		fmt.Fprintf(&b, " answer %s for %s", rec.Addr, rec.Name)
	case rec.Proto == "dns":
		fmt.Fprintf(&b, " %s query for %s", rec.QType, rec.Name)
	default:
		addr := rec.Addr
		if rec.Port != 0 {
			if strings.Contains(addr, ":") {
				addr = "[" + addr + "]"
			}
			addr += ":" + strconv.Itoa(int(rec.Port))
		}
		b.WriteString(" " + addr)
		if rec.Name != "" {
			b.WriteString(" (" + plain(rec.Name) + ")")
		}
	}
	if rec.SNI != "" {
		fmt.Fprintf(&b, " for %s", plain(rec.SNI))
	}
	if rec.Reason != "" {
		b.WriteString(": " + rec.Reason)
	}
	if strings.HasPrefix(rec.Rule, "deny ") {
		b.WriteString(": rule " + rec.Rule)
	}
	if suggest != "" {
		fmt.Fprintf(&b, ": allow it with --allow %s", suggest)
	}
	b.WriteByte('\n')
	return b.String()
}

// plain returns s as it is if it is made of what host names are made of,
// else quoted: the guest chooses a server name or Host header, which must
// not reach the user's terminal as control sequences.
func plain(s string) string {
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !('a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9' || strings.IndexByte(".-_*:[]", c) >= 0) {
			return strconv.Quote(s)
		}
	}
	return s
}

// suggestion is the allow rule for host (a name, or an address) and ports
// in the notices' form: TCP as host:ports, UDP with /udp, ICMP as
// host/icmp.
func suggestion(host string, p Proto, ports string) string {
	if a, err := netip.ParseAddr(host); err == nil && a.Is6() {
		host = "[" + host + "]"
	}
	switch p {
	case ICMP:
		return host + "/icmp"
	case UDP:
		return host + ":" + ports + "/udp"
	}
	return host + ":" + ports
}

// use remembers, in audit mode, that the guest used host, p and port.
func (r *reporter) use(host string, p Proto, port uint16) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if len(r.used) < maxRemembered {
		r.used[usageKey{host, p, port}] = struct{}{}
	}
}

// suggested is the allow list of what the guest used: one rule per host
// and protocol, ports joined, in the notices' form.
func (r *reporter) suggested() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	type hp struct {
		host  string
		proto Proto
	}
	ports := map[hp][]int{}
	for k := range r.used {
		ports[hp{k.host, k.proto}] = append(ports[hp{k.host, k.proto}], int(k.port))
	}
	var out []string
	for k, ps := range ports {
		sort.Ints(ps)
		list := make([]string, len(ps))
		for i, p := range ps {
			list[i] = strconv.Itoa(p)
		}
		out = append(out, "allow "+suggestion(k.host, k.proto, strings.Join(list, ",")))
	}
	sort.Strings(out)
	return out
}

// suppressedNotices counts notices the rate limit kept back.
func (r *reporter) suppressedNotices() uint64 {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.suppressed
}
