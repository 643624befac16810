package main

import (
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/user"
	"strconv"
	"strings"

	"github.com/netns-run/netns-run/cmd/internal/cli"
	"github.com/netns-run/netns-run/portfwd"
)

// pastaVersionText has pasta's shape: "pasta VERSION" first, as podman
// info and rootlesskit read it.
const pastaVersionText = "pasta %s (usernet: the gVisor netstack engine behind pasta's command line)\n" +
	"usernet is not passt/pasta; it accepts pasta's options that podman and rootlesskit use.\n"

const pastaHelpText = "Usage: pasta [OPTION]... PID\n" +
	"       pasta [OPTION]... --netns PATH|NAME [--userns PATH]\n" +
	"\n" +
	"usernet speaking pasta's command line: attach to the network namespace of PID\n" +
	"(or --netns), configure it (--config-net) and serve it in the background.\n" +
	"\n" +
	"  -f, --foreground        stay in the foreground\n" +
	"  -P, --pid FILE          write the serving process's PID to FILE\n" +
	"  -d, --debug             log every flow to stderr (or --log-file)\n" +
	"  -l, --log-file PATH     log to PATH\n" +
	"  -p, --pcap FILE         capture the namespace's packets to FILE\n" +
	"  -m, --mtu MTU           MTU of the namespace's interface (default 65520)\n" +
	"  -a, --address ADDR      IPv4 or IPv6 address (default: the host's)\n" +
	"  -n, --netmask MASK      IPv4 netmask, dotted or bits\n" +
	"  -g, --gateway ADDR      IPv4 or IPv6 gateway (default: the host's)\n" +
	"  -I, --ns-ifname NAME    interface name (default: the host's)\n" +
	"  -i, --interface NAME    host interface to copy addresses and routes from\n" +
	"  -o, --outbound ADDR     bind outbound sockets to ADDR\n" +
	"  -D, --dns ADDR          resolver the DNS forwarder asks (default: resolv.conf)\n" +
	"      --dns-forward ADDR  DNS (53, 853) to ADDR goes to the host's resolver\n" +
	"      --map-guest-addr ADDR     ADDR reaches the host's own address\n" +
	"      --map-host-loopback ADDR  ADDR reaches the host's loopback\n" +
	"      --no-map-gw         the gateway is not the host's loopback\n" +
	"  -4, --ipv4-only / -6, --ipv6-only\n" +
	"  -t, --tcp-ports SPEC    host -> namespace TCP ports: none, auto, or\n" +
	"                          [ADDR[%IF]/]FIRST[-LAST][:TOFIRST[-TOLAST]][,~EXCL]\n" +
	"  -u, --udp-ports SPEC    the same for UDP\n" +
	"  -T, --tcp-ns SPEC       namespace loopback -> host loopback, TCP\n" +
	"  -U, --udp-ns SPEC       the same for UDP\n" +
	"      --host-lo-to-ns-lo  host loopback clients reach the namespace's loopback\n" +
	"      --config-net        configure addresses and routes (required)\n" +
	"      --ns-mac-addr MAC   MAC of the namespace's interface\n" +
	"      --api-socket PATH   usernet: the slirp4netns JSON API (stats, info, ports)\n" +
	"      --allow RULE, --deny RULE, --policy FILE, --egress-audit, --egress-log FILE\n" +
	"                          usernet: the egress policy, as in netns-run (see its --help)\n" +
	"      --version, -h, --help\n"

// pastaConfig is pasta's command line, parsed.
type pastaConfig struct {
	debug, foreground bool
	logFile           string
	pcap, pidFile     string
	apiSocket         string
	mtu               int
	addrs             []netip.Addr // at most one per family
	netmask           int          // -1: from the host
	gateways          []netip.Addr
	macAddr           net.HardwareAddr // our side
	nsMAC             string
	iface             string
	nsIfname          string
	outbound          []netip.Addr
	outboundIf4       string
	outboundIf6       string
	dns               []netip.Addr
	dnsNone           bool
	dnsForward        []netip.Addr
	mapHostLoopback   []netip.Addr
	noMapHostLoopback bool
	mapGuestAddr      []netip.Addr
	noMapGuestAddr    bool
	noMapGW           bool
	hostLoToNsLo      bool
	noSplice          bool
	ipv4Only          bool
	ipv6Only          bool
	tcp, udp          portfwd.PortSpec
	tcpNS, udpNS      portfwd.PortSpec
	egress            cli.EgressFlags
	pid               int
	netns, userns     string
	netnsOnly         bool
	noNetnsQuit       bool
	configNet         bool
}

