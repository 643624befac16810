package portfwd

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/netns-run/netns-run/netstack/sockrelay"
)

// inboundDialTimeout bounds a published-port connection's connect through
// the guest's kernel: the guest's server is local to it, so it answers at
// once, unless something drops what the rules deliver (a firewall on lo),
// and then the userspace stack had better take it. A server whose backlog
// overflows drops SYNs too: the timeout leaves room for the retransmission
// a second later.
const inboundDialTimeout = 2500 * time.Millisecond

// A batch of sockets is used for poolMaxAge at most: the helper checks the
// guest's rules and NAT at most that often. Its size follows the rate of
// connections, from poolMin to poolMax: doubled when a batch ran out within
// its age, halved when one aged with sockets left.
const (
	poolMaxAge = time.Second
	poolMin    = 2
	poolMax    = 64
)

// socketPool holds marked sockets of one family made ahead, as raw
// descriptors: the relay loop takes them so.
type socketPool struct {
	mu     sync.Mutex
	fds    []int
	made   time.Time
	batch  int
	closed bool
	// failed, failedAt: the last refill's error, for the callers that
	// waited for it (the port helper's is a wait of seconds at worst).
	failed   error
	failedAt time.Time
}

// errPoolEmpty: get without wait found no fresh socket.
var errPoolEmpty = errors.New("no socket made ahead")

// get returns a socket made by src. With wait false it does not ask src
// for more (a round trip to the port helper, seconds if that is stuck):
// errPoolEmpty.
func (p *socketPool) get(src InboundSockets, ipv6, wait bool) (int, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		return -1, net.ErrClosed
	}
	aged := time.Since(p.made) > poolMaxAge
	if len(p.fds) == 0 || aged {
		switch {
		case !wait:
			return -1, errPoolEmpty
		case p.failed != nil && time.Since(p.failedAt) < poolMaxAge:
			return -1, p.failed
		}
	}
	switch {
	case len(p.fds) > 0 && aged:
		closeAll(p.fds)
		p.fds = p.fds[:0]
		p.batch /= 2
	case len(p.fds) == 0 && !aged:
		p.batch *= 2
	}
	if len(p.fds) == 0 {
		p.batch = min(max(p.batch, poolMin), poolMax)
		files, err := src.InboundSockets(ipv6, p.batch)
		if err != nil {
			p.failed, p.failedAt = err, time.Now()
			return -1, err
		}
		p.failed = nil
		for _, f := range files {
			fd, err := sockrelay.Detach(f)
			if err != nil {
				f.Close()
				continue
			}
			p.fds = append(p.fds, fd)
		}
		if len(p.fds) == 0 {
			return -1, errors.New("no sockets")
		}
		p.made = time.Now()
	}
	fd := p.fds[len(p.fds)-1]
	p.fds = p.fds[:len(p.fds)-1]
	return fd, nil
}

// close closes the sockets left; get makes no more.
func (p *socketPool) close() {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.closed = true
	closeAll(p.fds)
	p.fds = nil
}

func closeAll(fds []int) {
	for _, fd := range fds {
		unix.Close(fd)
	}
}

// connOf makes a net.Conn of the socket fd, which it takes (and closes on
// failure).
func connOf(fd int) (*net.TCPConn, error) {
	f := os.NewFile(uintptr(fd), "tcp")
	defer f.Close()
	c, err := net.FileConn(f)
	if err != nil {
		return nil, fmt.Errorf("adopt socket: %w", err)
	}
	tc, ok := c.(*net.TCPConn)
	if !ok {
		c.Close()
		return nil, fmt.Errorf("adopt socket: got %T", c)
	}
	return tc, nil
}

// dialFrom starts connecting a marked, transparent socket of the guest's
// namespace, bound to from (any port of its address when another connection
// has that one), to guest: the server sees from. The socket is a raw
// non-blocking descriptor, for the relay loop; connected says whether its
// connect ended (sockrelay.AwaitConnected waits for the rest).
// With wait false it takes only a socket made ahead (else errPoolEmpty).
func (k *KernelPath) dialFrom(fam int, from, guest netip.AddrPort, wait bool) (fd int, connected bool, err error) {
	fd, connected, err = k.dialOnce(fam, from, guest, false, wait)
	if errors.Is(err, unix.EADDRNOTAVAIL) {
		// Another client with the same port shows as the same address
		// (the gateway, for all loopback clients): its connection has
		// these addresses. Any port will do.
		fd, connected, err = k.dialOnce(fam, from, guest, true, wait)
	}
	return fd, connected, err
}

// errNoSockets wraps the port helper's failure to make sockets.
var errNoSockets = errors.New("no sockets from the port helper")

func (k *KernelPath) dialOnce(fam int, from, guest netip.AddrPort, anyPort, wait bool) (int, bool, error) {
	fd, err := k.pools[fam].get(k.sockets, fam == 1, wait)
	if errors.Is(err, errPoolEmpty) {
		return -1, false, err
	}
	if err != nil {
		return -1, false, fmt.Errorf("%w: %w", errNoSockets, err)
	}
	if err := startConnect(fd, from, guest, anyPort); err != nil {
		unix.Close(fd)
		return -1, false, err
	}
	connected, err := sockrelay.Connected(fd)
	if err != nil {
		unix.Close(fd)
		return -1, false, err
	}
	return fd, connected, nil
}

// startConnect binds fd to from (or, with anyPort or that port taken, to
// its address and a port chosen at connect time: unique per peer only) and
// starts connecting it to guest.
func startConnect(fd int, from, guest netip.AddrPort, anyPort bool) error {
	var err error = unix.EADDRINUSE
	if !anyPort {
		err = sockrelay.Bind(fd, from)
	}
	if errors.Is(err, unix.EADDRINUSE) || errors.Is(err, unix.EACCES) {
		_ = unix.SetsockoptInt(fd, unix.IPPROTO_IP, unix.IP_BIND_ADDRESS_NO_PORT, 1)
		err = sockrelay.Bind(fd, netip.AddrPortFrom(from.Addr(), 0))
	}
	if err != nil {
		return fmt.Errorf("bind %s: %w", from.Addr(), err)
	}
	err = sockrelay.Connect(fd, guest)
	if err != nil && !errors.Is(err, unix.EINPROGRESS) {
		return err
	}
	return nil
}
