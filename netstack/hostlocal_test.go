package netstack

import (
	"errors"
	"net"
	"net/netip"
	"testing"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/netns-run/netns-run/tap/taptest"
)

func TestRouteIsLocal(t *testing.T) {
	for addr, want := range map[string]bool{"127.0.0.1": true, "127.3.4.5": true, "0.0.0.0": true, "198.51.100.1": false} {
		if got, err := routeIsLocal(netip.MustParseAddr(addr)); err != nil || got != want {
			t.Errorf("routeIsLocal(%s) = %v, %v; want %v", addr, got, err, want)
		}
	}
}

// TestLocalRouteIsHost is the regression test for the bypass of
// --disable-host-loopback through a local route: in a fresh network
// namespace, 203.0.113.0/24 routed `local` is the host's although no
// interface has such an address.
func TestLocalRouteIsHost(t *testing.T) {
	taptest.InFreshNetns(t, func() {
		lo, err := netlink.LinkByName("lo")
		if err == nil {
			err = netlink.LinkSetUp(lo)
		}
		if err != nil {
			t.Errorf("lo: %v", err)
			return
		}
		addr := netip.MustParseAddr("203.0.113.7")
		if local, err := routeIsLocal(addr); err != nil || local {
			t.Errorf("before the route: local %v, %v", local, err)
		}
		route := &netlink.Route{LinkIndex: lo.Attrs().Index, Dst: &net.IPNet{IP: net.IP{203, 0, 113, 0}, Mask: net.CIDRMask(24, 32)},
			Type: unix.RTN_LOCAL, Table: unix.RT_TABLE_LOCAL, Scope: netlink.SCOPE_HOST}
		if err := netlink.RouteAdd(route); err != nil {
			t.Errorf("add local route: %v", err)
			return
		}
		if local, err := routeIsLocal(addr); err != nil || !local {
			t.Errorf("with `local 203.0.113.0/24 dev lo`: local %v, %v; want true", local, err)
		}
	})
}

func TestHostLocalCache(t *testing.T) {
	calls := 0
	var answer error
	h := &hostLocal{lookup: func(netip.Addr) (bool, error) { calls++; return false, answer }}
	a := netip.MustParseAddr("198.51.100.9")
	first, second := h.is(a), h.is(a)
	if first || second || calls != 1 {
		t.Fatalf("cached answer: %v, %v after %d lookups", first, second, calls)
	}
	answer = errors.New("netlink unavailable")
	if !h.is(netip.MustParseAddr("198.51.100.10")) {
		t.Errorf("a failed lookup must refuse the flow")
	}
}
