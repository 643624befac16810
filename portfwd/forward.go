package portfwd

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/netns-run/netns-run/netstack/sockrelay"
)

const (
	// udpFlowIdle ends a published UDP flow after this long without a
	// datagram either way.
	udpFlowIdle = 60 * time.Second
	// maxUDPFlows bounds the clients one published UDP port tracks; a
	// new client beyond it takes the place of the least recently used.
	maxUDPFlows = 4096
)

// forward is one rule's host listener and the goroutines serving it.
type forward struct {
	id   int
	rule Rule
	// closeListener unblocks the accept or read loop.
	closeListener func() error
	stopping      atomic.Bool
	wg            sync.WaitGroup
}

func startForward(r Rule, guest Guest, bind Binder, log *slog.Logger) (*forward, error) {
	f := &forward{rule: r}
	switch r.Proto {
	case "tcp":
		ln, err := bind.ListenTCP(r)
		if err != nil {
			return nil, explainListenError(r, err)
		}
		if rg, ok := guest.(rawGuest); ok {
			lf, err := sockrelay.ListenerFile(ln)
			if err != nil {
				return nil, err
			}
			f.closeListener = lf.Close
			f.wg.Add(1)
			go func() {
				defer f.wg.Done()
				f.acceptRaw(lf, rg, log)
			}()
			break
		}
		f.closeListener = ln.Close
		f.wg.Add(1)
		go func() {
			defer f.wg.Done()
			f.acceptTCP(ln, guest, log)
		}()
	case "udp":
		pc, err := bind.ListenUDP(r)
		if err != nil {
			return nil, explainListenError(r, err)
		}
		f.closeListener = pc.Close
		f.wg.Add(1)
		go func() {
			defer f.wg.Done()
			f.serveUDP(pc, guest, log)
		}()
	}
	return f, nil
}

// Binder opens the listening socket of a rule.
type Binder interface {
	ListenTCP(r Rule) (*net.TCPListener, error)
	ListenUDP(r Rule) (*net.UDPConn, error)
}

// hostBinder listens on the host, in our own namespace.
type hostBinder struct{}

// listenArgs is the network and address of r's listener. No address:
// every address, IPv4 and IPv6 (one dual-stack socket).
func listenArgs(r Rule) (network, addr string) {
	network, addr = r.Proto, fmt.Sprintf(":%d", r.HostPort)
	if r.HostAddr.IsValid() {
		network = r.Proto + "4"
		if r.HostAddr.Is6() {
			network = r.Proto + "6"
		}
		addr = net.JoinHostPort(r.HostAddr.String(), fmt.Sprint(r.HostPort))
	}
	return network, addr
}

func (hostBinder) ListenTCP(r Rule) (*net.TCPListener, error) {
	network, addr := listenArgs(r)
	lc := net.ListenConfig{Control: bindToDevice(r.HostIface)}
	ln, err := lc.Listen(context.Background(), network, addr)
	if err != nil {
		return nil, err
	}
	return ln.(*net.TCPListener), nil
}

func (hostBinder) ListenUDP(r Rule) (*net.UDPConn, error) {
	network, addr := listenArgs(r)
	lc := net.ListenConfig{Control: bindToDevice(r.HostIface)}
	pc, err := lc.ListenPacket(context.Background(), network, addr)
	if err != nil {
		return nil, err
	}
	return pc.(*net.UDPConn), nil
}

// explainListenError names the fix for the usual bind failures.
func explainListenError(r Rule, err error) error {
	switch {
	case errors.Is(err, syscall.EADDRINUSE):
		return fmt.Errorf("publish %s: host port %d/%s is already in use: %w", r, r.HostPort, r.Proto, err)
	case errors.Is(err, syscall.EACCES) && r.HostPort < 1024:
		return fmt.Errorf("publish %s: port %d is privileged: allow it with `sudo setcap cap_net_bind_service=ep BINARY` or `sudo sysctl net.ipv4.ip_unprivileged_port_start=%d`: %w",
			r, r.HostPort, r.HostPort, err)
	case errors.Is(err, syscall.EADDRNOTAVAIL):
		return fmt.Errorf("publish %s: %s is not an address of this host: %w", r, r.HostAddr, err)
	}
	return fmt.Errorf("publish %s: %w", r, err)
}

