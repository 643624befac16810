package netstack

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
)

// PastaAddressing is pasta's view of the network (usernet's pasta mode):
// the guest usually has the host's own addresses and routes, and every
// destination, in its subnet or not, is a host somewhere that the helper
// reaches through the host's sockets. Only the gateway, the DNS address
// and the mapped addresses are the stack's.
type PastaAddressing struct {
	// Enabled switches to this addressing: Network and Network6 may be
	// any prefix (the gateway and DNS need not be inside), and their
	// other addresses are forwarded like any outside address.
	Enabled bool
	// NoGatewayMap (pasta's --no-map-gw): flows to the gateway go to the
	// gateway itself, not to the host's loopback.
	NoGatewayMap bool
	// HostMap sends flows to a guest-visible address to a host address
	// instead: --map-host-loopback (to 127.0.0.1 or ::1) and
	// --map-guest-addr (to the host's own address).
	HostMap map[netip.Addr]netip.Addr
}

// dnsTLSPort is DNS over TLS, which pasta's --dns-forward also redirects.
const dnsTLSPort = 853

func (p *PastaAddressing) validate(c *Config) error {
	if !c.Gateway.Is4() && !(c.IPv6 && c.Gateway6.Is6()) {
		return errors.New("pasta addressing: no gateway")
	}
	if c.DNS.IsValid() && !c.DNS.Is4() {
		return fmt.Errorf("dns %v: want an IPv4 address", c.DNS)
	}
	if c.IPv6 && (!c.Network6.IsValid() || !c.Network6.Addr().Is6()) {
		return fmt.Errorf("network6 %v: want an IPv6 prefix", c.Network6)
	}
	for from, to := range p.HostMap {
		if !from.IsValid() || !to.IsValid() || from.Is4() != to.Is4() {
			return fmt.Errorf("address map %v -> %v: want two addresses of one family", from, to)
		}
	}
	if len(c.GatewayMAC) != 6 {
		return fmt.Errorf("gateway MAC %v: want 6 bytes", c.GatewayMAC)
	}
	return nil
}

// sharesGuestSubnet reports whether a host-side client at a would look to
// the guest like a neighbour it cannot answer: in the stack's own subnet
// (slirp4netns's addressing), or, in pasta's, one of the host's own
// addresses, which the guest holds as its own.
func (s *Stack) sharesGuestSubnet(a netip.Addr) bool {
	if s.cfg.Pasta.Enabled {
		return s.hostLocal.is(a)
	}
	return s.cfg.Network.Contains(a)
}

// dialUpstreamTLS connects to the first upstream resolver that accepts DNS
// over TLS, as pasta's --dns-forward does for TCP.
func (s *Stack) dialUpstreamTLS() (*net.TCPConn, error) {
	return s.dialUpstreamPort(dnsTLSPort)
}

// dialUpstreamPort connects to port on the first upstream resolver that
// accepts. (dns.go's dialDNSUpstreamTCP is this with each upstream's own
// port.)
func (s *Stack) dialUpstreamPort(port uint16) (*net.TCPConn, error) {
	if len(s.cfg.DNSUpstreams) == 0 {
		return nil, errNoUpstream
	}
	var errs []error
	for _, up := range s.cfg.DNSUpstreams {
		d := net.Dialer{Timeout: dnsTryTimeout}
		c, err := d.DialContext(s.ctx, "tcp", netip.AddrPortFrom(up.Addr(), port).String())
		if err == nil {
			return c.(*net.TCPConn), nil
		}
		errs = append(errs, err)
	}
	return nil, errors.Join(errs...)
}
