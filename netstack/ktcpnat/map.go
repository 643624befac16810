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

// Rewrite is one direction of a flow: segments from From.src to From.dst
// leave as from To.src to To.dst.
type Rewrite struct {
	From, To Tuple
}

// Tuple is a segment's source and destination.
type Tuple struct {
	Src, Dst netip.AddrPort
}

// ErrUnsupported: the map holds IPv4 flows only.
var ErrUnsupported = errors.New("ktcpnat: IPv4 only")

// Table is the map's entries as the helper changes them: a Map, or a
// Client of a broker that holds one. Safe for concurrent use.
type Table interface {
	// Add puts rewrites in the map, all or none.
	Add(rw ...Rewrite) error
	// Remove takes rewrites out of the map; ones not there are no
	// error.
	Remove(rw ...Rewrite) error
	Close() error
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
		return &Client{f: sock, fd: int(sock.Fd())}, nil
	}
	sock.Close()
	return nil, fmt.Errorf("ktcpnat: a socket of family %d is neither netlink nor a broker's", domain)
}

// Map adds and removes entries of the table's map, over the socket Install
// returned.
type Map struct {
	mu     sync.Mutex
	closed bool
	f      *os.File
	fd     int
	seq    uint32
	buf    []byte
}

// NewMap takes ownership of sock.
func NewMap(sock *os.File) *Map {
	return &Map{f: sock, fd: int(sock.Fd()), buf: make([]byte, 4096)}
}

// Close closes the socket; the table stays (it ends with the namespace).
func (m *Map) Close() error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.closed {
		return nil
	}
	m.closed = true
	return m.f.Close()
}

func (m *Map) Add(rw ...Rewrite) error {
	return m.change(unix.NFT_MSG_NEWSETELEM, unix.NLM_F_CREATE|unix.NLM_F_EXCL, rw)
}

func (m *Map) Remove(rw ...Rewrite) error {
	err := m.change(unix.NFT_MSG_DELSETELEM, 0, rw)
	if errors.Is(err, unix.ENOENT) {
		return nil
	}
	return err
}

func (m *Map) change(msgType, flags uint16, rw []Rewrite) error {
	add := msgType == unix.NFT_MSG_NEWSETELEM
	for _, r := range rw {
		if !r.From.is4() || add && !r.To.is4() {
			return ErrUnsupported
		}
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.closed {
		return os.ErrClosed
	}
	seq := m.seq + 1
	m.seq += 3 // the batch's begin, its message, its end
	msg, err := batch(seq, msgType, flags, rw, add)
	if err != nil {
		return err
	}
	return m.roundTrip(msg, seq+1)
}

// roundTrip sends a batch and reads the kernel's answer: an error for any
// of its three messages (numbered from seq-1; a refused batch is answered
// for its first), or the acknowledgement of the one in the middle. The
// kernel runs a batch within the send, so the answer is there when it
// returns; the socket's receive timeout (Install) covers the rest.
func (m *Map) roundTrip(msg []byte, seq uint32) error {
	if err := unix.Sendto(m.fd, msg, 0, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		return fmt.Errorf("nftables: send: %w", err)
	}
	for range 8 {
		n, _, err := unix.Recvfrom(m.fd, m.buf, 0)
		if err != nil {
			return fmt.Errorf("nftables: receive: %w", err)
		}
		for b := m.buf[:n]; len(b) >= unix.NLMSG_HDRLEN; {
			l := int(binary.NativeEndian.Uint32(b))
			if l < unix.NLMSG_HDRLEN || l > len(b) {
				break
			}
			typ, got := binary.NativeEndian.Uint16(b[4:]), binary.NativeEndian.Uint32(b[8:])
			if typ == unix.NLMSG_ERROR && got+1 >= seq && got <= seq+1 && l >= unix.NLMSG_HDRLEN+4 {
				errno := -int32(binary.NativeEndian.Uint32(b[unix.NLMSG_HDRLEN:]))
				if errno != 0 {
					return fmt.Errorf("nftables: %w", unix.Errno(errno))
				}
				if got == seq {
					return nil
				}
			}
			b = b[nlmAlign(l):]
		}
	}
	return errors.New("nftables: no answer")
}

func (t Tuple) is4() bool { return t.Src.Addr().Is4() && t.Dst.Addr().Is4() }

// key lays a tuple out as the rule loads it: each field in its own 32-bit
// register, ports zero-padded.
func (t Tuple) key() []byte {
	b := make([]byte, 16)
	s, d := t.Src.Addr().As4(), t.Dst.Addr().As4()
	copy(b[0:], s[:])
	binary.BigEndian.PutUint16(b[4:], t.Src.Port())
	copy(b[8:], d[:])
	binary.BigEndian.PutUint16(b[12:], t.Dst.Port())
	return b
}

func nlmAlign(n int) int { return (n + unix.NLMSG_ALIGNTO - 1) &^ (unix.NLMSG_ALIGNTO - 1) }
