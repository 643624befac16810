package portfwd

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"os"

	"github.com/netns-run/netns-run/netstack/sockrelay"
)

// SocketDialer opens sockets inside the guest's namespace (launcher's
// PortHelper).
type SocketDialer interface {
	Dial(network string, addr netip.AddrPort) (*os.File, error)
}

// Builtin is the kernel-speed Guest: each forwarded connection is a socket
// opened inside the namespace by a helper and passed back, so data moves
// between two kernel sockets (splice(2), package sockrelay) and
// never through the userspace stack. The guest sees connections coming from
// its own loopback (or own address), not from the real client.
type Builtin struct {
	ctx    context.Context
	dialer SocketDialer
	pipes  *sockrelay.Pipes
}

// NewBuiltin returns a Builtin whose flows end when ctx does.
func NewBuiltin(ctx context.Context, d SocketDialer) *Builtin {
	return &Builtin{ctx: ctx, dialer: d, pipes: newPipes(ctx)}
}

var _ Guest = (*Builtin)(nil)

// ForwardTCP implements Guest.
func (b *Builtin) ForwardTCP(conn *net.TCPConn, guest netip.AddrPort) error {
	inner, err := b.dialTCP(guest)
	if err != nil {
		_ = conn.SetLinger(0)
		conn.Close()
		return err
	}
	spliceTCP(b.ctx, b.pipes, inner, conn)
	return nil
}

func (b *Builtin) dialTCP(guest netip.AddrPort) (*net.TCPConn, error) {
	c, err := b.dial("tcp", guest)
	if err != nil {
		return nil, err
	}
	tc, ok := c.(*net.TCPConn)
	if !ok {
		c.Close()
		return nil, fmt.Errorf("adopt socket to %s: got %T", guest, c)
	}
	return tc, nil
}

// DialGuestUDP implements Guest.
func (b *Builtin) DialGuestUDP(_, guest netip.AddrPort) (net.Conn, error) {
	return b.dial("udp", guest)
}

// dial has the helper connect inside the namespace and adopts the socket.
func (b *Builtin) dial(network string, guest netip.AddrPort) (net.Conn, error) {
	f, err := b.dialer.Dial(network, guest)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	c, err := net.FileConn(f)
	if err != nil {
		return nil, fmt.Errorf("adopt socket to %s: %w", guest, err)
	}
	return c, nil
}

// spliceTCP relays between two kernel TCP sockets, guest's (one in the
// guest's namespace) and host's, until both directions end or ctx does (see
// sockrelay.Relay); up and down count the bytes each way.
func spliceTCP(ctx context.Context, pipes *sockrelay.Pipes, guest, host sockrelay.Socket) (up, down int64) {
	stop := context.AfterFunc(ctx, func() {
		sockrelay.Abort(guest)
		sockrelay.Abort(host)
	})
	defer stop()
	return sockrelay.Relay(guest, host, pipes)
}

// newPipes returns relays' pipes, closed when ctx ends.
func newPipes(ctx context.Context) *sockrelay.Pipes {
	p := new(sockrelay.Pipes)
	context.AfterFunc(ctx, p.Close)
	return p
}
