package ktcpnat

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// Flow is one translated connection: the guest's socket Guest connected to
// Remote, and the connection ends at Listener, which sees it come from
// Fake. Its segments from Guest to Remote leave as from Fake to Listener
// (the out map), and the listener's, from Listener to Fake, as from Remote
// to Guest (the back map).
type Flow struct {
	Guest, Remote, Fake, Listener netip.AddrPort
}

// Parts names a Flow's entries.
type Parts uint8

const (
	Out Parts = 1 << iota
	Back
	Both = Out | Back
)

// ErrUnsupported: a Flow's addresses are not all of one family.
var ErrUnsupported = errors.New("ktcpnat: a flow's addresses must all be IPv4 or all IPv6")

// Table is the maps' entries as the helper changes them: a Map, or a
// Client of a broker that holds one. Safe for concurrent use.
type Table interface {
	// Add puts both of f's entries in, in one transaction: both or
	// neither (unix.EEXIST: an entry with one of f's keys is there).
	Add(f Flow) error
	// Remove takes f's entries named by p out, and the namespace's
	// conntrack entries of the connections they name (see Map.Remove);
	// ones not there are no error.
	Remove(f Flow, p Parts) error
	Close() error
}

func (f Flow) valid() bool {
	is4 := f.Guest.Addr().Is4()
	for _, a := range []netip.AddrPort{f.Guest, f.Remote, f.Fake, f.Listener} {
		if !a.IsValid() || a.Addr().Is4() != is4 || a.Addr().Is4In6() {
			return false
		}
	}
	return true
}

// entry is one element of a map (with its value) or of localSet.
type entry struct {
	set        string
	key, value []byte
}

// entries lists f's map entries named by p, and for removal the Back
// part's element of localSet (which the rules add).
func (f Flow) entries(p Parts, removal bool) []entry {
	var es []entry
	if p&Out != 0 {
		es = append(es, entry{outMap, key(f.Guest, f.Remote), key(f.Fake, f.Listener)})
	}
	if p&Back != 0 {
		es = append(es, entry{backMap, key(f.Listener, f.Fake), key(f.Remote, f.Guest)})
		if removal {
			es = append(es, entry{set: localSet, key: key(f.Listener, f.Fake)})
		}
	}
	return es
}

// key lays out a segment's addresses as the rules load them: each field in
// 32-bit registers of its own, ports zero-padded.
func key(src, dst netip.AddrPort) []byte {
	b := make([]byte, 0, familyOf(src.Addr()).keyLen())
	b = append(b, src.Addr().AsSlice()...)
	b = binary.BigEndian.AppendUint16(b, src.Port())
	b = append(b, 0, 0)
	b = append(b, dst.Addr().AsSlice()...)
	b = binary.BigEndian.AppendUint16(b, dst.Port())
	return append(b, 0, 0)
}

// Open makes a Table of sock: the netlink socket Install returned (a Map),
// or a connection to a broker (a Client; see Serve). It takes ownership of
// sock.
func Open(sock *os.File) (Table, error) {
	domain, err := unix.GetsockoptInt(int(sock.Fd()), unix.SOL_SOCKET, unix.SO_DOMAIN)
	if err != nil {
		sock.Close()
		return nil, fmt.Errorf("ktcpnat: %w", err)
	}
	switch domain {
	case unix.AF_NETLINK:
		return NewMap(sock), nil
	case unix.AF_UNIX:
		// A broker that hangs must not hang a flow.
		tv := unix.NsecToTimeval(2 * time.Second.Nanoseconds())
		if err := unix.SetsockoptTimeval(int(sock.Fd()), unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv); err != nil {
			sock.Close()
			return nil, fmt.Errorf("ktcpnat: %w", err)
		}
		return &Client{newGuardedSocket(sock)}, nil
	}
	sock.Close()
	return nil, fmt.Errorf("ktcpnat: a socket of family %d is neither netlink nor a broker's", domain)
}

// guardedSocket is a socket for one request at a time (mu), closed once.
type guardedSocket struct {
	mu     sync.Mutex
	closed bool
	f      *os.File
	fd     int
}

func newGuardedSocket(f *os.File) guardedSocket { return guardedSocket{f: f, fd: int(f.Fd())} }

// Close closes the socket (a Map's tables stay: they end with the
// namespace).
func (g *guardedSocket) Close() error {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.closeLocked()
}

func (g *guardedSocket) closeLocked() error {
	if g.closed {
		return nil
	}
	g.closed = true
	return g.f.Close()
}

// Map changes the maps' entries over the socket Install returned.
type Map struct {
	guardedSocket
	seq uint32
	buf []byte
}

