package portfwd

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"sync"
)

// SocketDialer opens sockets inside the guest's namespace (launcher's
// PortHelper).
type SocketDialer interface {
	Dial(network string, addr netip.AddrPort) (*os.File, error)
}

// Builtin is the kernel-speed Guest: each forwarded connection is a socket
// opened inside the namespace by a helper and passed back, so data moves
// between two kernel sockets (splice(2), through Go's TCPConn.ReadFrom) and
// never through the userspace stack. The guest sees connections coming from
// its own loopback (or own address), not from the real client.
type Builtin struct {
	ctx    context.Context
	dialer SocketDialer
}

// NewBuiltin returns a Builtin whose flows end when ctx does.
func NewBuiltin(ctx context.Context, d SocketDialer) *Builtin {
	return &Builtin{ctx: ctx, dialer: d}
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
	spliceTCP(b.ctx, conn, inner)
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

// spliceTCP copies both ways between two kernel TCP sockets until both
// directions end or ctx does; a FIN becomes a half-close, an error a reset.
// It returns the bytes copied from a to b and from b to a.
func spliceTCP(ctx context.Context, a, b *net.TCPConn) (ab, ba int64) {
	var once sync.Once
	abort := func() {
		once.Do(func() {
			_ = a.SetLinger(0)
			_ = b.SetLinger(0)
			a.Close()
			b.Close()
		})
	}
	stop := context.AfterFunc(ctx, abort)
	defer stop()
	pump := func(dst, src *net.TCPConn) int64 {
		// *TCPConn.ReadFrom a *TCPConn splices in the kernel.
		n, err := io.Copy(dst, src)
		if err != nil {
			abort()
			return n
		}
		_ = dst.CloseWrite()
		return n
	}
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		ba = pump(a, b)
	}()
	ab = pump(b, a)
	wg.Wait()
	a.Close()
	b.Close()
	return ab, ba
}
