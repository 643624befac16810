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
	// datagram from a new client beyond it is dropped.
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

func (f *forward) serveUDP(pc *net.UDPConn, guest Guest, log *slog.Logger) {
	var mu sync.Mutex
	flows := map[netip.AddrPort]*udpFlow{}
	var wg sync.WaitGroup
	defer func() {
		mu.Lock()
		for _, fl := range flows {
			fl.conn.Close()
		}
		mu.Unlock()
		wg.Wait()
	}()
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
		mu.Lock()
		fl, ok := flows[client]
		if !ok {
			if len(flows) >= maxUDPFlows {
				mu.Unlock()
				log.Debug("published udp port: flow table full; dropping", "rule", f.rule.String(), "client", client)
				continue
			}
			conn, err := guest.DialGuestUDP(client, f.rule.guestFor(client.Addr()))
			if err != nil {
				mu.Unlock()
				log.Debug("published udp flow", "rule", f.rule.String(), "client", client, "err", err)
				continue
			}
			fl = &udpFlow{conn: conn}
			flows[client] = fl
			wg.Add(1)
			go func() {
				defer wg.Done()
				replyUDP(pc, fl, client, &mu)
				mu.Lock()
				if flows[client] == fl {
					delete(flows, client)
				}
				mu.Unlock()
			}()
		}
		fl.lastSeen = time.Now()
		if rs != nil {
			fl.replyFrom = rs.control(oob[:oobn])
		}
		mu.Unlock()
		_, _ = fl.conn.Write(buf[:n])
	}
}

// replyUDP sends the guest's datagrams back to client until the flow has
// been idle for udpFlowIdle.
func replyUDP(pc *net.UDPConn, fl *udpFlow, client netip.AddrPort, mu *sync.Mutex) {
	defer fl.conn.Close()
	buf := make([]byte, 65535)
	for {
		mu.Lock()
		deadline := fl.lastSeen.Add(udpFlowIdle)
		mu.Unlock()
		_ = fl.conn.SetReadDeadline(deadline)
		n, err := fl.conn.Read(buf)
		if err != nil {
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				mu.Lock()
				idle := time.Since(fl.lastSeen) >= udpFlowIdle
				mu.Unlock()
				if !idle {
					continue
				}
			}
			return
		}
		mu.Lock()
		fl.lastSeen = time.Now()
		from := fl.replyFrom
		mu.Unlock()
		if _, _, err := pc.WriteMsgUDPAddrPort(buf[:n], from, client); err != nil && from != nil {
			// The client sent to an address no reply can leave from
			// (a broadcast): the kernel picks the source instead.
			_, _, _ = pc.WriteMsgUDPAddrPort(buf[:n], nil, client)
		}
	}
}
