package ktcpnat

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"os"

	"golang.org/x/sys/unix"
)

// A sandboxed helper holds no capability in the guest's user namespace,
// which the kernel asks for with every change to the guest's nftables. A
// broker outside the sandbox (netns-run's parent process, or a small
// process usernet starts before it enters its sandbox) holds the netlink
// socket and applies the sandbox's changes, which can only be entries of
// this one map: the requests carry nothing else.
//
// A request is one datagram on a SOCK_SEQPACKET pair: an op byte, a
// Parts byte (Both to add), a family byte (4 or 6) and the Flow's four
// addresses and ports (16 bytes, IPv4 ones mapped, and 2: Guest, Remote,
// Fake, Listener). The answer is a 4-byte errno, 0 for success.

const (
	opAdd    = 1
	opRemove = 2

	requestLen = 3 + 4*18
)

var errBadRequest = errors.New("ktcpnat: malformed request")

// Serve applies conn's requests to t until conn ends (its peer closed it,
// or it was closed here); it closes neither. It refuses flows that do not
// end at the listener's port on the guest's own address, or whose fake
// address is not the remote one (the rules themselves only take segments
// routed out of the TAP).
func Serve(conn *os.File, t Table, listenerPort uint16) error {
	fd := int(conn.Fd())
	buf := make([]byte, requestLen+1)
	for {
		n, err := unix.Read(fd, buf)
		if errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil || n == 0 {
			return err
		}
		var errno unix.Errno
		op, f, p, err := parseRequest(buf[:n])
		switch {
		case err != nil || !plausible(f, listenerPort):
			errno = unix.EINVAL
		case op == opAdd:
			err = t.Add(f)
		default:
			err = t.Remove(f, p)
		}
		if err != nil && errno == 0 && !errors.As(err, &errno) {
			errno = unix.EIO
		}
		if _, err := unix.Write(fd, binary.NativeEndian.AppendUint32(nil, uint32(errno))); err != nil {
			return err
		}
	}
}

// plausible says whether f is a flow the kernel TCP path makes.
func plausible(f Flow, listenerPort uint16) bool {
	r := f.Remote.Addr()
	return f.Listener.Port() == listenerPort && f.Listener.Addr() == f.Guest.Addr() && f.Fake.Addr() == r &&
		!r.IsLoopback() && !r.IsUnspecified() && !r.IsMulticast() && r != f.Guest.Addr()
}

func parseRequest(b []byte) (op byte, f Flow, p Parts, err error) {
	if len(b) != requestLen || (b[0] != opAdd && b[0] != opRemove) || b[1] == 0 || Parts(b[1])&^Both != 0 ||
		(b[0] == opAdd && Parts(b[1]) != Both) || (b[2] != 4 && b[2] != 6) {
		return 0, f, 0, errBadRequest
	}
	addr := func(i int) netip.AddrPort {
		o := 3 + 18*i
		a := netip.AddrFrom16([16]byte(b[o : o+16]))
		if b[2] == 4 {
			a = a.Unmap()
		}
		return netip.AddrPortFrom(a, binary.BigEndian.Uint16(b[o+16:]))
	}
	f = Flow{Guest: addr(0), Remote: addr(1), Fake: addr(2), Listener: addr(3)}
	if !f.valid() || f.Guest.Addr().Is4() != (b[2] == 4) {
		return 0, f, 0, errBadRequest
	}
	return b[0], f, Parts(b[1]), nil
}

func appendRequest(b []byte, op byte, f Flow, p Parts) []byte {
	family := byte(6)
	if f.Guest.Addr().Is4() {
		family = 4
	}
	b = append(b, op, byte(p), family)
	for _, a := range []netip.AddrPort{f.Guest, f.Remote, f.Fake, f.Listener} {
		a16 := a.Addr().As16()
		b = append(b, a16[:]...)
		b = binary.BigEndian.AppendUint16(b, a.Port())
	}
	return b
}

// Client is a sandbox's Table: its changes go to a broker (Serve).
type Client struct{ guardedSocket }

func (c *Client) Add(f Flow) error             { return c.request(opAdd, f, Both) }
func (c *Client) Remove(f Flow, p Parts) error { return c.request(opRemove, f, p) }

func (c *Client) request(op byte, f Flow, p Parts) error {
	if !f.valid() {
		return ErrUnsupported
	}
	req := appendRequest(nil, op, f, p)
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return os.ErrClosed
	}
	if _, err := unix.Write(c.fd, req); err != nil {
		return fmt.Errorf("ktcpnat broker: %w", err)
	}
	var ans [4]byte
	n, err := unix.Read(c.fd, ans[:])
	if err != nil || n != len(ans) {
		// A late answer would be taken for the next request's.
		c.closeLocked()
		return fmt.Errorf("ktcpnat broker: no answer: %w", errors.Join(err, unix.EPIPE))
	}
	if errno := unix.Errno(binary.NativeEndian.Uint32(ans[:])); errno != 0 {
		return fmt.Errorf("ktcpnat broker: %w", errno)
	}
	return nil
}

// Pair makes a connection for a broker: ours for the Client's side, theirs
// for Serve's.
func Pair() (ours, theirs *os.File, err error) {
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_SEQPACKET|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, nil, fmt.Errorf("ktcpnat: socketpair: %w", err)
	}
	return os.NewFile(uintptr(fds[0]), "nat-client"), os.NewFile(uintptr(fds[1]), "nat-broker"), nil
}

// ServeInBackground runs a broker for the netlink socket nat in a goroutine
// of this process and returns the connection to it. The goroutine ends, and
// closes nat, once the connection's last holder closed it.
func ServeInBackground(nat *os.File, listenerPort uint16) (*os.File, error) {
	ours, theirs, err := Pair()
	if err != nil {
		nat.Close()
		return nil, err
	}
	go func() {
		m := NewMap(nat)
		_ = Serve(theirs, m, listenerPort)
		theirs.Close()
		m.Close()
	}()
	return ours, nil
}