// bindToDevice returns a listener hook that binds the socket to iface
// (nil when iface is empty).
func bindToDevice(iface string) func(network, address string, c syscall.RawConn) error {
	if iface == "" {
		return nil
	}
	return func(_, _ string, c syscall.RawConn) error {
		var serr error
		err := c.Control(func(fd uintptr) {
			serr = unix.BindToDevice(int(fd), iface)
		})
		if err != nil {
			return err
		}
		if serr != nil {
			return fmt.Errorf("bind to interface %s: %w", iface, serr)
		}
		return nil
	}
}

func (f *forward) stop() {
	f.stopping.Store(true)
	_ = f.closeListener()
	f.wg.Wait()
}

func (f *forward) acceptTCP(ln *net.TCPListener, guest Guest, log *slog.Logger) {
	var backoff sockrelay.AcceptBackoff
	for {
		conn, err := ln.AcceptTCP()
		if err != nil {
			if !f.stopping.Load() && backoff.Wait(err) {
				log.Debug("published port: accept", "rule", f.rule.String(), "err", err)
				continue
			}
			if !errors.Is(err, net.ErrClosed) {
				log.Warn("published port stopped accepting", "rule", f.rule.String(), "err", err)
			}
			return
		}
		backoff.Reset()
		// Connection goroutines are not waited for by stop: a removed
		// rule lets its open connections finish. Their owner is the
		// Guest, which ends them when it shuts down.
		var client netip.Addr
		if a, ok := conn.RemoteAddr().(*net.TCPAddr); ok {
			client = a.AddrPort().Addr()
		}
		target := f.rule.guestFor(client)
		go func() {
			if err := guest.ForwardTCP(conn, target); err != nil {
				log.Debug("published tcp connection", "rule", f.rule.String(), "client", conn.RemoteAddr(), "err", err)
			}
		}()
	}
}

// udpFlow is one client of a published UDP port.
type udpFlow struct {
	conn     net.Conn
	lastSeen time.Time
	// replyFrom is the control message that makes replies leave from
	// the address the client last sent to (nil: the kernel's choice).
	replyFrom []byte
}

// udpFlows are a published UDP port's clients, each with its connection
// to the guest and a goroutine relaying the guest's replies.
type udpFlows struct {
	pc    *net.UDPConn
	guest Guest
	rule  Rule
	max   int // maxUDPFlows but in tests
	mu    sync.Mutex
	m     map[netip.AddrPort]*udpFlow
	wg    sync.WaitGroup
}

// get returns client's flow, dialing the guest for a new one. At the bound
// the least recently used flow makes room: refusing new clients would let
// one host that keeps maxUDPFlows source ports busy lock every other out.
func (u *udpFlows) get(client netip.AddrPort) (*udpFlow, error) {
	u.mu.Lock()
	fl, ok := u.m[client]
	u.mu.Unlock()
	if ok {
		return fl, nil
	}
	// Without the lock: the dial may wait (the port helper, the
	// engine), and every flow's replies take the lock. Only the read
	// loop adds flows, so no other can add this one meanwhile.
	conn, err := u.guest.DialGuestUDP(client, u.rule.guestFor(client.Addr()))
	if err != nil {
		return nil, err
	}
	fl = &udpFlow{conn: conn, lastSeen: time.Now()}
	u.mu.Lock()
	if len(u.m) >= u.max {
		u.evictLocked()
	}
	u.m[client] = fl
	u.mu.Unlock()
	u.wg.Add(1)
	go func() {
		defer u.wg.Done()
		u.replies(fl, client)
	}()
	return fl, nil
}

