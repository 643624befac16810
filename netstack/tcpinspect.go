package netstack

import (
	"bytes"
	"errors"
	"net"
	"net/netip"
	"time"

	"golang.org/x/sys/unix"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/transport/tcp"
	"gvisor.dev/gvisor/pkg/waiter"

	"github.com/netns-run/netns-run/netstack/egress"
)

// A TCP flow allowed only because its address was resolved from an
// allowed name may be for another name the same server hosts (a CDN). Its
// first bytes decide: the guest's handshake is completed, what it sends
// first is read, and only a TLS ClientHello naming an allowed name pinned
// to the address (or an HTTP request with such a Host, or another
// protocol) gets the host dialed; the rest are reset before any byte
// leaves.

const (
	// inspectFirstWait is how long the guest has to speak before the
	// host is dialed anyway: in some protocols the server speaks first
	// (SMTP, SSH banners). The guest's first bytes are still checked
	// when they come, unless the server's came first.
	inspectFirstWait = 300 * time.Millisecond
	// inspectTimeout bounds the wait for the rest of a ClientHello or
	// request head once it has started.
	inspectTimeout = 10 * time.Second
)

// serveInspected serves a flow that Decide marked for inspection.
func (s *Stack) serveInspected(r *tcp.ForwarderRequest, src, dst netip.AddrPort, d egress.Decision) {
	s.takeFirstPacket(r.ID())
	var wq waiter.Queue
	ep, terr := r.CreateEndpoint(&wq)
	if terr != nil {
		s.log.Debug("tcp handshake with guest failed", "src", src, "dst", dst, "err", terr)
		r.Complete(true)
		return
	}
	r.Complete(false)
	if err := s.lim.keepalive.set(ep); err != nil {
		s.log.Debug("tcp keepalive", "src", src, "dst", dst, "err", err)
	}
	g := guestConn{ep: ep, wq: &wq}
	first, host, err := s.inspectFirst(g, dst, &d)
	if err == nil && d.Allowed {
		defer s.egress.Hold(d)()
		if host == nil {
			host, err = s.dialTCP(dst)
		}
		if err == nil && len(first) > 0 {
			_, err = host.Write(first)
		}
		if err == nil {
			s.relayFlow(g, host, src, dst, len(first))
			return
		}
	}
	s.log.Debug("tcp flow refused after its first bytes", "src", src, "dst", dst, "allowed", d.Allowed, "err", err)
	if host != nil {
		_ = host.SetLinger(0)
		host.Close()
	}
	ep.Abort()
	ep.Close()
}

var errGuestGone = errors.New("guest reset the connection")

// inspectFirst reads the guest's first bytes until the policy has decided
// on them (d.Allowed). It returns what it read and, if the guest was slow
// to speak, the host connection dialed meanwhile.
func (s *Stack) inspectFirst(g guestConn, dst netip.AddrPort, d *egress.Decision) (first []byte, host *net.TCPConn, err error) {
	entry, readable := waiter.NewChannelEntry(waiter.ReadableEvents | waiter.EventHUp | waiter.EventErr)
	g.wq.EventRegister(&entry)
	defer g.wq.EventUnregister(&entry)
	var buf bytes.Buffer
	slow := time.NewTimer(inspectFirstWait)
	defer slow.Stop()
	var stalled <-chan time.Time // armed once the first bytes came
	var hostSpoke <-chan struct{}
	defer func() {
		if host != nil {
			stopPeek(host, hostSpoke)
		}
	}()
	for {
		_, terr := g.ep.Read(&buf, tcpip.ReadOptions{})
		final := false
		switch terr.(type) {
		case nil, *tcpip.ErrWouldBlock:
		case *tcpip.ErrClosedForReceive:
			final = true
		default:
			return nil, host, errGuestGone
		}
		if (buf.Len() > 0 || final) && s.egress.Inspect(d, buf.Bytes(), final || buf.Len() >= egress.MaxFirstBytes) {
			return buf.Bytes(), host, nil
		}
		if terr == nil {
			continue
		}
		if buf.Len() > 0 && stalled == nil {
			t := time.NewTimer(inspectTimeout)
			defer t.Stop()
			stalled = t.C
		}
		select {
		case <-readable:
		case <-slow.C:
			if buf.Len() == 0 {
				if host, err = s.dialTCP(dst); err != nil {
					return nil, nil, err
				}
				hostSpoke = peekReadable(host)
			}
		case <-hostSpoke:
			// The server spoke first: not a client-first protocol
			// like TLS or HTTP, and the pin alone decides (unless
			// the guest had begun one).
			s.egress.Inspect(d, buf.Bytes(), true)
			return buf.Bytes(), host, nil
		case <-stalled:
			s.egress.Inspect(d, buf.Bytes(), true)
			return buf.Bytes(), host, nil
		case <-s.ctx.Done():
			return nil, host, s.ctx.Err()
		}
	}
}

// peekReadable returns a channel closed once host has something to read
// (data, its FIN or an error), or once stopPeek ends the wait.
func peekReadable(host *net.TCPConn) <-chan struct{} {
	done := make(chan struct{})
	rc, err := host.SyscallConn()
	if err != nil {
		close(done)
		return done
	}
	go func() {
		defer close(done)
		_ = rc.Read(func(fd uintptr) bool {
			var b [1]byte
			_, _, err := unix.Recvfrom(int(fd), b[:], unix.MSG_PEEK|unix.MSG_DONTWAIT)
			return err != unix.EAGAIN
		})
	}()
	return done
}

// stopPeek ends peekReadable's wait on host, if it still waits, and puts
// the socket back to reading without a deadline.
func stopPeek(host *net.TCPConn, done <-chan struct{}) {
	if done == nil {
		return
	}
	_ = host.SetReadDeadline(time.Unix(1, 0))
	<-done
	_ = host.SetReadDeadline(time.Time{})
}
