package main

import (
	"context"
	"net/netip"
	"os"

	"github.com/netns-run/netns-run/launcher"
	"github.com/netns-run/netns-run/portfwd"
)

// defaultPcapMaxSize caps a pasta-mode capture as usernet's --pcap does by
// default.
const defaultPcapMaxSize = 1 << 30

var (
	loopback4 = netip.MustParseAddr("127.0.0.1")
	loopback6 = netip.IPv6Loopback()
)

// startPorts binds -t/-u (host -> namespace) and -T/-U (namespace loopback
// -> host loopback); auto modes follow the listening sockets every second.
// An unset option is auto, as in pasta.
func (h *pastaHelper) startPorts(ctx context.Context) error {
	c := h.c
	specs := []*portfwd.PortSpec{&c.tcp, &c.udp, &c.tcpNS, &c.udpNS}
	for _, s := range specs {
		if s.Mode == portfwd.PortsUnset {
			s.Mode = portfwd.PortsAuto
		}
	}
	needHelper := c.tcpNS.Mode != portfwd.PortsNone || c.udpNS.Mode != portfwd.PortsNone ||
		c.tcp.Mode == portfwd.PortsAuto || c.udp.Mode == portfwd.PortsAuto ||
		(!c.noSplice && (c.tcp.Mode == portfwd.PortsList || c.udp.Mode == portfwd.PortsList))
	// Clients the guest must see as they are (not the host's loopback,
	// unless --no-splice): through the guest's kernel when it can, as
	// from the client; else through the stack.
	var tap portfwd.Guest = h.stack
	if h.kernelInbound {
		ph := launcher.NewPortHelper(h.inboundTarget)
		h.closers = append(h.closers, func() { ph.Close() })
		tap = portfwd.NewKernelPath(ctx, ph, h.stack, h.stack.ClientSource, h.log)
	}
	guest := tap
	if needHelper {
		var err error
		if h.ports, err = launcher.StartPortHelper(h.target); err != nil {
			return err
		}
		h.closers = append(h.closers, func() { h.ports.Close() })
		if !c.noSplice {
			split := &portfwd.Split{Local: portfwd.NewBuiltin(ctx, h.ports), Tap: tap}
			if c.hostLoToNsLo {
				split.LocalAddr = loopback4
			}
			guest = split
		}
	}
	h.fwd = portfwd.New(guest, h.log)
	h.closers = append(h.closers, func() { h.fwd.Close() })
	if h.ports != nil {
		h.rev = portfwd.NewWithBinder(portfwd.NewHostLoopback(ctx), portfwd.NamespaceBinder{L: h.ports}, h.log)
		h.closers = append(h.closers, func() { h.rev.Close() })
	}
	for _, p := range []struct {
		proto string
		spec  portfwd.PortSpec
	}{{"tcp", c.tcp}, {"udp", c.udp}} {
		if p.spec.Mode != portfwd.PortsList {
			continue
		}
		for _, r := range p.spec.Rules(p.proto, h.net.guestAddr()) {
			if !r.HostAddr.IsValid() {
				r.HostAddr = h.wildcard()
			}
			if _, err := h.fwd.Add(r); err != nil {
				return err
			}
		}
	}
	for _, p := range []struct {
		proto string
		spec  portfwd.PortSpec
	}{{"tcp", c.tcpNS}, {"udp", c.udpNS}} {
		if p.spec.Mode != portfwd.PortsList {
			continue
		}
		for _, r := range p.spec.Ranges {
			for port := int(r.First); port <= int(r.Last); port++ {
				to := r.To + uint16(port-int(r.First))
				for _, rule := range h.nsRules(p.proto, r.Addr, uint16(port), to) {
					if _, err := h.rev.Add(rule); err != nil {
						return err
					}
				}
			}
		}
	}
	return h.startFollowers(ctx)
}

// wildcard is the address a listener without one binds: every address of
// the families in use (invalid: IPv4 and IPv6 on one socket).
func (h *pastaHelper) wildcard() netip.Addr {
	switch {
	case h.c.ipv4Only:
		return netip.IPv4Unspecified()
	case h.c.ipv6Only:
		return netip.IPv6Unspecified()
	}
	return netip.Addr{}
}

// nsRules are the listeners inside the namespace for one -T/-U port: on
// addr, or on the namespace's loopback (both families), each to the host's
// loopback of its family.
func (h *pastaHelper) nsRules(proto string, addr netip.Addr, port, to uint16) []portfwd.Rule {
	rule := func(a netip.Addr) portfwd.Rule {
		target := loopback4
		if a.Is6() {
			target = loopback6
		}
		return portfwd.Rule{Proto: proto, HostAddr: a, HostPort: port, GuestAddr: target, GuestPort: to}
	}
	if addr.IsValid() {
		return []portfwd.Rule{rule(addr)}
	}
	var out []portfwd.Rule
	if !h.c.ipv6Only {
		out = append(out, rule(loopback4))
	}
	if !h.c.ipv4Only && h.net.addr6.IsValid() {
		out = append(out, rule(loopback6))
	}
	return out
}

// startFollowers runs the auto modes: -t/-u auto watch the namespace's
// sockets, -T/-U auto the host's. Each leaves out the ports the other
// direction bound itself.
func (h *pastaHelper) startFollowers(ctx context.Context) error {
	c := h.c
	hostProc := func(name string) (*os.File, error) { return os.Open("/proc/self/net/" + name) }
	var followers []*portfwd.Follower
	for _, p := range []struct {
		proto string
		mode  portfwd.PortMode
		ns    bool
	}{{"tcp", c.tcp.Mode, true}, {"udp", c.udp.Mode, true}, {"tcp", c.tcpNS.Mode, false}, {"udp", c.udpNS.Mode, false}} {
		if p.mode != portfwd.PortsAuto {
			continue
		}
		open := hostProc
		if p.ns {
			open = h.ports.OpenProcNet
		}
		scan, err := portfwd.OpenProcNet(open, p.proto)
		if err != nil {
			return err
		}
		if p.ns {
			scan.Own = h.ownTCPPort
		}
		h.closers = append(h.closers, func() { scan.Close() })
		proto := p.proto
		f := &portfwd.Follower{Proto: proto, Scan: scan.Scan, Log: h.log}
		if p.ns {
			f.Map = h.fwd
			f.Skip = func(port uint16) bool { return h.rev.HasPort(proto, port) }
			f.Rules = func(port uint16) []portfwd.Rule {
				return []portfwd.Rule{{Proto: proto, HostAddr: h.wildcard(), HostPort: port, GuestAddr: h.net.guestAddr(), GuestPort: port}}
			}
		} else {
			f.Map = h.rev
			f.Skip = func(port uint16) bool { return h.fwd.HasPort(proto, port) }
			f.Rules = func(port uint16) []portfwd.Rule { return h.nsRules(proto, netip.Addr{}, port, port) }
		}
		followers = append(followers, f)
	}
	if len(followers) == 0 {
		return nil
	}
	stop, err := portfwd.RunFollowers(ctx, followers)
	if err != nil {
		return err
	}
	h.closers = append(h.closers, stop)
	return nil
}
