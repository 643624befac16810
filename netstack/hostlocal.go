package netstack

import (
	"errors"
	"net"
	"net/netip"
	"sync"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// hostLocal answers "would the host's kernel deliver a packet to this
// address to the host itself?", which --disable-host-loopback must refuse.
//
// A list of interface addresses is not the answer: `ip route add local
// 203.0.113.0/24 dev lo` makes the whole range the host's (AnyIP), and so
// do the kernel's own broadcast routes. The kernel's route lookup
// (RTM_GETROUTE over a netlink route socket, which also works from a
// sandboxed helper without capabilities) is: a route of type local,
// broadcast or anycast ends on this host.
//
// Lookups are cached for a short time: the guard asks once per new flow.
type hostLocal struct {
	mu      sync.Mutex
	entries map[netip.Addr]hostLocalEntry
	// lookup is the kernel's answer; tests replace it.
	lookup func(netip.Addr) (bool, error)
}

type hostLocalEntry struct {
	local bool
	at    time.Time
}

const (
	// hostLocalTTL bounds how long a route change may go unnoticed.
	hostLocalTTL = time.Second
	// hostLocalMax bounds the cache; a full cache starts over.
	hostLocalMax = 4096
)

// is reports whether a is delivered locally. When the kernel cannot be
// asked it says yes: refusing a flow is the safe mistake.
func (h *hostLocal) is(a netip.Addr) bool {
	now := time.Now()
	h.mu.Lock()
	if e, ok := h.entries[a]; ok && now.Sub(e.at) < hostLocalTTL {
		h.mu.Unlock()
		return e.local
	}
	lookup := h.lookup
	h.mu.Unlock()
	if lookup == nil {
		lookup = routeIsLocal
	}
	local, err := lookup(a)
	if err != nil {
		return true
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.entries == nil || len(h.entries) >= hostLocalMax {
		h.entries = make(map[netip.Addr]hostLocalEntry)
	}
	h.entries[a] = hostLocalEntry{local: local, at: now}
	return local
}

// routeIsLocal asks the kernel how it routes a.
func routeIsLocal(a netip.Addr) (bool, error) {
	routes, err := netlink.RouteGet(net.IP(a.AsSlice()))
	if err != nil {
		// Unreachable, prohibited and blackholed destinations: a dial
		// fails there, nothing on the host is reached.
		for _, e := range []error{unix.ENETUNREACH, unix.EHOSTUNREACH, unix.EACCES, unix.EINVAL} {
			if errors.Is(err, e) {
				return false, nil
			}
		}
		return false, err
	}
	for _, r := range routes {
		switch r.Type {
		case unix.RTN_LOCAL, unix.RTN_BROADCAST, unix.RTN_ANYCAST:
			return true, nil
		}
	}
	return false, nil
}