// pastaOutcome is what the command line asks before anything runs.
type pastaOutcome int

const (
	pastaRun pastaOutcome = iota
	pastaHelp
	pastaVersion
)

var pastaOptions = []optSpec{
	{long: "debug", short: 'd'}, {long: "trace"}, {long: "quiet", short: 'q'},
	{long: "foreground", short: 'f'}, {long: "stderr", short: 'e'},
	{long: "log-file", short: 'l', arg: true}, {long: "log-size", arg: true},
	{long: "runas", arg: true}, {long: "help", short: 'h'}, {long: "version"},
	{long: "pcap", short: 'p', arg: true}, {long: "pid", short: 'P', arg: true},
	{long: "mtu", short: 'm', arg: true}, {long: "address", short: 'a', arg: true},
	{long: "netmask", short: 'n', arg: true}, {long: "mac-addr", short: 'M', arg: true},
	{long: "gateway", short: 'g', arg: true}, {long: "interface", short: 'i', arg: true},
	{long: "outbound", short: 'o', arg: true}, {long: "outbound-if4", arg: true},
	{long: "outbound-if6", arg: true}, {long: "dns", short: 'D', arg: true},
	{long: "dns-forward", arg: true}, {long: "dns-host", arg: true},
	{long: "search", short: 'S', arg: true}, {long: "no-dhcp-dns"}, {long: "dhcp-dns"},
	{long: "no-dhcp-search"}, {long: "dhcp-search"},
	{long: "no-tcp"}, {long: "no-udp"}, {long: "no-icmp"}, {long: "no-dhcp"},
	{long: "no-ndp"}, {long: "no-dhcpv6"}, {long: "no-ra"}, {long: "no-splice"},
	{long: "freebind"}, {long: "no-map-gw"}, {long: "map-host-loopback", arg: true},
	{long: "map-guest-addr", arg: true}, {long: "host-lo-to-ns-lo"},
	{long: "ipv4-only", short: '4'}, {long: "ipv6-only", short: '6'},
	{long: "tcp-ports", short: 't', arg: true}, {long: "udp-ports", short: 'u', arg: true},
	{long: "tcp-ns", short: 'T', arg: true}, {long: "udp-ns", short: 'U', arg: true},
	{long: "ns-ifname", short: 'I', arg: true}, {long: "userns", arg: true},
	{long: "netns", arg: true}, {long: "netns-only"}, {long: "no-netns-quit"},
	{long: "config-net"}, {long: "no-copy-routes"}, {long: "no-copy-addrs"},
	{long: "ns-mac-addr", arg: true},
	// usernet's own
	{long: "api-socket", arg: true},
	{long: "allow", arg: true}, {long: "deny", arg: true}, {long: "policy", arg: true},
	{long: "egress-audit"}, {long: "egress-log", arg: true},
}

// pastaRefused are pasta options whose behaviour usernet does not have.
var pastaRefused = map[string]string{
	"no-tcp":   "TCP cannot be turned off",
	"no-udp":   "UDP cannot be turned off",
	"no-icmp":  "ICMP cannot be turned off",
	"freebind": "listeners cannot bind non-local addresses",
}

// parsePastaArgs parses pasta's command line. Errors are reported as pasta
// reports them and end the program with status 1.
func parsePastaArgs(args []string) (*pastaConfig, pastaOutcome, error) {
	c := &pastaConfig{mtu: 65520, netmask: -1}
	outcome := pastaRun
	rest, _, err := getoptLong(args, pastaOptions, func(o *optSpec, v string) (bool, error) {
		switch o.long {
		case "help":
			outcome = pastaHelp
			return true, nil
		case "version":
			outcome = pastaVersion
			return true, nil
		}
		return false, c.set(o.long, v)
	})
	if err != nil || outcome != pastaRun {
		return c, outcome, err
	}
	if len(rest) > 0 {
		pid, err := strconv.Atoi(rest[0])
		if err != nil || pid <= 0 || strings.TrimLeft(rest[0], "0123456789") != "" {
			return nil, pastaRun, fmt.Errorf("running a command (%q) is not supported: give a PID or --netns (netns-run runs commands in namespaces of their own)", rest[0])
		}
		if len(rest) > 1 {
			return nil, pastaRun, fmt.Errorf("unexpected arguments after the PID: %q", rest[1:])
		}
		if c.netns != "" {
			return nil, pastaRun, fmt.Errorf("both a PID and --netns given")
		}
		c.pid = pid
	}
	return c, pastaRun, c.check()
}

