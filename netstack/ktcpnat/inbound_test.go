package ktcpnat

import (
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
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

// A marked socket bound to the guest's address and connected to a client's
// address ends at the guest's server, which sees the client's address and
// port; every byte arrives intact both ways and none crosses the TAP. A
// port nobody listens on refuses at once, and ForgetInbound empties the
// set.
func TestInboundSwapsAddresses(t *testing.T) {
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
		m, err := Dial()
		if err != nil {
			t.Error(err)
			return
		}
		defer m.Close()
		ln, err := net.ListenTCP("tcp4", &net.TCPAddr{IP: guest.AsSlice()})
		if err != nil {
			t.Error(err)
			return
		}
		defer ln.Close()
		server := ln.Addr().(*net.TCPAddr).AddrPort()
		client := netip.MustParseAddrPort("203.0.113.7:41999")
		l, err := netlink.LinkByName("tap0")
		if err != nil {
			t.Error(err)
			return
		}
		tapBefore := l.Attrs().Statistics.TxBytes

		c, s, ok := connectThroughSwap(t, ln, client)
		if !ok {
			return
		}
		defer c.Close()
		defer s.Close()
		payload := make([]byte, 2<<20)
		for i := range payload {
			payload[i] = byte(rand.Uint32())
		}
		deadline := time.Now().Add(10 * time.Second)
		c.SetDeadline(deadline)
		s.SetDeadline(deadline)
		for _, dir := range []struct {
			name     string
			src, dst *net.TCPConn
		}{{"ours -> server", c, s}, {"server -> ours", s, c}} {
			go func() {
				dir.src.Write(payload)
				dir.src.CloseWrite()
			}()
			got, err := io.ReadAll(dir.dst)
			if err != nil || sha256.Sum256(got) != sha256.Sum256(payload) {
				t.Errorf("%s: %d of %d bytes, err %v", dir.name, len(got), len(payload), err)
			}
		}
		if l, err = netlink.LinkByName("tap0"); err == nil {
			if sent := l.Attrs().Statistics.TxBytes - tapBefore; sent > 0 {
				t.Errorf("%d bytes crossed the TAP", sent)
			}
		}

		closed := netip.AddrPortFrom(client.Addr(), 1)
		start := time.Now()
		_, err = dialMarked(netip.AddrPortFrom(guest, client.Port()+1), closed)
		if !errors.Is(err, unix.ECONNREFUSED) {
			t.Errorf("dial a port nobody listens on: %v, want ECONNREFUSED", err)
		} else if d := time.Since(start); d > time.Second {
			t.Errorf("the refusal took %v", d)
		}

		keys := []InboundKey{
			{Server: server, Client: client},
			{Server: netip.AddrPortFrom(guest, 1), Client: netip.AddrPortFrom(client.Addr(), client.Port()+1)},
			// Gone already: no error, and the others still go.
			{Server: netip.AddrPortFrom(guest, 2), Client: client},
		}
		if n := inboundElements(t); n != 2 {
			t.Errorf("%d keys in the set, want 2", n)
		}
		if err := m.ForgetInbound(keys); err != nil {
			t.Errorf("forget: %v", err)
		}
		if n := inboundElements(t); n != 0 {
			t.Errorf("%d keys left in the set after ForgetInbound", n)
		}
		if !InboundReady(guest) {
			t.Error("the rules are gone after ForgetInbound")
		}
	})
}

// connectThroughSwap connects a marked socket, bound to ln's address and
// client's port, to client's address at ln's port, and returns it with the
// connection ln accepted, which must come from client.
func connectThroughSwap(t *testing.T, ln *net.TCPListener, client netip.AddrPort) (c, s *net.TCPConn, ok bool) {
	t.Helper()
	server := ln.Addr().(*net.TCPAddr).AddrPort()
	accepted := make(chan *net.TCPConn, 1)
	go func() {
		c, err := ln.AcceptTCP()
		if err == nil {
			accepted <- c
		}
		close(accepted)
	}()
	c, err := dialMarked(netip.AddrPortFrom(server.Addr(), client.Port()), netip.AddrPortFrom(client.Addr(), server.Port()))
	if err != nil {
		t.Errorf("dial the server through the swap: %v", err)
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

// dialMarked connects from a marked socket bound to from, as launcher's
// port helper does.
func dialMarked(from, to netip.AddrPort) (*net.TCPConn, error) {
	d := net.Dialer{
		LocalAddr: net.TCPAddrFromAddrPort(from),
		Timeout:   3 * time.Second,
		Control: func(_, _ string, rc syscall.RawConn) error {
			var err error
			cerr := rc.Control(func(fd uintptr) {
				err = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_MARK, InboundMark)
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

func inboundElements(t *testing.T) int {
	t.Helper()
	c, err := nftables.New()
	if err != nil {
		t.Error(err)
		return -1
	}
	defer c.CloseLasting()
	set, err := c.GetSetByName(&nftables.Table{Family: nftables.TableFamilyIPv4, Name: tableName}, inboundSet)
	if err != nil {
		t.Error(err)
		return -1
	}
	es, err := c.GetSetElements(set)
	if err != nil {
		t.Error(err)
		return -1
	}
	return len(es)
}

// InboundReady wants the rules, not only the set; GuestNAT sees a
// destination NAT chain of the guest's own.
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
		c, err := nftables.New()
		if err != nil {
			t.Error(err)
			return
		}
		defer c.CloseLasting()
		c.FlushTable(&nftables.Table{Family: nftables.TableFamilyIPv4, Name: tableName})
		nat := c.AddTable(&nftables.Table{Family: nftables.TableFamilyINet, Name: "guest"})
		c.AddChain(&nftables.Chain{Table: nat, Name: "pre", Type: nftables.ChainTypeNAT,
			Hooknum: nftables.ChainHookPrerouting, Priority: nftables.ChainPriorityNATDest})
		if err := c.Flush(); err != nil {
			t.Error(err)
			return
		}
		if InboundReady(guest) || !GuestNAT() {
			t.Errorf("after a flush and a NAT chain: ready %v, guest NAT %v; want false, true", InboundReady(guest), GuestNAT())
		}
	})
}

// The IPv6 rules do the same for IPv6 connections.
func TestInboundSwapsAddressesIPv6(t *testing.T) {
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
		c, s, ok := connectThroughSwap(t, ln, client)
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
