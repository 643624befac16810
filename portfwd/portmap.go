// Package portfwd publishes host ports into the guest: a PortMap of
// forwarding rules with their host listeners, and the slirp4netns-compatible
// JSON API that edits it at runtime.
package portfwd

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"sort"
	"sync"
)

// Rule is one published port.
type Rule struct {
	Proto    string // "tcp" or "udp"
	HostAddr netip.Addr
	// HostIface, if set, binds the listener to that interface.
	HostIface string
	HostPort  uint16
	GuestAddr netip.Addr
	GuestPort uint16
	// GuestAddr6, if valid, is where IPv6 clients go instead of
	// GuestAddr: the guest's own IPv6 address, so that the guest sees
	// them as they are (with a Guest that keeps client addresses).
	GuestAddr6 netip.Addr
}

func (r Rule) String() string {
	host := "*:" + fmt.Sprint(r.HostPort)
	if r.HostAddr.IsValid() {
		host = netip.AddrPortFrom(r.HostAddr, r.HostPort).String()
	}
	if r.HostIface != "" {
		host += "%" + r.HostIface
	}
	guest := netip.AddrPortFrom(r.GuestAddr, r.GuestPort).String()
	if r.GuestAddr6.IsValid() {
		guest += fmt.Sprintf(" (IPv6 clients: %s)", netip.AddrPortFrom(r.GuestAddr6, r.GuestPort))
	}
	return fmt.Sprintf("%s %s -> %s", r.Proto, host, guest)
}

// guestFor is where a flow from client goes, by the client's family.
func (r Rule) guestFor(client netip.Addr) netip.AddrPort {
	if r.GuestAddr6.IsValid() && client.Unmap().Is6() {
		return netip.AddrPortFrom(r.GuestAddr6, r.GuestPort)
	}
	return netip.AddrPortFrom(r.GuestAddr, r.GuestPort)
}

// Entry is a rule with the ID it was given.
type Entry struct {
	ID int
	Rule
}

// Guest is the way into the namespace that forwarded flows take.
type Guest interface {
	// ForwardTCP connects to guest and relays conn until done, or hands
	// both to a relay loop that does; it owns conn.
	ForwardTCP(conn *net.TCPConn, guest netip.AddrPort) error
	// DialGuestUDP opens a datagram flow to guest on behalf of client.
	DialGuestUDP(client, guest netip.AddrPort) (net.Conn, error)
}

// PortMap holds the published ports. Its methods are safe for concurrent use.
type PortMap struct {
	guest Guest
	bind  Binder
	log   *slog.Logger

	mu     sync.Mutex
	nextID int
	fwds   map[int]*forward
	closed bool
}

// New returns an empty PortMap delivering to guest.
func New(guest Guest, log *slog.Logger) *PortMap {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &PortMap{guest: guest, bind: hostBinder{}, log: log, nextID: 1, fwds: map[int]*forward{}}
}

// NewWithBinder returns an empty PortMap whose listeners bind opens (for
// example inside a namespace), delivering to guest.
func NewWithBinder(guest Guest, bind Binder, log *slog.Logger) *PortMap {
	m := New(guest, log)
	m.bind = bind
	return m
}

// ErrNotFound is returned by Remove for an unknown ID.
var ErrNotFound = errors.New("no such forward")

// Add starts listening for r and returns its ID. IDs start at 1 and are
// never reused.
func (m *PortMap) Add(r Rule) (int, error) {
	if r.Proto != "tcp" && r.Proto != "udp" {
		return 0, fmt.Errorf("publish %s: protocol must be tcp or udp", r)
	}
	if r.HostPort == 0 || r.GuestPort == 0 {
		return 0, fmt.Errorf("publish %s: ports must be 1-65535", r)
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.closed {
		return 0, net.ErrClosed
	}
	for _, f := range m.fwds {
		if f.rule.Proto == r.Proto && f.rule.HostPort == r.HostPort && overlaps(f.rule.HostAddr, r.HostAddr) {
			return 0, fmt.Errorf("publish %s: host port already published as %s", r, f.rule)
		}
	}
	f, err := startForward(r, m.guest, m.bind, m.log)
	if err != nil {
		return 0, err
	}
	id := m.nextID
	m.nextID++
	f.id = id
	m.fwds[id] = f
	m.log.Debug("port published", "id", id, "rule", r.String())
	return id, nil
}

// overlaps reports whether listeners on host addresses a and b (of one
// protocol and port) would take the same connections: the same address, or
// a wildcard and an address of its family. 0.0.0.0 and :: do not overlap
// (an IPv6 listener is IPv6-only, as Docker's -p 0.0.0.0:80:80 -p [::]:80:80
// needs); no address (one dual-stack socket) overlaps everything.
func overlaps(a, b netip.Addr) bool {
	a, b = a.Unmap(), b.Unmap()
	switch {
	case !a.IsValid() || !b.IsValid():
		return true
	case a.Is4() != b.Is4():
		return false
	}
	return a == b || a.IsUnspecified() || b.IsUnspecified()
}

// Remove stops listening for the rule with this ID. Connections already
// forwarded keep running until they end.
func (m *PortMap) Remove(id int) error {
	m.mu.Lock()
	f, ok := m.fwds[id]
	delete(m.fwds, id)
	m.mu.Unlock()
	if !ok {
		return ErrNotFound
	}
	f.stop()
	return nil
}

// List returns the rules in ID order.
func (m *PortMap) List() []Entry {
	m.mu.Lock()
	defer m.mu.Unlock()
	out := make([]Entry, 0, len(m.fwds))
	for id, f := range m.fwds {
		out = append(out, Entry{ID: id, Rule: f.rule})
	}
	sort.Slice(out, func(i, j int) bool { return out[i].ID < out[j].ID })
	return out
}

// Close stops every listener and waits for the forwarding goroutines.
// Flows in progress end when the Guest behind them shuts down.
func (m *PortMap) Close() error {
	m.mu.Lock()
	m.closed = true
	fwds := m.fwds
	m.fwds = map[int]*forward{}
	m.mu.Unlock()
	for _, f := range fwds {
		f.stop()
	}
	return nil
}

// HasPort reports whether a rule listens on port for proto.
func (m *PortMap) HasPort(proto string, port uint16) bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	for _, f := range m.fwds {
		if f.rule.Proto == proto && f.rule.HostPort == port {
			return true
		}
	}
	return false
}