func (c *pastaConfig) check() error {
	switch {
	case c.pid == 0 && c.netns == "":
		return fmt.Errorf("no target: give a PID or --netns (running a shell in a new namespace is not supported)")
	case !c.configNet:
		return fmt.Errorf("--config-net is required: usernet has no DHCP server to configure the namespace later")
	case c.ipv4Only && c.ipv6Only:
		return fmt.Errorf("--ipv4-only and --ipv6-only given together")
	case c.userns != "" && c.netnsOnly:
		return fmt.Errorf("--userns and --netns-only given together")
	}
	return nil
}

// set applies one option.
func (c *pastaConfig) set(name, v string) error {
	if why, ok := pastaRefused[name]; ok {
		return fmt.Errorf("--%s is not supported: %s", name, why)
	}
	var err error
	switch name {
	case "debug", "trace":
		c.debug = true
	case "quiet", "stderr", "search", "no-dhcp-dns", "dhcp-dns", "no-dhcp-search", "dhcp-search",
		"no-dhcp", "no-ndp", "no-dhcpv6", "no-ra", "no-copy-routes", "no-copy-addrs":
		// No effect here: the namespace is configured directly, without
		// DHCP or router advertisements, and logs go to stderr anyway.
	case "log-size":
		if n, perr := strconv.ParseUint(v, 10, 63); perr != nil || n == 0 {
			err = fmt.Errorf("invalid --log-size %q", v)
		}
	case "foreground":
		c.foreground = true
	case "log-file":
		c.logFile = v
	case "runas":
		err = checkRunas(v)
	case "pcap":
		c.pcap = v
	case "pid":
		c.pidFile = v
	case "api-socket":
		c.apiSocket = v
	case "allow":
		c.egress.Allow = append(c.egress.Allow, v)
		_, err = cli.EgressFlags{Allow: []string{v}}.Config()
	case "deny":
		c.egress.Deny = append(c.egress.Deny, v)
		_, err = cli.EgressFlags{Deny: []string{v}}.Config()
	case "policy":
		c.egress.Policy = v
	case "egress-audit":
		c.egress.Audit = true
	case "egress-log":
		c.egress.Log = v
	case "mtu":
		c.mtu, err = strconv.Atoi(v)
		if err != nil || c.mtu != 0 && (c.mtu < 68 || c.mtu > 65520) {
			err = fmt.Errorf("invalid MTU %q (68-65520, or 0 for the interface's default)", v)
		}
	case "address":
		c.addrs, err = addOncePerFamily(c.addrs, "--address", v)
	case "netmask":
		c.netmask, err = parseNetmask(v)
	case "gateway":
		c.gateways, err = addOncePerFamily(c.gateways, "--gateway", v)
	case "mac-addr":
		c.macAddr, err = net.ParseMAC(v)
		if err != nil || len(c.macAddr) != 6 {
			err = fmt.Errorf("invalid MAC address %q", v)
		}
	case "ns-mac-addr":
		if m, perr := net.ParseMAC(v); perr != nil || len(m) != 6 {
			err = fmt.Errorf("invalid MAC address %q", v)
		}
		c.nsMAC = v
	case "interface":
		c.iface, err = ifName(v)
	case "ns-ifname":
		c.nsIfname, err = ifName(v)
	case "outbound":
		c.outbound, err = addOncePerFamily(c.outbound, "--outbound", v)
	case "outbound-if4":
		c.outboundIf4, err = ifName(v)
	case "outbound-if6":
		c.outboundIf6, err = ifName(v)
	case "dns", "dns-host":
		if v == "none" && name == "dns" {
			c.dnsNone, c.dns = true, nil
			break
		}
		a, perr := netip.ParseAddr(v)
		if perr != nil {
			return fmt.Errorf("invalid --%s address %q", name, v)
		}
		c.dns = append(c.dns, a.Unmap())
	case "dns-forward":
		c.dnsForward, err = addOncePerFamily(c.dnsForward, "--dns-forward", v)
	case "map-host-loopback":
		c.mapHostLoopback, c.noMapHostLoopback, err = addrOrNone(c.mapHostLoopback, c.noMapHostLoopback, name, v)
	case "map-guest-addr":
		c.mapGuestAddr, c.noMapGuestAddr, err = addrOrNone(c.mapGuestAddr, c.noMapGuestAddr, name, v)
	case "no-map-gw":
		c.noMapGW = true
	case "host-lo-to-ns-lo":
		c.hostLoToNsLo = true
	case "no-splice":
		c.noSplice = true
	case "ipv4-only":
		c.ipv4Only = true
	case "ipv6-only":
		c.ipv6Only = true
	case "tcp-ports":
		err = c.tcp.Add(v)
	case "udp-ports":
		err = c.udp.Add(v)
	case "tcp-ns":
		err = c.tcpNS.Add(v)
	case "udp-ns":
		err = c.udpNS.Add(v)
	case "userns":
		c.userns = v
	case "netns":
		c.netns = v
		if v != "" && !strings.Contains(v, "/") {
			// A name, as ip-netns(8) keeps them.
			c.netns = "/run/netns/" + v
		}
	case "netns-only":
		c.netnsOnly = true
	case "no-netns-quit":
		c.noNetnsQuit = true
	case "config-net":
		c.configNet = true
	default:
		return fmt.Errorf("--%s: not handled", name)
	}
	return err
}

