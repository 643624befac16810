package portfwd

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"os"

	"github.com/netns-run/netns-run/netstack/sockrelay"
)

// Split is the Guest of pasta's -t and -u: a client on the host's loopback
// takes the kernel path (Local, a socket opened inside the namespace, as
// pasta splices local traffic), any other client the tap path (Tap, the
// userspace stack), which shows the guest the client's real address.
type Split struct {
	Local, Tap Guest
	// LocalAddr, if valid, is where local clients connect inside the
	// namespace instead of the rule's guest address (pasta's
	// --host-lo-to-ns-lo: the namespace's loopback).
	LocalAddr netip.Addr
}

var _ Guest = (*Split)(nil)

func (s *Split) local(client netip.Addr, guest netip.AddrPort) (Guest, netip.AddrPort) {
	if s.Local == nil || !client.Unmap().IsLoopback() {
		return s.Tap, guest
	}
	if s.LocalAddr.IsValid() {
		guest = netip.AddrPortFrom(s.LocalAddr, guest.Port())
	}
	return s.Local, guest
}

// ForwardTCP implements Guest.
func (s *Split) ForwardTCP(conn *net.TCPConn, guest netip.AddrPort) error {
	client, _ := netip.ParseAddrPort(conn.RemoteAddr().String())
	g, to := s.local(client.Addr(), guest)
	return g.ForwardTCP(conn, to)
}

// DialGuestUDP implements Guest.
func (s *Split) DialGuestUDP(client, guest netip.AddrPort) (net.Conn, error) {
	g, to := s.local(client.Addr(), guest)
	return g.DialGuestUDP(client, to)
}

// HostLoopback is the Guest of pasta's -T and -U: what a namespace
// listener accepts goes to the host's own loopback.
type HostLoopback struct {
	ctx   context.Context
	pipes *sockrelay.Pipes
}

// NewHostLoopback returns a HostLoopback whose flows end when ctx does.
func NewHostLoopback(ctx context.Context) *HostLoopback {
	return &HostLoopback{ctx: ctx, pipes: newPipes(ctx)}
}

var _ Guest = (*HostLoopback)(nil)

// ForwardTCP implements Guest: target is a loopback address of the host.
func (h *HostLoopback) ForwardTCP(conn *net.TCPConn, target netip.AddrPort) error {
	if !target.Addr().IsLoopback() {
		conn.Close()
		return fmt.Errorf("%s is not a loopback address", target)
	}
	var d net.Dialer
	c, err := d.DialContext(h.ctx, "tcp", target.String())
	if err != nil {
		_ = conn.SetLinger(0)
		conn.Close()
		return err
	}
	spliceTCP(h.ctx, h.pipes, conn, c.(*net.TCPConn))
	return nil
}

// DialGuestUDP implements Guest.
func (h *HostLoopback) DialGuestUDP(_, target netip.AddrPort) (net.Conn, error) {
	if !target.Addr().IsLoopback() {
		return nil, fmt.Errorf("%s is not a loopback address", target)
	}
	var d net.Dialer
	return d.DialContext(h.ctx, "udp", target.String())
}

// SocketListener opens listening sockets inside the guest's namespace
// (launcher's PortHelper).
type SocketListener interface {
	Listen(network string, addr netip.AddrPort) (*os.File, error)
}

// NamespaceBinder binds rules' listeners inside the guest's namespace;
// their HostAddr is an address there.
type NamespaceBinder struct{ L SocketListener }

func (b NamespaceBinder) file(r Rule) (*os.File, error) {
	if !r.HostAddr.IsValid() || r.HostIface != "" {
		return nil, fmt.Errorf("a listener in the namespace needs an address and no interface")
	}
	network := r.Proto + "4"
	if r.HostAddr.Is6() {
		network = r.Proto + "6"
	}
	return b.L.Listen(network, netip.AddrPortFrom(r.HostAddr, r.HostPort))
}

// ListenTCP implements Binder.
func (b NamespaceBinder) ListenTCP(r Rule) (*net.TCPListener, error) {
	f, err := b.file(r)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	ln, err := net.FileListener(f)
	if err != nil {
		return nil, err
	}
	tl, ok := ln.(*net.TCPListener)
	if !ok {
		ln.Close()
		return nil, fmt.Errorf("adopt listener: got %T", ln)
	}
	return tl, nil
}

// ListenUDP implements Binder.
func (b NamespaceBinder) ListenUDP(r Rule) (*net.UDPConn, error) {
	f, err := b.file(r)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	pc, err := net.FilePacketConn(f)
	if err != nil {
		return nil, err
	}
	uc, ok := pc.(*net.UDPConn)
	if !ok {
		pc.Close()
		return nil, fmt.Errorf("adopt socket: got %T", pc)
	}
	return uc, nil
}
