package main

import (
	"errors"
	"fmt"
	"net/netip"
	"runtime"

	"github.com/netns-run/netns-run/launcher"
	"github.com/netns-run/netns-run/netstack"
)

// pastaNet is the network pasta's options describe: what the namespace's
// interface gets and what the stack answers for.
type pastaNet struct {
	guest launcher.GuestConfig
	stack netstack.Config
	// addr4 and addr6 are the guest's own addresses (where forwarded
	// ports deliver); either may be invalid.
	addr4, addr6 netip.Addr
}

// Without a usable host interface, pasta gives the namespace link-local
// addresses of its own.
var (
	fallbackAddr4    = netip.MustParsePrefix("169.254.2.1/16")
	fallbackGateway4 = netip.MustParseAddr("169.254.2.2")
)

// familyNet is one address family's addressing.
type familyNet struct {
	addrs  []netip.Prefix // the first is the guest's main address
	gw     netip.Addr
	routes []launcher.GuestRoute
	host   *launcher.HostInterface
}

// pastaAddressing works out the namespace's addressing as pasta does: the
// host's interface with the default route, copied (name, addresses,
// routes), unless options say otherwise.
func pastaAddressing(c *pastaConfig) (pastaNet, error) {
	var v4, v6 familyNet
	var err error
	if !c.ipv6Only {
		if v4, err = familyAddressing(c, false); err != nil {
			return pastaNet{}, err
		}
	}
	if !c.ipv4Only {
		if v6, err = familyAddressing(c, true); err != nil {
			return pastaNet{}, err
		}
	}
	if len(v4.addrs) == 0 && len(v6.addrs) == 0 {
		return pastaNet{}, errors.New("no usable address: the host has no IPv6 default route; drop --ipv6-only or give --address and --gateway")
	}
	name := c.nsIfname
	for _, h := range []*launcher.HostInterface{v4.host, v6.host} {
		if name == "" && h != nil {
			name = h.Name
		}
	}
	if name == "" {
		name = "tap0"
	}
	mtu := c.mtu
	if mtu == 0 {
		mtu = 1500 // no MTU given to the interface: the kernel's default
	}
	p := pastaNet{
		// One TAP queue per P, as netns-run and usernet's slirp4netns mode.
		guest: launcher.GuestConfig{TapName: name, MTU: mtu, TxQueueLen: 10000, Offload: true, MAC: c.nsMAC, Queues: runtime.GOMAXPROCS(0)},
		stack: netstack.DefaultConfig(),
	}
	p.guest.Routes = append(v4.routes, v6.routes...)
	n := &p.stack
	n.MTU = uint32(mtu)
	n.Pasta = netstack.PastaAddressing{Enabled: true, NoGatewayMap: c.noMapGW || c.noMapHostLoopback, HostMap: map[netip.Addr]netip.Addr{}}
	n.DNS, n.DNS6 = netip.Addr{}, netip.Addr{}
	for _, a := range c.dnsForward {
		if a.Is4() {
			n.DNS = a
		} else {
			n.DNS6 = a
		}
	}
	if len(c.macAddr) == 6 {
		n.GatewayMAC = c.macAddr
	}
	if len(v4.addrs) > 0 {
		p.addr4 = v4.addrs[0].Addr()
		p.guest.Address = v4.addrs[0]
		p.guest.ExtraAddresses = append(p.guest.ExtraAddresses, v4.addrs[1:]...)
		n.Network, n.Gateway = v4.addrs[0].Masked(), v4.gw
	} else {
		// The stack wants an IPv4 side; the guest has no route to it.
		n.Network, n.Gateway = netstack.DefaultNetwork, netstack.DefaultGateway
	}
	if len(v6.addrs) > 0 {
		p.addr6 = v6.addrs[0].Addr()
		p.guest.ExtraAddresses = append(p.guest.ExtraAddresses, v6.addrs...)
		n.IPv6, n.Network6, n.Gateway6 = true, v6.addrs[0].Masked(), v6.gw
	}
	for _, a := range c.mapHostLoopback {
		n.Pasta.HostMap[a] = netip.IPv6Loopback()
		if a.Is4() {
			n.Pasta.HostMap[a] = netip.AddrFrom4([4]byte{127, 0, 0, 1})
		}
	}
	// --map-guest-addr: to the address the guest was given, which by
	// default is the host's own (as in pasta); a family without one has
	// nothing to map.
	for _, a := range c.mapGuestAddr {
		if to := p.addr4; a.Is4() && to.IsValid() {
			n.Pasta.HostMap[a] = to
		} else if to := p.addr6; a.Is6() && to.IsValid() {
			n.Pasta.HostMap[a] = to
		}
	}
	if n.OutboundAddr4, err = pastaOutbound(c, false); err != nil {
		return pastaNet{}, err
	}
	if n.OutboundAddr6, err = pastaOutbound(c, true); err != nil {
		return pastaNet{}, err
	}
	return p, nil
}

