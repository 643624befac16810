package ktcpnat

import (
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"syscall"
	"testing"
	"time"

	"github.com/google/nftables"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// A marked, transparent socket bound to a client's address and connected
// to the guest's server ends there; the server sees the client's address
// and port, every byte arrives intact both ways and none crosses the TAP.
// A port nobody listens on refuses at once.
func TestInboundKeepsClientAddress(t *testing.T) {
	inFreshNetns(t, func(skip func(string)) {
		// No IPv6 on the TAP: its router solicitations would count as
		// bytes that crossed it.
		if err := os.WriteFile("/proc/sys/net/ipv6/conf/default/disable_ipv6", []byte("1"), 0); err != nil && !errors.Is(err, os.ErrNotExist) {
			t.Error(err)
			return
		}
		dev, guest, ok := setUpGuest(t)
		if !ok {
			return
		}
		defer dev.Close()
		sock, err := Install("tap0")
		if err != nil {
			skip(fmt.Sprintf("nftables unusable here: %v", err))
			return
		}
		sock.Close()
		if !InboundReady(guest) {
			t.Error("InboundReady says no after Install")
			return
		}
		ln, err := net.ListenTCP("tcp4", &net.TCPAddr{IP: guest.AsSlice()})
		if err != nil {
			t.Error(err)
			return
		}
		defer ln.Close()
		client := netip.MustParseAddrPort("203.0.113.7:41999")
		sentBefore := tapSent(t)
		c, s, ok := connectAsClient(t, ln, client)
		if !ok {
			return
		}
		defer c.Close()
		defer s.Close()
		checkBothWays(t, c, s, 2<<20, 2<<20)
		if sent := tapSent(t) - sentBefore; sent > 0 {
			t.Errorf("%d bytes crossed the TAP", sent)
		}

		start := time.Now()
		_, err = dialMarked(netip.AddrPortFrom(client.Addr(), client.Port()+1), netip.AddrPortFrom(guest, 1))
		if !errors.Is(err, unix.ECONNREFUSED) {
			t.Errorf("dial a port nobody listens on: %v, want ECONNREFUSED", err)
		} else if d := time.Since(start); d > time.Second {
			t.Errorf("the refusal took %v", d)
		}
	})
}

// connectAsClient connects a marked socket, bound to client, to ln's
// address, and returns it with the connection ln accepted, which must come
// from client.
func connectAsClient(t *testing.T, ln *net.TCPListener, client netip.AddrPort) (c, s *net.TCPConn, ok bool) {
	t.Helper()
	server := ln.Addr().(*net.TCPAddr).AddrPort()
	accepted := acceptOne(ln)
	c, err := dialMarked(client, server)
	if err != nil {
		t.Errorf("dial the server as the client: %v", err)
		return nil, nil, false
	}
	s, ok = <-accepted
	if !ok {
		c.Close()
		t.Error("the server accepted nothing")
		return nil, nil, false
	}
	if got := s.RemoteAddr().(*net.TCPAddr).AddrPort(); got != client {
		t.Errorf("the server sees %v, want %v", got, client)
	}
	return c, s, true
}

// dialMarked connects from a marked, transparent socket bound to from, as
// launcher's port helper's are.
func dialMarked(from, to netip.AddrPort) (*net.TCPConn, error) {
	d := net.Dialer{
		LocalAddr: net.TCPAddrFromAddrPort(from),
		Timeout:   3 * time.Second,
		Control: func(_, _ string, rc syscall.RawConn) error {
			var err error
			cerr := rc.Control(func(fd uintptr) {
				level, name := unix.SOL_IP, unix.IP_TRANSPARENT
				if from.Addr().Is6() {
					level, name = unix.SOL_IPV6, unix.IPV6_TRANSPARENT
				}
				err = errors.Join(unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_MARK, InboundMark),
					unix.SetsockoptInt(int(fd), level, name, 1))
			})
			return errors.Join(cerr, err)
		},
	}
	c, err := d.Dial("tcp", to.String())
	if err != nil {
		return nil, err
	}
	return c.(*net.TCPConn), nil
}