// evictLocked ends the least recently used flow.
func (u *udpFlows) evictLocked() {
	var oldest netip.AddrPort
	var seen time.Time
	for c, fl := range u.m {
		if seen.IsZero() || fl.lastSeen.Before(seen) {
			oldest, seen = c, fl.lastSeen
		}
	}
	if fl, ok := u.m[oldest]; ok {
		delete(u.m, oldest)
		fl.conn.Close()
	}
}

// forget removes fl, if it is still client's flow.
func (u *udpFlows) forget(client netip.AddrPort, fl *udpFlow) {
	u.mu.Lock()
	if u.m[client] == fl {
		delete(u.m, client)
	}
	u.mu.Unlock()
}

// closeAll ends every flow and waits for their goroutines.
func (u *udpFlows) closeAll() {
	u.mu.Lock()
	for _, fl := range u.m {
		fl.conn.Close()
	}
	u.mu.Unlock()
	u.wg.Wait()
}

func (f *forward) serveUDP(pc *net.UDPConn, guest Guest, log *slog.Logger) {
	flows := &udpFlows{pc: pc, guest: guest, rule: f.rule, max: maxUDPFlows, m: map[netip.AddrPort]*udpFlow{}}
	defer flows.closeAll()
	rs, err := newReplySource(pc)
	if err != nil {
		log.Debug("published udp port: replies leave from the kernel's choice of address", "rule", f.rule.String(), "err", err)
	}
	var oob []byte
	if rs != nil {
		oob = make([]byte, rs.oobSize())
	}
	buf := make([]byte, 65535)
	for {
		n, oobn, _, client, err := pc.ReadMsgUDPAddrPort(buf, oob)
		if err != nil {
			if !errors.Is(err, net.ErrClosed) {
				log.Warn("published port stopped reading", "rule", f.rule.String(), "err", err)
			}
			return
		}
		client = netip.AddrPortFrom(client.Addr().Unmap(), client.Port())
		var replyFrom []byte
		if rs != nil {
			replyFrom = rs.control(oob[:oobn])
		}
		// A flow may end between the look-up and the write (idle, or
		// its guest side gone): the datagram then opens the next one.
		for range 2 {
			fl, err := flows.get(client)
			if err != nil {
				log.Debug("published udp flow", "rule", f.rule.String(), "client", client, "err", err)
				break
			}
			flows.mu.Lock()
			fl.lastSeen = time.Now()
			fl.replyFrom = replyFrom
			flows.mu.Unlock()
			if _, err := fl.conn.Write(buf[:n]); !errors.Is(err, net.ErrClosed) {
				break
			}
			flows.forget(client, fl)
		}
	}
}

// replies sends the guest's datagrams on fl back to client until the flow
// has been idle for udpFlowIdle, or is closed. An idle flow leaves the
// table in the same step that finds it idle: a datagram from the client
// either kept it or finds it gone.
func (u *udpFlows) replies(fl *udpFlow, client netip.AddrPort) {
	defer fl.conn.Close()
	defer u.forget(client, fl)
	buf := make([]byte, 65535)
	for {
		u.mu.Lock()
		deadline := fl.lastSeen.Add(udpFlowIdle)
		u.mu.Unlock()
		_ = fl.conn.SetReadDeadline(deadline)
		n, err := fl.conn.Read(buf)
		if err != nil {
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				u.mu.Lock()
				idle := time.Since(fl.lastSeen) >= udpFlowIdle
				if idle && u.m[client] == fl {
					delete(u.m, client)
				}
				u.mu.Unlock()
				if !idle {
					continue
				}
			}
			return
		}
		u.mu.Lock()
		fl.lastSeen = time.Now()
		from := fl.replyFrom
		u.mu.Unlock()
		if _, _, err := u.pc.WriteMsgUDPAddrPort(buf[:n], from, client); err != nil && from != nil {
			// The client sent to an address no reply can leave from
			// (a broadcast): the kernel picks the source instead.
			_, _, _ = u.pc.WriteMsgUDPAddrPort(buf[:n], nil, client)
		}
	}
}