// familyAddressing is one family's share of pastaAddressing. An empty
// result (no addresses) leaves the family out.
func familyAddressing(c *pastaConfig, v6 bool) (familyNet, error) {
	ifname := c.iface
	if ifname == "" {
		ifname = c.outboundIf4
		if v6 {
			ifname = c.outboundIf6
		}
	}
	var f familyNet
	h, err := launcher.FindHostInterface(v6, ifname)
	switch {
	case errors.Is(err, launcher.ErrNoHostInterface):
		h = nil
	case err != nil:
		return f, err
	}
	f.host = h
	addr, hasAddr := pick(c.addrs, v6)
	gw, hasGw := pick(c.gateways, v6)
	switch {
	case hasAddr:
		bits := -1
		if !v6 && c.netmask >= 0 {
			bits = c.netmask
		}
		for _, p := range hostAddrs(h) {
			if p.Addr() == addr && bits < 0 {
				bits = p.Bits()
			}
		}
		if bits < 0 {
			bits = defaultBits(addr)
		}
		f.addrs = []netip.Prefix{netip.PrefixFrom(addr, bits)}
	case h != nil:
		f.addrs = append(f.addrs, h.Addrs...)
		if !v6 && c.netmask >= 0 {
			f.addrs[0] = netip.PrefixFrom(f.addrs[0].Addr(), c.netmask)
		}
	case !v6:
		f.addrs = []netip.Prefix{fallbackAddr4}
	default:
		return familyNet{}, nil // no IPv6 on this host: IPv4 only, as pasta
	}
	switch {
	case hasGw:
		f.gw = gw
	case h != nil && h.Gateway.IsValid():
		f.gw = h.Gateway
	case !v6 && h == nil:
		f.gw = fallbackGateway4
	default:
		if v6 {
			return familyNet{}, nil
		}
		return f, fmt.Errorf("the host's default route has no gateway: give --gateway")
	}
	if !hasAddr && !hasGw && h != nil && len(h.Routes) > 0 && c.netmask < 0 {
		f.routes = h.Routes
	} else {
		f.routes = []launcher.GuestRoute{{Gw: f.gw}}
	}
	if v6 {
		// The guest's IPv6 addresses come without an on-link prefix
		// (see launcher.GuestConfig), and on-link routes (SLAAC's,
		// proto ra) are left out: the stack answers neighbour
		// solicitations for its own addresses only. A route to the
		// gateway itself comes first.
		routes := []launcher.GuestRoute{{Dst: netip.PrefixFrom(f.gw, 128)}}
		for _, r := range f.routes {
			if r.Gw.IsValid() {
				routes = append(routes, r)
			}
		}
		f.routes = routes
	}
	return f, nil
}

func pick(list []netip.Addr, v6 bool) (netip.Addr, bool) {
	for _, a := range list {
		if a.Is6() == v6 {
			return a, true
		}
	}
	return netip.Addr{}, false
}

func hostAddrs(h *launcher.HostInterface) []netip.Prefix {
	if h == nil {
		return nil
	}
	return h.Addrs
}

// defaultBits is the prefix length of an address given without one: its
// class for IPv4, as pasta does, /64 for IPv6.
func defaultBits(a netip.Addr) int {
	if a.Is6() {
		return 64
	}
	switch b := a.As4()[0]; {
	case b < 128:
		return 8
	case b < 192:
		return 16
	}
	return 24
}

// pastaOutbound is the source address for host sockets of one family, from
// -o or --outbound-if4/6.
func pastaOutbound(c *pastaConfig, v6 bool) (netip.Addr, error) {
	if a, ok := pick(c.outbound, v6); ok {
		return a, nil
	}
	ifname := c.outboundIf4
	if v6 {
		ifname = c.outboundIf6
	}
	return outboundAddr(ifname, v6)
}
