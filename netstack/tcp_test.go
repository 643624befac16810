package netstack

import (
	"errors"
	"net"
	"net/netip"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sys/unix"
	"gvisor.dev/gvisor/pkg/tcpip/stack"

	"github.com/netns-run/netns-run/netstack/sockrelay/relaytest"
)

// A SYN the guest resends while the host-side dial is slow leaves no note
// behind: the note is taken after the dial. (Before, it was taken first,
// the resent SYN noted it again and nothing took it; 8192 such notes and no
// new flow got one.)
func TestSlowDialLeavesNoNote(t *testing.T) {
	// A listener whose accept queue is full drops SYNs: the dial waits
	// for the kernel's SYN retransmission.
	fd, listener := relaytest.FullListener(t)

	s, peer := stackOnSocketpair(t, DefaultConfig(), 0)
	syn := synFrame(netip.MustParseAddrPort("10.0.2.100:40000"), netip.AddrPortFrom(DefaultGateway, listener.Port()))
	if _, err := unix.Write(peer, syn); err != nil {
		t.Fatal(err)
	}
	// The forwarder holds the flow's slot from before its dial until
	// after: the resend below comes while the dial waits. (Waiting for
	// the kernel's count of dropped SYNs instead, namespace-wide, timed
	// out now and then while the integration tests ran alongside.)
	eventually(t, "the forwarder dials", func() bool { return s.counters.tcpOpen.Load() > 0 })
	if _, err := unix.Write(peer, syn); err != nil { // the guest resends
		t.Fatal(err)
	}
	// Room in the queue: the kernel's next SYN gets through. (The
	// runtime's preemption signal interrupts a blocking accept.)
	accept := func() (int, error) {
		for {
			nfd, _, err := unix.Accept(fd)
			if err != unix.EINTR {
				return nfd, err
			}
		}
	}
	nfd, err := accept()
	if err != nil {
		t.Fatal(err)
	}
	unix.Close(nfd)
	_ = unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &unix.Timeval{Sec: 20})
	if nfd, err = accept(); err != nil {
		t.Fatalf("the dial did not complete: %v", err)
	}
	unix.Close(nfd)
	eventually(t, "no first-packet note is left", func() bool { return s.firstPackets.len() == 0 })
}

// New notes always find room: the oldest make way.
func TestFirstPacketNotesMakeRoom(t *testing.T) {
	var n firstPacketNotes
	id := func(i int) stack.TransportEndpointID {
		return stack.TransportEndpointID{LocalPort: uint16(i), RemotePort: uint16(i >> 16)}
	}
	for i := 0; i < maxPendingFirst+10; i++ {
		n.put(id(i), firstPacket{ttl: 64})
	}
	if got := n.len(); got != maxPendingFirst {
		t.Errorf("%d notes, bound %d", got, maxPendingFirst)
	}
	if _, ok := n.take(id(maxPendingFirst + 9)); !ok {
		t.Error("the newest note was not kept")
	}
	if _, ok := n.take(id(0)); ok {
		t.Error("the oldest note was kept past the bound")
	}
}

// SYNs being dialed count against the flow limit: the check used to run
// before the flow was counted, so every SYN in flight got past it.
func TestTCPFlowLimitCountsDials(t *testing.T) {
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	var accepted atomic.Int64
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			accepted.Add(1)
			defer c.Close()
		}
	}()
	s, peer := stackOnSocketpair(t, withLimits(func(l *limits) { l.tcpFlows = 2 }), 0)
	dst := netip.AddrPortFrom(DefaultGateway, uint16(ln.Addr().(*net.TCPAddr).Port))
	for i := 0; i < 10; i++ {
		if _, err := unix.Write(peer, synFrame(netip.AddrPortFrom(DefaultGuestAddr, uint16(41000+i)), dst)); err != nil {
			t.Fatal(err)
		}
	}
	eventually(t, "8 SYNs refused and 2 dialed", func() bool { return s.counters.dropFlowLimit.Load() == 8 && accepted.Load() == 2 })
	if n := s.counters.tcpOpen.Load(); n > 2 {
		t.Errorf("%d TCP flows with a limit of 2", n)
	}
}

// The stack's side of a guest connection probes an idle guest, and a guest
// that stopped answering loses the flow: the host side is reset instead of
// waiting forever.
func TestKeepaliveEndsFlowOfVanishedGuest(t *testing.T) {
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	_, _, g := withGuest(t, withLimits(func(l *limits) {
		l.keepalive = tcpKeepalive{idle: 200 * time.Millisecond, interval: 100 * time.Millisecond, count: 2}
	}))
	guestDialTCP(t, g.gs, netip.AddrPortFrom(DefaultGateway, uint16(ln.Addr().(*net.TCPAddr).Port)))
	host, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	defer host.Close()
	// The guest vanishes without a word.
	if terr := g.gs.DisableNIC(1); terr != nil {
		t.Fatal(terr)
	}
	_ = host.SetReadDeadline(time.Now().Add(20 * time.Second))
	_, err = host.Read(make([]byte, 1))
	var ne net.Error
	if err == nil || errors.As(err, &ne) && ne.Timeout() {
		t.Fatalf("host side still open 20 s after the guest vanished (read: %v)", err)
	}
}
