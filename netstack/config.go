package netstack

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"strings"

	"github.com/netns-run/netns-run/netstack/egress"
)

// Config describes the virtual network the guest sees and how the helper
// reaches the outside on its behalf. Everything but Capture and Logger
// crosses to an engine process as JSON.
type Config struct {
	// MTU of the guest link; the TAP must use the same.
	MTU uint32
	// Network is the guest subnet (10.0.2.0/24 by default).
	Network netip.Prefix
	// Gateway is the guest's default router; connections to it go to the
	// host's loopback unless DisableHostLoopback is set.
	Gateway netip.Addr
	// DNS is the address of the built-in DNS forwarder.
	DNS netip.Addr
	// IPv6 adds Network6 with Gateway6 (the host's ::1 unless
	// DisableHostLoopback) and DNS6, announced by router advertisements.
	IPv6           bool
	Network6       netip.Prefix
	Gateway6, DNS6 netip.Addr
	// GatewayMAC is the Ethernet address the stack answers with.
	GatewayMAC net.HardwareAddr
	// DisableHostLoopback refuses every flow that would end on the
	// host's loopback addresses.
	DisableHostLoopback bool
	// Restrict refuses every flow to the outside: the guest reaches only
	// the stack's own addresses (and DNS through the forwarder), like
	// libslirp's restricted mode.
	Restrict bool
	// DNSUpstreams are the servers the DNS forwarder asks, in order.
	DNSUpstreams []netip.AddrPort
	// DisableDNS turns the forwarder off: flows to the DNS address are
	// dropped like any other address in the guest subnet.
	DisableDNS bool
	// OutboundAddr4 and OutboundAddr6, if valid, are the local addresses
	// host-side sockets are bound to.
	OutboundAddr4, OutboundAddr6 netip.Addr
	// Capture, if set, receives every guest frame in pcap format (wrap
	// files in a CaptureWriter).
	Capture io.Writer `json:"-"`
	// KernelTCP, if set, is a TCP listener inside the guest's namespace,
	// bound to the guest's IPv4 address or (dual-stack) to all: guest TCP
	// connections out then end in the guest's own kernel at it (see
	// ktcp.go). New closes it (the stack
	// keeps a duplicate).
	KernelTCP *os.File `json:"-"`
	// KernelTCPNAT, with KernelTCP, is the netlink socket
	// ktcpnat.Install returned inside the guest's namespace: the
	// translation of busy flows then runs in the guest's kernel. New
	// closes it (the stack keeps a duplicate).
	KernelTCPNAT *os.File `json:"-"`
	// Logger receives debug detail and one line per problem. Nil: quiet.
	Logger *slog.Logger `json:"-"`
	// Egress is the egress policy (none: everything is allowed).
	Egress egress.Config
	// limits, if set, replaces the flow limits and timeouts (tests).
	limits *limits

	// Pasta-style addressing (usernet's pasta mode); see pasta.go.
	Pasta PastaAddressing
}

// Default addressing, identical to slirp4netns so guests and tools that
// hard-code it keep working.
var (
	DefaultNetwork   = netip.MustParsePrefix("10.0.2.0/24")
	DefaultGateway   = netip.MustParseAddr("10.0.2.2")
	DefaultDNS       = netip.MustParseAddr("10.0.2.3")
	DefaultGuestAddr = netip.MustParseAddr("10.0.2.100")

	DefaultNetwork6   = netip.MustParsePrefix("fd00::/64")
	DefaultGateway6   = netip.MustParseAddr("fd00::2")
	DefaultDNS6       = netip.MustParseAddr("fd00::3")
	DefaultGuestAddr6 = netip.MustParseAddr("fd00::100")
)

// DefaultMTU matches slirp4netns and rootlesskit: large frames make the
// userspace stack cheaper per byte.
const DefaultMTU = 65520

// DefaultGatewayMAC is the locally administered address of the gateway.
var DefaultGatewayMAC = net.HardwareAddr{0x52, 0x55, 0x0a, 0x00, 0x02, 0x02}

