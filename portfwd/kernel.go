package portfwd

import (
	"context"
	"errors"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"runtime"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"

	"github.com/netns-run/netns-run/netstack/sockrelay"
)

// InboundSockets makes the sockets of published-port connections inside
// the guest's namespace (launcher's PortHelper).
type InboundSockets interface {
	// InboundSockets returns n fresh TCP sockets of the namespace,
	// marked and transparent (package ktcpnat); they may be blocking
	// (the caller sets them non-blocking).
	InboundSockets(ipv6 bool, n int) ([]*os.File, error)
}

// KernelPath is the Guest of published ports when the guest's kernel can
// take their connections (package ktcpnat's inbound routes): each TCP
// connection is a socket opened inside the namespace, as Builtin's, so its
// data moves between two kernel sockets, but the guest's server sees the
// client's address, as through the userspace stack. A connection the
// guest's kernel cannot take that way, and UDP, go through Stack.
type KernelPath struct {
	ctx     context.Context
	sockets InboundSockets
	stack   Guest
	source  func(client, guest netip.AddrPort) netip.AddrPort
	log     *slog.Logger
	// offUntil, per family (IPv4, IPv6), in Unix nanoseconds: the guest
	// had no rules for it, or a NAT rule of its own.
	offUntil [2]atomic.Int64
	// pools hold sockets made ahead, per family: the helper's round trip
	// costs more than the rest of a connection's start.
	pools [2]socketPool
	// loops relay the connections; nil: they could not start, and the
	// stack takes every connection.
	loops  *sockrelay.Loops
	counts struct {
		open                      atomic.Int64
		total, fromGuest, toGuest atomic.Uint64
	}
}

// How long a family's connections go through the stack after the port
// helper found the guest's kernel unfit for them (offFor), or after one
// that the guest's kernel did not answer (offAfterTimeout).
const (
	offFor          = 10 * time.Second
	offAfterTimeout = time.Minute
)

// NewKernelPath returns a KernelPath whose flows end when ctx does. source
// gives the address the guest should see a client as (the userspace
// stack's choice: netstack.Config.ClientSource).
func NewKernelPath(ctx context.Context, d InboundSockets, stack Guest, source func(client, guest netip.AddrPort) netip.AddrPort, log *slog.Logger) *KernelPath {
	k := &KernelPath{ctx: ctx, sockets: d, stack: stack, source: source, log: log}
	loops, err := sockrelay.NewLoops(runtime.GOMAXPROCS(0), newPipes(ctx))
	if err != nil {
		log.Warn("published ports go through the userspace stack: no relay loop", "err", err)
	} else {
		k.loops = loops
		context.AfterFunc(ctx, loops.Close)
	}
	context.AfterFunc(ctx, func() {
		for i := range k.pools {
			k.pools[i].close()
		}
	})
	return k
}

var _ Guest = (*KernelPath)(nil)

// ForwardTCP implements Guest.
func (k *KernelPath) ForwardTCP(conn *net.TCPConn, guest netip.AddrPort) error {
	client, _ := netip.ParseAddrPort(conn.RemoteAddr().String())
	fd, err := sockrelay.Detach(conn)
	if err != nil {
		sockrelay.Abort(conn)
		return err
	}
	return k.forwardRawTCP(fd, client, guest)
}

// forwardRawTCP implements rawGuest: the forward's listener accepted fd
// without the net package. It runs in the listener's accept loop, so what
// may wait (the userspace stack's connection, a connect that did not end
// within its call, sockets from the port helper when none were made
// ahead) goes on in a goroutine of its own: a goroutine per
// connection, whose stack grows on the way, had cost a short connection
// 3-4 % of the helper's CPU.
func (k *KernelPath) forwardRawTCP(fd int, client, guest netip.AddrPort) error {
	client = netip.AddrPortFrom(client.Addr().Unmap(), client.Port())
	guest = netip.AddrPortFrom(guest.Addr().Unmap(), guest.Port())
	from := k.source(client, guest)
	fam := 0
	if guest.Addr().Is6() {
		fam = 1
	}
	a := guest.Addr()
	if k.loops == nil || time.Now().UnixNano() < k.offUntil[fam].Load() || !from.IsValid() || from.Addr().Is4() != a.Is4() || a.IsLoopback() || a.IsUnspecified() {
		go k.toStack(fd, client, guest)
		return nil
	}
	inner, connected, err := k.dialFrom(fam, from, guest, false)
	if errors.Is(err, errPoolEmpty) {
		// The pool's refill waits for the port helper: not in the
		// accept loop, which would stall every published port of the
		// family while the helper is slow.
		go func() {
			inner, connected, err := k.dialFrom(fam, from, guest, true)
			if err := k.dialed(fd, client, guest, fam, inner, connected, err); err != nil {
				k.log.Debug("published tcp connection", "client", client, "guest", guest, "err", err)
			}
		}()
		return nil
	}
	return k.dialed(fd, client, guest, fam, inner, connected, err)
}