// addOncePerFamily adds the address v to list, which holds at most one
// IPv4 and one IPv6 address.
func addOncePerFamily(list []netip.Addr, flag, v string) ([]netip.Addr, error) {
	a, err := netip.ParseAddr(v)
	if err != nil || a.Zone() != "" {
		return list, fmt.Errorf("invalid %s address %q", flag, v)
	}
	a = a.Unmap()
	for _, b := range list {
		if b.Is4() == a.Is4() {
			return list, fmt.Errorf("%s given twice for one address family", flag)
		}
	}
	return append(list, a), nil
}

// addrOrNone is addOncePerFamily for options that also take "none",
// which clears the list.
func addrOrNone(list []netip.Addr, none bool, name, v string) ([]netip.Addr, bool, error) {
	if v == "none" {
		return nil, true, nil
	}
	list, err := addOncePerFamily(list, "--"+name, v)
	return list, none, err
}

// parseNetmask accepts a prefix length or a dotted-decimal mask.
func parseNetmask(v string) (int, error) {
	if n, err := strconv.Atoi(v); err == nil {
		if n < 0 || n > 32 {
			return 0, fmt.Errorf("invalid netmask %q", v)
		}
		return n, nil
	}
	a, err := netip.ParseAddr(v)
	if err != nil || !a.Is4() {
		return 0, fmt.Errorf("invalid netmask %q", v)
	}
	b := a.As4()
	ones, bits := net.IPMask(b[:]).Size()
	if bits == 0 {
		return 0, fmt.Errorf("invalid netmask %q: not contiguous", v)
	}
	return ones, nil
}

func ifName(v string) (string, error) {
	if v == "" || len(v) > 15 || strings.ContainsAny(v, "/ \t\n:") || v == "." || v == ".." {
		return "", fmt.Errorf("invalid interface name %q", v)
	}
	return v, nil
}

// checkRunas accepts --runas only for the user we already are: usernet
// never changes its identity.
func checkRunas(v string) error {
	name, _, _ := strings.Cut(v, ":")
	uid := name
	if _, err := strconv.Atoi(name); err != nil {
		u, err := user.Lookup(name)
		if err != nil {
			return fmt.Errorf("--runas %s: %w", v, err)
		}
		uid = u.Uid
	}
	if uid != strconv.Itoa(os.Getuid()) {
		return fmt.Errorf("--runas %s: usernet does not change its user; run it as that user instead", v)
	}
	return nil
}
