package launcher

import (
	"errors"
	"fmt"
	"net"
	"net/netip"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// HostInterface is what pasta copies from the host into the guest for one
// address family: the interface of the first default route, its addresses
// (link-local ones left out) and its routes.
type HostInterface struct {
	Name    string
	MAC     net.HardwareAddr
	Addrs   []netip.Prefix
	Gateway netip.Addr
	// Routes are the interface's routes other than the ones the kernel
	// makes for its addresses, the default route included.
	Routes []GuestRoute
}

// GuestRoute is a route for the guest's interface; a zero Dst is the
// default route.
type GuestRoute struct {
	Dst netip.Prefix `json:"dst,omitzero"`
	Gw  netip.Addr   `json:"gw,omitzero"`
}

// ErrNoHostInterface: the host has no default route for the family (an
// offline host), or its interface has no usable address.
var ErrNoHostInterface = errors.New("no interface with a default route and a usable address")

// FindHostInterface returns the interface with the first default route of
// the family (v6 or IPv4), or the interface named ifname when it is set.
func FindHostInterface(v6 bool, ifname string) (*HostInterface, error) {
	family := netlink.FAMILY_V4
	if v6 {
		family = netlink.FAMILY_V6
	}
	routes, err := netlink.RouteListFiltered(family, &netlink.Route{Table: unix.RT_TABLE_MAIN}, netlink.RT_FILTER_TABLE)
	if err != nil {
		return nil, fmt.Errorf("host routes: %w", err)
	}
	var link netlink.Link
	var gw netip.Addr
	for _, r := range routes {
		if !isDefault(r) {
			continue
		}
		l, err := netlink.LinkByIndex(routeLinkIndex(r))
		if err != nil || (ifname != "" && l.Attrs().Name != ifname) {
			continue
		}
		link = l
		gw = routeGateway(r)
		break
	}
	if link == nil && ifname != "" {
		if link, err = netlink.LinkByName(ifname); err != nil {
			return nil, fmt.Errorf("host interface %s: %w", ifname, err)
		}
	}
	if link == nil {
		return nil, ErrNoHostInterface
	}
	h := &HostInterface{Name: link.Attrs().Name, MAC: link.Attrs().HardwareAddr, Gateway: gw}
	addrs, err := netlink.AddrList(link, family)
	if err != nil {
		return nil, fmt.Errorf("addresses of %s: %w", h.Name, err)
	}
	for _, a := range addrs {
		ip, ok := netip.AddrFromSlice(a.IP)
		if !ok {
			continue
		}
		ip = ip.Unmap()
		if ip.IsLinkLocalUnicast() || ip.IsLoopback() || a.Flags&unix.IFA_F_TENTATIVE != 0 {
			continue
		}
		ones, _ := a.Mask.Size()
		h.Addrs = append(h.Addrs, netip.PrefixFrom(ip, ones))
	}
	if len(h.Addrs) == 0 {
		return nil, fmt.Errorf("%s: %w", h.Name, ErrNoHostInterface)
	}
	for _, r := range routes {
		if routeLinkIndex(r) != link.Attrs().Index || r.Protocol == unix.RTPROT_KERNEL || r.Type != unix.RTN_UNICAST {
			continue
		}
		gr := GuestRoute{Gw: routeGateway(r)}
		if !isDefault(r) {
			p, ok := prefixOf(r.Dst)
			if !ok || p.Addr().IsLinkLocalUnicast() || p.Addr().IsMulticast() {
				continue
			}
			gr.Dst = p
		}
		h.Routes = append(h.Routes, gr)
	}
	return h, nil
}

func isDefault(r netlink.Route) bool {
	if r.Dst == nil {
		return true
	}
	ones, _ := r.Dst.Mask.Size()
	return ones == 0
}

// routeLinkIndex is the route's interface, or its first next hop's.
func routeLinkIndex(r netlink.Route) int {
	if r.LinkIndex == 0 && len(r.MultiPath) > 0 {
		return r.MultiPath[0].LinkIndex
	}
	return r.LinkIndex
}

func routeGateway(r netlink.Route) netip.Addr {
	ip := r.Gw
	if ip == nil && len(r.MultiPath) > 0 {
		ip = r.MultiPath[0].Gw
	}
	a, _ := netip.AddrFromSlice(ip)
	return a.Unmap()
}

func prefixOf(n *net.IPNet) (netip.Prefix, bool) {
	a, ok := netip.AddrFromSlice(n.IP)
	if !ok {
		return netip.Prefix{}, false
	}
	ones, _ := n.Mask.Size()
	return netip.PrefixFrom(a.Unmap(), ones), true
}