// DefaultConfig returns the slirp4netns-compatible addressing.
func DefaultConfig() Config {
	return Config{
		MTU:        DefaultMTU,
		Network:    DefaultNetwork,
		Gateway:    DefaultGateway,
		DNS:        DefaultDNS,
		GatewayMAC: DefaultGatewayMAC,
		Network6:   DefaultNetwork6,
		Gateway6:   DefaultGateway6,
		DNS6:       DefaultDNS6,
	}
}

func (c *Config) validate() error {
	if c.MTU < 68 || c.MTU > 65521 {
		return fmt.Errorf("mtu %d out of range 68..65521", c.MTU)
	}
	if !c.Network.IsValid() || !c.Network.Addr().Is4() {
		return fmt.Errorf("network %v: want an IPv4 prefix", c.Network)
	}
	if c.Pasta.Enabled {
		return c.Pasta.validate(c)
	}
	for name, a := range map[string]netip.Addr{"gateway": c.Gateway, "dns": c.DNS} {
		if !c.Network.Contains(a) {
			return fmt.Errorf("%s %v is outside network %v", name, a, c.Network)
		}
	}
	if c.IPv6 {
		if !c.Network6.IsValid() || !c.Network6.Addr().Is6() || c.Network6.Bits() != 64 {
			return fmt.Errorf("network6 %v: want an IPv6 /64 (SLAAC)", c.Network6)
		}
		for name, a := range map[string]netip.Addr{"gateway6": c.Gateway6, "dns6": c.DNS6} {
			if !c.Network6.Contains(a) {
				return fmt.Errorf("%s %v is outside network6 %v", name, a, c.Network6)
			}
		}
	}
	if len(c.GatewayMAC) != 6 {
		return fmt.Errorf("gateway MAC %v: want 6 bytes", c.GatewayMAC)
	}
	return nil
}

const dnsPort = 53

// ParseDNSUpstream parses ADDR or ADDR:PORT ([ADDR]:PORT for IPv6); the
// port defaults to 53.
func ParseDNSUpstream(s string) (netip.AddrPort, error) {
	if ap, err := netip.ParseAddrPort(s); err == nil {
		if ap.Port() == 0 {
			return netip.AddrPort{}, fmt.Errorf("dns upstream %q: port 0", s)
		}
		return ap, nil
	}
	host := s
	if strings.HasPrefix(s, "[") && strings.HasSuffix(s, "]") {
		host = s[1 : len(s)-1]
	}
	a, err := netip.ParseAddr(host)
	if err != nil {
		return netip.AddrPort{}, fmt.Errorf("dns upstream %q: want ADDR or ADDR:PORT ([ADDR]:PORT for IPv6)", s)
	}
	if a.Zone() != "" {
		return netip.AddrPort{}, fmt.Errorf("dns upstream %q: zoned addresses are not supported", s)
	}
	return netip.AddrPortFrom(a, dnsPort), nil
}

// DNSUpstreams returns the servers named by flags (ADDR[:PORT] each), or
// when there are none, the nameservers of resolvConf (none if it is missing).
func DNSUpstreams(flags []string, resolvConf string) ([]netip.AddrPort, error) {
	if len(flags) == 0 {
		servers, err := ReadResolvConf(resolvConf)
		if err != nil && !errors.Is(err, fs.ErrNotExist) {
			return nil, err
		}
		return servers, nil
	}
	out := make([]netip.AddrPort, 0, len(flags))
	for _, f := range flags {
		ap, err := ParseDNSUpstream(f)
		if err != nil {
			return nil, fmt.Errorf("--dns-upstream: %w", err)
		}
		out = append(out, ap)
	}
	return out, nil
}

// ReadResolvConf returns the nameservers listed in a resolv.conf file.
func ReadResolvConf(path string) ([]netip.AddrPort, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("read nameservers: %w", err)
	}
	defer f.Close()
	return parseResolvConf(f)
}

func parseResolvConf(r io.Reader) ([]netip.AddrPort, error) {
	var servers []netip.AddrPort
	sc := bufio.NewScanner(r)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) < 2 || fields[0] != "nameserver" {
			continue
		}
		// Link-local IPv6 servers carry a zone ("fe80::1%eth0").
		a, err := netip.ParseAddr(fields[1])
		if err != nil {
			continue
		}
		servers = append(servers, netip.AddrPortFrom(a, dnsPort))
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("read nameservers: %w", err)
	}
	return servers, nil
}