// InboundReady wants the routing rule and the kernel settings Install
// made; GuestNAT sees a destination NAT chain of the guest's own.
func TestInboundReadyAndGuestNAT(t *testing.T) {
	inFreshNetns(t, func(skip func(string)) {
		guest := netip.MustParseAddr("10.0.2.100")
		if InboundReady(guest) {
			t.Error("InboundReady before Install")
		}
		sock, err := Install("tap0")
		if err != nil {
			skip(fmt.Sprintf("nftables unusable here: %v", err))
			return
		}
		sock.Close()
		if !InboundReady(guest) || GuestNAT() {
			t.Errorf("after Install: ready %v, guest NAT %v; want true, false", InboundReady(guest), GuestNAT())
		}
		if err := netlink.RuleDel(inboundRule(netlink.FAMILY_V4)); err != nil {
			t.Error(err)
			return
		}
		if InboundReady(guest) {
			t.Error("InboundReady without the routing rule")
		}
		if err := installInbound(); err != nil {
			t.Error(err)
			return
		}
		if err := os.WriteFile("/proc/sys/net/ipv4/fwmark_reflect", []byte("0"), 0); err != nil {
			t.Error(err)
			return
		}
		if InboundReady(guest) {
			t.Error("InboundReady without fwmark_reflect")
		}
		c, err := nftables.New()
		if err != nil {
			t.Error(err)
			return
		}
		defer c.CloseLasting()
		for _, hook := range []struct {
			name string
			num  *nftables.ChainHook
		}{{"output", nftables.ChainHookOutput}, {"prerouting", nftables.ChainHookPrerouting}} {
			nat := c.AddTable(&nftables.Table{Family: nftables.TableFamilyINet, Name: "guest"})
			c.AddChain(&nftables.Chain{Table: nat, Name: hook.name, Type: nftables.ChainTypeNAT,
				Hooknum: hook.num, Priority: nftables.ChainPriorityNATDest})
			if err := c.Flush(); err != nil {
				t.Error(err)
				return
			}
			if !GuestNAT() {
				t.Errorf("GuestNAT does not see the guest's NAT chain on the %s hook", hook.name)
			}
			c.DelTable(nat)
			if err := c.Flush(); err != nil {
				t.Error(err)
				return
			}
			if GuestNAT() {
				t.Error("GuestNAT sees a NAT chain after the guest removed it")
			}
		}
	})
}

// The IPv6 routes do the same for IPv6 connections.
func TestInboundKeepsClientAddressIPv6(t *testing.T) {
	inFreshNetns(t, func(skip func(string)) {
		dev, _, ok := setUpGuest(t)
		if !ok {
			return
		}
		defer dev.Close()
		guest := netip.MustParseAddr("fd00::100")
		client := netip.MustParseAddrPort("[2001:db8::7]:42999")
		l, err := netlink.LinkByName("tap0")
		if err == nil {
			err = netlink.AddrAdd(l, &netlink.Addr{IPNet: &net.IPNet{IP: guest.AsSlice(), Mask: net.CIDRMask(64, 128)}, Flags: unix.IFA_F_NODAD})
		}
		if err == nil {
			_, dst, _ := net.ParseCIDR("2001:db8::/32")
			err = netlink.RouteAdd(&netlink.Route{LinkIndex: l.Attrs().Index, Dst: dst})
		}
		if err == nil {
			err = netlink.NeighAdd(&netlink.Neigh{LinkIndex: l.Attrs().Index, Family: netlink.FAMILY_V6,
				State: netlink.NUD_PERMANENT, IP: client.Addr().AsSlice(), HardwareAddr: remoteMAC})
		}
		if err != nil {
			t.Errorf("set up IPv6: %v", err)
			return
		}
		sock, err := Install("tap0")
		if err != nil {
			skip(fmt.Sprintf("nftables unusable here: %v", err))
			return
		}
		sock.Close()
		if !InboundReady(guest) {
			skip("no IPv6 tables in this kernel")
			return
		}
		ln, err := net.ListenTCP("tcp6", &net.TCPAddr{IP: guest.AsSlice()})
		if err != nil {
			t.Error(err)
			return
		}
		defer ln.Close()
		c, s, ok := connectAsClient(t, ln, client)
		if !ok {
			return
		}
		defer c.Close()
		defer s.Close()
		c.SetDeadline(time.Now().Add(5 * time.Second))
		s.SetDeadline(time.Now().Add(5 * time.Second))
		if _, err := s.Write([]byte("pong")); err != nil {
			t.Error(err)
		}
		buf := make([]byte, 4)
		if _, err := io.ReadFull(c, buf); err != nil || string(buf) != "pong" {
			t.Errorf("server -> ours: %q, %v", buf, err)
		}
	})
}
