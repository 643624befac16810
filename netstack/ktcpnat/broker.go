package ktcpnat

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"sync"

	"golang.org/x/sys/unix"
)

// A sandboxed helper holds no capability in the guest's user namespace,
// which the kernel asks for with every change to the guest's nftables. A
// broker outside the sandbox (netns-run's parent process, or a small
// process usernet starts before it enters its sandbox) holds the netlink
// socket and applies the sandbox's changes, which can only be entries of
// this one map: the requests carry nothing else.
//
// A request is one datagram on a SOCK_SEQPACKET pair: an op byte, a count
// byte (1 or 2) and per rewrite two IPv4 tuples of 12 bytes (source
// address, source port, destination address, destination port; removals
// carry the first alone). The answer is a 4-byte errno, 0 for success.

const (
	opAdd    = 1
	opRemove = 2

	tupleLen    = 12
	maxRewrites = 2
)

var errBadRequest = errors.New("ktcpnat: malformed request")

// Serve applies conn's requests to t until conn ends (its peer closed it,
// or it was closed here); it closes neither.
func Serve(conn *os.File, t Table) error {
	fd := int(conn.Fd())
	buf := make([]byte, 2+maxRewrites*2*tupleLen+1)
	for {
		n, err := unix.Read(fd, buf)
		if errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil || n == 0 {
			return err
		}
		var errno unix.Errno
		op, rw, err := parseRequest(buf[:n])
		switch {
		case err != nil:
			errno = unix.EINVAL
		case op == opAdd:
			err = t.Add(rw...)
		default:
			err = t.Remove(rw...)
		}
		if err != nil && errno == 0 && !errors.As(err, &errno) {
			errno = unix.EIO
		}
		if _, err := unix.Write(fd, binary.NativeEndian.AppendUint32(nil, uint32(errno))); err != nil {
			return err
		}
	}
}

func parseRequest(b []byte) (op byte, rw []Rewrite, err error) {
	if len(b) < 2 || (b[0] != opAdd && b[0] != opRemove) || b[1] < 1 || b[1] > maxRewrites {
		return 0, nil, errBadRequest
	}
	op, n := b[0], int(b[1])
	per := tupleLen
	if op == opAdd {
		per = 2 * tupleLen
	}
	if len(b) != 2+n*per {
		return 0, nil, errBadRequest
	}
	b = b[2:]
	for range n {
		var r Rewrite
		r.From, b = decodeTuple(b), b[tupleLen:]
		if op == opAdd {
			r.To, b = decodeTuple(b), b[tupleLen:]
		}
		rw = append(rw, r)
	}
	return op, rw, nil
}

func decodeTuple(b []byte) Tuple {
	return Tuple{
		Src: netip.AddrPortFrom(netip.AddrFrom4([4]byte(b[0:4])), binary.BigEndian.Uint16(b[4:])),
		Dst: netip.AddrPortFrom(netip.AddrFrom4([4]byte(b[6:10])), binary.BigEndian.Uint16(b[10:])),
	}
}

func appendTuple(b []byte, t Tuple) []byte {
	s, d := t.Src.Addr().As4(), t.Dst.Addr().As4()
	b = append(b, s[:]...)
	b = binary.BigEndian.AppendUint16(b, t.Src.Port())
	b = append(b, d[:]...)
	return binary.BigEndian.AppendUint16(b, t.Dst.Port())
}

// Client is a sandbox's Table: its changes go to a broker (Serve).
type Client struct {
	mu     sync.Mutex
	closed bool
	f      *os.File
	fd     int
}

func (c *Client) Add(rw ...Rewrite) error    { return c.request(opAdd, rw) }
func (c *Client) Remove(rw ...Rewrite) error { return c.request(opRemove, rw) }

func (c *Client) Close() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return nil
	}
	c.closed = true
	return c.f.Close()
}

func (c *Client) request(op byte, rw []Rewrite) error {
	if len(rw) < 1 || len(rw) > maxRewrites {
		return fmt.Errorf("ktcpnat: %d rewrites in one request", len(rw))
	}
	req := []byte{op, byte(len(rw))}
	for _, r := range rw {
		if !r.From.is4() || op == opAdd && !r.To.is4() {
			return ErrUnsupported
		}
		req = appendTuple(req, r.From)
		if op == opAdd {
			req = appendTuple(req, r.To)
		}
	}
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
func ServeInBackground(nat *os.File) (*os.File, error) {
	ours, theirs, err := Pair()
	if err != nil {
		nat.Close()
		return nil, err
	}
	go func() {
		m := NewMap(nat)
		_ = Serve(theirs, m)
		theirs.Close()
		m.Close()
	}()
	return ours, nil
}