// NewMap takes ownership of sock.
func NewMap(sock *os.File) *Map {
	return &Map{guardedSocket: newGuardedSocket(sock), buf: make([]byte, 4096)}
}

func (m *Map) Add(f Flow) error {
	if !f.valid() {
		return ErrUnsupported
	}
	return m.transaction(f.nfproto(), unix.NFT_MSG_NEWSETELEM, unix.NLM_F_CREATE|unix.NLM_F_EXCL, f.entries(Both, false))
}

// Remove also drops the conntrack entries the namespace made for the
// flow's two connections while their segments crossed the TAP (Fake's to
// the listener, for Back; the guest's to Remote, for Both): once
// translated, the rules kept their segments out of conntrack, which would
// have held the entries, ESTABLISHED, for days.
func (m *Map) Remove(f Flow, p Parts) error {
	if !f.valid() {
		return ErrUnsupported
	}
	// One transaction per entry: in one, an entry that is gone would
	// keep the others from going.
	var errs []error
	for _, e := range f.entries(p, true) {
		if err := m.transaction(f.nfproto(), unix.NFT_MSG_DELSETELEM, 0, []entry{e}); err != nil && !errors.Is(err, unix.ENOENT) {
			errs = append(errs, err)
		}
	}
	if p == Both {
		// (Out alone: a new connection on the guest's addresses took
		// them over; the entry may be its own.)
		m.forgetConnection(f.Guest, f.Remote)
	}
	if p&Back != 0 {
		m.forgetConnection(f.Fake, f.Listener)
	}
	return errors.Join(errs...)
}

// forgetConnection drops the conntrack entry of the TCP connection from
// src to dst, if the namespace tracks one (best effort: without conntrack
// in use there is none).
func (m *Map) forgetConnection(src, dst netip.AddrPort) {
	_ = m.exchange(func(seq uint32) ([]byte, uint32, int, error) {
		msg, err := conntrackDelete(seq, src, dst)
		return msg, seq, 1, err
	})
}

func (f Flow) nfproto() uint8 { return familyOf(f.Guest.Addr()).nfproto }

// transaction changes es in one batch: a begin, a message per entry, an
// end, the entries' messages acknowledged.
func (m *Map) transaction(nfproto uint8, msgType, flags uint16, es []entry) error {
	return m.exchange(func(first uint32) ([]byte, uint32, int, error) {
		msg, last, err := batch(first, nfproto, msgType, flags, es)
		return msg, last, len(es), err
	})
}

// exchange sends what build encodes, its messages numbered from first to
// last of which acks ask for an answer, and waits for the answers: one
// request on the socket at a time.
func (m *Map) exchange(build func(first uint32) (msg []byte, last uint32, acks int, err error)) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.closed {
		return os.ErrClosed
	}
	first := m.seq + 1
	msg, last, acks, err := build(first)
	if err != nil {
		return err
	}
	m.seq = last
	return m.roundTrip(msg, first, last, acks)
}

// roundTrip sends messages numbered first to last and reads the kernel's
// answers until acks of them are in: acknowledgements or errors (a batch
// answers every message that asks, once the whole batch was processed, a
// refused one for its first message). It returns the first error. Answers
// to an earlier exchange that gave up are skipped. The kernel handles
// netlink requests within the send, so the answers are there when it
// returns; the socket's receive timeout (Install) covers the rest.
func (m *Map) roundTrip(msg []byte, first, last uint32, acks int) error {
	if err := unix.Sendto(m.fd, msg, 0, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		return fmt.Errorf("nftables: send: %w", err)
	}
	var firstErr error
	for acks > 0 {
		n, _, err := unix.Recvfrom(m.fd, m.buf, 0)
		if err != nil {
			return errors.Join(firstErr, fmt.Errorf("nftables: receive: %w", err))
		}
		for b := m.buf[:n]; len(b) >= unix.NLMSG_HDRLEN; {
			l := int(binary.NativeEndian.Uint32(b))
			if l < unix.NLMSG_HDRLEN || l > len(b) {
				break
			}
			typ, seq := binary.NativeEndian.Uint16(b[4:]), binary.NativeEndian.Uint32(b[8:])
			if typ == unix.NLMSG_ERROR && seq >= first && seq <= last && l >= unix.NLMSG_HDRLEN+4 {
				if errno := -int32(binary.NativeEndian.Uint32(b[unix.NLMSG_HDRLEN:])); errno != 0 && firstErr == nil {
					firstErr = fmt.Errorf("nftables: %w", unix.Errno(errno))
				}
				acks--
			}
			b = b[nlmAlign(l):]
		}
	}
	return firstErr
}

func nlmAlign(n int) int { return (n + unix.NLMSG_ALIGNTO - 1) &^ (unix.NLMSG_ALIGNTO - 1) }
