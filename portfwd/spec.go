package portfwd

import (
	"fmt"
	"net/netip"
	"strconv"
	"strings"
)

// ParseSpec parses a docker-style publish spec,
// [HOSTIP:]HOSTPORT[-END]:GUESTPORT[-END][/tcp|/udp], into one rule per port.
// An IPv6 HOSTIP goes in brackets ([::1]:8080:80). Without HOSTIP the rule
// listens on every address, IPv4 and IPv6 (HostAddr is left invalid).
// GuestAddr is left for the caller to fill in.
func ParseSpec(spec string) ([]Rule, error) {
	bad := func(format string, a ...any) ([]Rule, error) {
		return nil, fmt.Errorf("publish %q: %s (want [HOSTIP:]HOSTPORT:GUESTPORT[/tcp|/udp])", spec, fmt.Sprintf(format, a...))
	}
	rest, proto := spec, "tcp"
	if i := strings.LastIndexByte(spec, '/'); i >= 0 {
		rest, proto = spec[:i], spec[i+1:]
		if proto != "tcp" && proto != "udp" {
			return bad("protocol %q is neither tcp nor udp", proto)
		}
	}
	i := strings.LastIndexByte(rest, ':')
	if i < 0 {
		return bad("no guest port")
	}
	hostPart, guestPart := rest[:i], rest[i+1:]
	var hostAddr netip.Addr
	hostPorts := hostPart
	if strings.HasPrefix(hostPart, "[") {
		end := strings.Index(hostPart, "]:")
		if end < 0 {
			return bad("unterminated [IPv6 address]")
		}
		a, err := netip.ParseAddr(hostPart[1:end])
		if err != nil || !a.Is6() || a.Zone() != "" {
			return bad("host address %q is not an IPv6 address", hostPart[1:end])
		}
		hostAddr, hostPorts = a, hostPart[end+2:]
	} else if j := strings.LastIndexByte(hostPart, ':'); j >= 0 {
		a, err := netip.ParseAddr(hostPart[:j])
		if err != nil || !a.Is4() {
			return bad("host address %q is not an IPv4 address (put IPv6 in brackets)", hostPart[:j])
		}
		hostAddr, hostPorts = a, hostPart[j+1:]
	}
	hFirst, hLast, err := parsePortRange(hostPorts, maxRangeSize)
	if err != nil {
		return bad("host port: %v", err)
	}
	gFirst, gLast, err := parsePortRange(guestPart, maxRangeSize)
	if err != nil {
		return bad("guest port: %v", err)
	}
	if gLast-gFirst != hLast-hFirst {
		return bad("host range %s and guest range %s differ in size", hostPorts, guestPart)
	}
	rules := make([]Rule, 0, hLast-hFirst+1)
	for off := 0; off <= hLast-hFirst; off++ {
		rules = append(rules, Rule{Proto: proto, HostAddr: hostAddr, HostPort: uint16(hFirst + off), GuestPort: uint16(gFirst + off)})
	}
	return rules, nil
}

// maxRangeSize bounds one spec: a typo such as 1-65535 should not open
// tens of thousands of listeners.
const maxRangeSize = 1024

// parsePortRange parses FIRST[-LAST], a range of at most maxSize ports.
func parsePortRange(s string, maxSize int) (first, last int, err error) {
	lo, hi, isRange := strings.Cut(s, "-")
	if first, err = parsePort(lo); err != nil {
		return 0, 0, err
	}
	last = first
	if isRange {
		if last, err = parsePort(hi); err != nil {
			return 0, 0, err
		}
		if last < first {
			return 0, 0, fmt.Errorf("range %s runs backwards", s)
		}
		if last-first >= maxSize {
			return 0, 0, fmt.Errorf("range %s is larger than %d ports", s, maxSize)
		}
	}
	return first, last, nil
}

func parsePort(s string) (int, error) {
	n, err := strconv.Atoi(s)
	if err != nil || n < 1 || n > 65535 {
		return 0, fmt.Errorf("%q is not a port number 1-65535", s)
	}
	return n, nil
}
