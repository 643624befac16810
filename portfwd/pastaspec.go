package portfwd

import (
	"errors"
	"fmt"
	"net/netip"
	"strings"
)

// PortMode is how one of pasta's -t/-u/-T/-U options forwards.
type PortMode int

const (
	// PortsUnset: the option was not given (pasta's default is auto).
	PortsUnset PortMode = iota
	// PortsNone forwards nothing.
	PortsNone
	// PortsAuto follows the listening sockets on the other side.
	PortsAuto
	// PortsList forwards the listed ranges.
	PortsList
)

// PortRange is one forwarded range of a pasta port spec: host ports
// First..Last go to ports To.. on the other side.
type PortRange struct {
	// Addr, if valid, is the address the listener binds; Iface, if set,
	// the interface it is bound to (SO_BINDTODEVICE).
	Addr  netip.Addr
	Iface string
	First uint16
	Last  uint16
	To    uint16
}

// PortSpec is the accumulated value of one of pasta's port options, which
// may be given several times.
type PortSpec struct {
	Mode   PortMode
	Ranges []PortRange
}

var errNoPorts = errors.New("forwarding every port but some (an exclusion-only spec) or 'all' is not supported; list the ports")

// Add parses one value of a pasta port option ("none", "auto", "all", or
// [ADDR[%IF]/]FIRST[-LAST][:TOFIRST[-TOLAST]][,...] with ~FIRST[-LAST]
// exclusions) into s. none and auto do not mix with anything else.
func (s *PortSpec) Add(value string) error {
	bad := func(format string, a ...any) error {
		return fmt.Errorf("port spec %q: %s", value, fmt.Sprintf(format, a...))
	}
	switch value {
	case "none", "auto":
		mode := PortsNone
		if value == "auto" {
			mode = PortsAuto
		}
		if s.Mode != PortsUnset && s.Mode != mode {
			return bad("conflicts with an earlier spec for the same option")
		}
		s.Mode = mode
		return nil
	case "all":
		return bad("%v", errNoPorts)
	}
	if s.Mode != PortsUnset && s.Mode != PortsList {
		return bad("conflicts with an earlier none or auto")
	}
	var addr netip.Addr
	var iface string
	ports := value
	if i := strings.IndexByte(value, '/'); i >= 0 {
		where := value[:i]
		ports = value[i+1:]
		a, ifname, hasIf := strings.Cut(where, "%")
		if hasIf {
			if ifname == "" || len(ifname) > 15 || strings.ContainsAny(ifname, "/ \t\n") {
				return bad("bad interface name %q", ifname)
			}
			iface = ifname
		}
		if a != "" {
			var err error
			if addr, err = netip.ParseAddr(a); err != nil || addr.Zone() != "" {
				return bad("bad address %q", a)
			}
			addr = addr.Unmap()
		} else if !hasIf {
			return bad("empty address")
		}
	}
	if ports == "" {
		return bad("no ports")
	}
	var incl []PortRange
	var excl [][2]uint16
	for _, chunk := range strings.Split(ports, ",") {
		if rest, ok := strings.CutPrefix(chunk, "~"); ok {
			first, last, err := pastaRange(rest)
			if err != nil {
				return bad("%v", err)
			}
			excl = append(excl, [2]uint16{first, last})
			continue
		}
		from, to, mapped := strings.Cut(chunk, ":")
		first, last, err := pastaRange(from)
		if err != nil {
			return bad("%v", err)
		}
		target := first
		if mapped {
			tFirst, tLast, err := pastaRange(to)
			if err != nil {
				return bad("%v", err)
			}
			if tLast-tFirst != last-first {
				return bad("ranges %s and %s differ in size", from, to)
			}
			target = tFirst
		}
		incl = append(incl, PortRange{Addr: addr, Iface: iface, First: first, Last: last, To: target})
	}
	if len(incl) == 0 {
		return bad("%v", errNoPorts)
	}
	s.Mode = PortsList
	for _, r := range incl {
		s.Ranges = append(s.Ranges, cutExclusions(r, excl)...)
	}
	return nil
}

// pastaRange parses FIRST[-LAST]; pasta takes ranges of any size.
func pastaRange(s string) (first, last uint16, err error) {
	f, l, err := parsePortRange(s, 65535)
	return uint16(f), uint16(l), err
}

// cutExclusions removes the excluded ports from r, keeping the mapping of
// the ports that remain.
func cutExclusions(r PortRange, excl [][2]uint16) []PortRange {
	out := []PortRange{r}
	for _, e := range excl {
		var next []PortRange
		for _, p := range out {
			if e[1] < p.First || e[0] > p.Last {
				next = append(next, p)
				continue
			}
			if e[0] > p.First {
				q := p
				q.Last = e[0] - 1
				next = append(next, q)
			}
			if e[1] < p.Last {
				q := p
				q.First = e[1] + 1
				q.To = p.To + (q.First - p.First)
				next = append(next, q)
			}
		}
		out = next
	}
	return out
}

// Count returns how many ports the ranges forward.
func (s PortSpec) Count() int {
	n := 0
	for _, r := range s.Ranges {
		n += int(r.Last-r.First) + 1
	}
	return n
}

// Rules expands the ranges into one Rule per port for proto, delivering to
// guest (the To ports at that address).
func (s PortSpec) Rules(proto string, guest netip.Addr) []Rule {
	out := make([]Rule, 0, s.Count())
	for _, r := range s.Ranges {
		for p := int(r.First); p <= int(r.Last); p++ {
			out = append(out, Rule{Proto: proto, HostAddr: r.Addr, HostIface: r.Iface, HostPort: uint16(p),
				GuestAddr: guest, GuestPort: r.To + uint16(p-int(r.First))})
		}
	}
	return out
}
