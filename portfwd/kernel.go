package portfwd

import (
	"context"
	"errors"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"runtime"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"

	"github.com/netns-run/netns-run/netstack/ktcpnat"
	"github.com/netns-run/netns-run/netstack/sockrelay"
)

// InboundSockets makes the sockets of published-port connections inside
// the guest's namespace and forgets the connections once over (launcher's
// PortHelper).
type InboundSockets interface {
	// InboundSockets returns n fresh TCP sockets of the namespace;
	// they may be blocking (the caller sets them non-blocking).
	InboundSockets(ipv6 bool, n int) ([]*os.File, error)
	ForgetInbound(keys []ktcpnat.InboundKey) error
}

// KernelPath is the Guest of published ports when the guest's kernel can
// take their connections (package ktcpnat's inbound rules): each TCP
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

	mu sync.Mutex
	// live counts the open connections per key; pending lists keys of
	// ended ones to forget, oldest first, and ended has each one's latest
	// due time (an earlier entry of a key taken up again is stale).
	live    map[ktcpnat.InboundKey]int
	pending []pendingKey
	ended   map[ktcpnat.InboundKey]time.Time
	wake    chan struct{}
}

type pendingKey struct {
	key ktcpnat.InboundKey
	due time.Time
}

// forgetAfter is how long a connection's key stays after the relay ended:
// the last segments of its close (the final ACK, a retransmitted FIN) still
// need the rules.
const forgetAfter = 2 * time.Second

// forgetEvery spaces the batches of keys to forget: a key due is forgotten
// up to that much later, with the others due by then. Each batch is a round
// trip to the port helper and a netlink exchange of its own; at a thousand
// connections a second, one per key had taken a tenth of the helper's CPU.
const forgetEvery = 250 * time.Millisecond

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
	k := &KernelPath{ctx: ctx, sockets: d, stack: stack, source: source, log: log,
		live: make(map[ktcpnat.InboundKey]int), ended: make(map[ktcpnat.InboundKey]time.Time), wake: make(chan struct{}, 1)}
	loops, err := sockrelay.NewLoops(runtime.GOMAXPROCS(0), newPipes(ctx))
	if err != nil {
		log.Warn("published ports go through the userspace stack: no relay loop", "err", err)
	} else {
		k.loops = loops
		context.AfterFunc(ctx, loops.Close)
	}
	go k.forgetLoop()
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
// without the net package.
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
		return k.toStack(fd, guest)
	}
	inner, bound, err := k.dialFrom(fam, from, guest)
	if err != nil {
		if bound.IsValid() {
			// The first segment put the connection's key in, and the
			// stack's connection has the same addresses: the server's
			// answers to it must leave through the TAP.
			k.forgetNow(ktcpnat.InboundKey{Server: guest, Client: bound})
		}
		var pause time.Duration
		switch {
		case errors.Is(err, unix.ENOPROTOOPT):
			// No rules (or a guest NAT they would bypass): ask again
			// in a while.
			pause = offFor
		case errors.Is(err, errNoSockets):
			// The port helper is gone, or cannot start: not for
			// every connection.
			pause = offFor
		case errors.Is(err, unix.ETIMEDOUT):
			// Something in the guest drops what the rules deliver
			// (a firewall on lo): no other connection should wait.
			pause = offAfterTimeout
		}
		if pause > 0 {
			if k.offUntil[fam].Swap(time.Now().Add(pause).UnixNano()) == 0 {
				k.log.Debug("published ports of this family go through the userspace stack for now", "ipv6", fam == 1, "for", pause, "err", err)
			}
		} else {
			// Refused too: a NAT rule of the guest's may send the
			// stack's connection elsewhere.
			k.log.Debug("published port: the guest's kernel did not take the connection; the userspace stack does", "client", client, "guest", guest, "err", err)
		}
		return k.toStack(fd, guest)
	}
	key := ktcpnat.InboundKey{Server: guest, Client: bound}
	k.hold(key)
	k.counts.open.Add(1)
	k.counts.total.Add(1)
	// The loop owns both sockets from here, also when it fails.
	err = k.loops.Add(inner, fd, nil, func(fromGuest, toGuest int64) {
		k.counts.open.Add(-1)
		k.counts.toGuest.Add(uint64(toGuest))
		k.counts.fromGuest.Add(uint64(fromGuest))
		k.release(key)
	})
	if err != nil {
		k.counts.open.Add(-1)
		k.release(key)
	}
	return err
}

// toStack hands the client's socket fd to the userspace stack.
func (k *KernelPath) toStack(fd int, guest netip.AddrPort) error {
	conn, err := connOf(fd)
	if err != nil {
		return err
	}
	return k.stack.ForwardTCP(conn, guest)
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

// forgetNow forgets a failed connection's key at once, unless a live
// connection has it.
func (k *KernelPath) forgetNow(key ktcpnat.InboundKey) {
	k.mu.Lock()
	live := k.live[key] > 0
	k.mu.Unlock()
	if live {
		return
	}
	if err := k.sockets.ForgetInbound([]ktcpnat.InboundKey{key}); err != nil {
		k.log.Warn("published port: forgetting a failed connection", "key", key, "err", err)
	}
}

func (k *KernelPath) hold(key ktcpnat.InboundKey) {
	k.mu.Lock()
	k.live[key]++
	k.mu.Unlock()
}

// release queues key to be forgotten once its last connection lingered.
func (k *KernelPath) release(key ktcpnat.InboundKey) {
	k.mu.Lock()
	defer k.mu.Unlock()
	if k.live[key]--; k.live[key] > 0 {
		return
	}
	delete(k.live, key)
	due := time.Now().Add(forgetAfter)
	k.ended[key] = due
	k.pending = append(k.pending, pendingKey{key, due})
	if len(k.pending) == 1 {
		select {
		case k.wake <- struct{}{}:
		default:
		}
	}
}

// forgetLoop forgets the keys that are due, in batches, until ctx ends
// (the namespace's rules go with it, or with the next Install).
func (k *KernelPath) forgetLoop() {
	t := time.NewTimer(0)
	<-t.C
	for {
		select {
		case <-k.ctx.Done():
			t.Stop()
			for i := range k.pools {
				k.pools[i].close()
			}
			return
		case <-k.wake:
			t.Reset(forgetAfter)
			continue
		case <-t.C:
		}
		keys, next := k.due(time.Now())
		if len(keys) > 0 {
			if err := k.sockets.ForgetInbound(keys); err != nil {
				k.log.Warn("published ports: forgetting ended connections", "n", len(keys), "err", err)
			}
		}
		if !next.IsZero() {
			t.Reset(max(time.Until(next), forgetEvery))
		}
	}
}

// due takes the pending keys due by now that no connection has taken up
// again, and returns when the next one is due (zero: none pending).
func (k *KernelPath) due(now time.Time) (keys []ktcpnat.InboundKey, next time.Time) {
	k.mu.Lock()
	defer k.mu.Unlock()
	i := 0
	for ; i < len(k.pending) && !k.pending[i].due.After(now); i++ {
		p := k.pending[i]
		if k.live[p.key] == 0 && k.ended[p.key].Equal(p.due) {
			keys = append(keys, p.key)
			delete(k.ended, p.key)
		}
	}
	k.pending = k.pending[i:]
	if len(k.pending) > 0 {
		next = k.pending[0].due
	}
	return keys, next
}