// dialed goes on from dialFrom's result for the client's socket fd: the
// stack takes the connection if the guest's kernel did not, a connect in
// progress ends in a goroutine of its own, and a connected pair goes to
// the relay loops.
func (k *KernelPath) dialed(fd int, client, guest netip.AddrPort, fam, inner int, connected bool, err error) error {
	switch {
	case err != nil:
		k.fallBack(fam, client, guest, err)
		go k.toStack(fd, client, guest)
		return nil
	case !connected:
		// On loopback the connect usually ended within the call; else
		// (the server's backlog is full, or something drops what the
		// routes deliver) the wait is inboundDialTimeout at most (then
		// ETIMEDOUT).
		go func() {
			inner, err := sockrelay.AwaitConnected(k.ctx, inner, inboundDialTimeout)
			if err != nil {
				k.fallBack(fam, client, guest, err)
				k.toStack(fd, client, guest)
				return
			}
			if err := k.relay(inner, fd); err != nil {
				k.log.Debug("published tcp connection", "client", client, "guest", guest, "err", err)
			}
		}()
		return nil
	}
	return k.relay(inner, fd)
}

// fallBack notes that the guest's kernel did not take a connection of fam,
// for err: for a while, if err says the others would fare no better.
func (k *KernelPath) fallBack(fam int, client, guest netip.AddrPort, err error) {
	var pause time.Duration
	switch {
	case errors.Is(err, unix.ENOPROTOOPT):
		// No routes (or a guest NAT the connections would bypass):
		// ask again in a while.
		pause = offFor
	case errors.Is(err, errNoSockets):
		// The port helper is gone, or cannot start: not for every
		// connection.
		pause = offFor
	case errors.Is(err, unix.ETIMEDOUT):
		// Something in the guest drops what the routes deliver (a
		// firewall on lo): no other connection should wait.
		pause = offAfterTimeout
	}
	if pause > 0 {
		if k.offUntil[fam].Swap(time.Now().Add(pause).UnixNano()) == 0 {
			k.log.Debug("published ports of this family go through the userspace stack for now", "ipv6", fam == 1, "for", pause, "err", err)
		}
		return
	}
	// Refused too: a NAT rule of the guest's may send the stack's
	// connection elsewhere.
	k.log.Debug("published port: the guest's kernel did not take the connection; the userspace stack does", "client", client, "guest", guest, "err", err)
}

// relay hands the connected pair to the relay loops, which own both
// sockets from here, also when they fail.
func (k *KernelPath) relay(inner, fd int) error {
	k.counts.open.Add(1)
	k.counts.total.Add(1)
	err := k.loops.Add(inner, fd, nil, func(fromGuest, toGuest int64) {
		k.counts.open.Add(-1)
		k.counts.toGuest.Add(uint64(toGuest))
		k.counts.fromGuest.Add(uint64(fromGuest))
	})
	if err != nil {
		k.counts.open.Add(-1)
	}
	return err
}

// toStack hands the client's socket fd to the userspace stack, and
// returns when that connection is over.
func (k *KernelPath) toStack(fd int, client, guest netip.AddrPort) {
	conn, err := connOf(fd)
	if err == nil {
		err = k.stack.ForwardTCP(conn, guest)
	}
	if err != nil {
		k.log.Debug("published tcp connection", "client", client, "guest", guest, "err", err)
	}
}

// KernelPathStats counts the connections the guest's kernel took.
type KernelPathStats struct {
	Open                      int64
	Total, FromGuest, ToGuest uint64
}

// Stats returns the counts so far; a connection's bytes count once it is
// over.
func (k *KernelPath) Stats() KernelPathStats {
	return KernelPathStats{Open: k.counts.open.Load(), Total: k.counts.total.Load(),
		FromGuest: k.counts.fromGuest.Load(), ToGuest: k.counts.toGuest.Load()}
}

// DialGuestUDP implements Guest.
func (k *KernelPath) DialGuestUDP(client, guest netip.AddrPort) (net.Conn, error) {
	return k.stack.DialGuestUDP(client, guest)
}
