package netstack

import (
	"encoding/binary"
	"errors"
	"net"
	"net/netip"
	"os"
	"testing"
	"time"

	"golang.org/x/sys/unix"
	"gvisor.dev/gvisor/pkg/tcpip/checksum"
	"gvisor.dev/gvisor/pkg/tcpip/header"
)

// hostPinger sends echo requests to 127.0.0.1 from a raw socket of the
// test's own, as another program on the host would; it needs CAP_NET_RAW.
func hostPinger(t *testing.T, ident uint16) (send func(), fd int) {
	t.Helper()
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.IPPROTO_ICMP)
	if err != nil {
		t.Skipf("needs a raw ICMP socket (CAP_NET_RAW): %v", err)
	}
	t.Cleanup(func() { unix.Close(fd) })
	var seq uint16
	return func() {
		seq++
		msg := make([]byte, 8)
		msg[0] = byte(header.ICMPv4Echo)
		binary.BigEndian.PutUint16(msg[4:], ident)
		binary.BigEndian.PutUint16(msg[6:], seq)
		binary.BigEndian.PutUint16(msg[2:], ^checksum.Checksum(msg, 0))
		if err := unix.Sendto(fd, msg, 0, &unix.SockaddrInet4{Addr: [4]byte{127, 0, 0, 1}}); err != nil {
			t.Error(err)
		}
	}, fd
}

// A raw ping flow's socket sees its own replies only, not those of other
// programs on the host (nor the echo requests the host receives).
func TestRawPingSocketIsFiltered(t *testing.T) {
	other, _ := hostPinger(t, 0x1111)
	mine, _ := hostPinger(t, 0x4242)
	f, err := openPingFlow(pingKey{DefaultGuestAddr, 7}, false, pingRaw, 0x4242, netip.Addr{})
	if err != nil {
		t.Fatal(err)
	}
	defer f.file.Close()
	other()
	mine()
	other()
	buf := make([]byte, 65536)
	var got []uint16
	_ = f.file.SetReadDeadline(time.Now().Add(500 * time.Millisecond))
	for {
		var n int
		var rerr error
		err := f.rc.Read(func(fd uintptr) bool {
			n, _, rerr = unix.Recvfrom(int(fd), buf, unix.MSG_DONTWAIT)
			return !errors.Is(rerr, unix.EAGAIN)
		})
		if err != nil {
			break
		}
		if rerr == nil && n >= header.IPv4MinimumSize+8 {
			icmp := buf[header.IPv4(buf).HeaderLength():n]
			got = append(got, uint16(icmp[0])<<8|uint16(binary.BigEndian.Uint16(icmp[4:])&0xff))
		}
	}
	// One echo reply (type 0) for ident 0x4242: 0x0042.
	if len(got) != 1 || got[0] != 0x0042 {
		t.Errorf("the flow's socket received %04x (type<<8 | ident&0xff), want only its own reply 0042", got)
	}
}

// A ping flow expires on its own activity: other programs pinging on the
// host used to keep every raw-socket flow alive forever.
func TestPingFlowExpiresWhileHostPings(t *testing.T) {
	other, _ := hostPinger(t, 0x5151)
	s, _ := stackOnSocketpair(t, withLimits(func(l *limits) {
		l.ping = flowTimeouts{unreplied: 300 * time.Millisecond, replied: 300 * time.Millisecond, assured: 300 * time.Millisecond}
	}), 0)
	if s.ping.mode4 == pingNone {
		t.Skip("no ICMP socket for outside pings")
	}
	// The stack drops guest packets to loopback addresses as martians,
	// and no other destination may be pinged from a test: open the flow
	// as the first echo request from the guest would.
	if _, err := s.ping.flow(pingKey{DefaultGuestAddr, 7}, false, s.ping.mode4); err != nil {
		t.Fatal(err)
	}
	stop := make(chan struct{})
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			select {
			case <-stop:
				return
			case <-time.After(20 * time.Millisecond):
				other()
			}
		}
	}()
	defer func() {
		close(stop)
		<-done
	}()
	eventually(t, "the ping flow expires", func() bool { return s.ping.table.len() == 0 && s.counters.icmpOpen.Load() == 0 })
}

// Sending an echo request never waits for the socket: it runs on the TAP
// reader. (A TCP socket whose peer does not read stands in for an ICMP
// socket whose buffer is full; sendto ignores the address there.)
func TestPingSendDoesNotWait(t *testing.T) {
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	c, err := net.Dial("tcp4", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	srv, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Close()
	rc, err := c.(*net.TCPConn).SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var fd int
	var derr error
	if err := rc.Control(func(s uintptr) { fd, derr = unix.Dup(int(s)) }); err != nil || derr != nil {
		t.Fatal(err, derr)
	}
	if err := unix.SetNonblock(fd, true); err != nil {
		t.Fatal(err)
	}
	for {
		if _, err := unix.Write(fd, make([]byte, 1<<16)); err != nil {
			break // full
		}
	}
	f := &pingFlow{key: pingKey{DefaultGuestAddr, 1}, mode: pingRaw, file: os.NewFile(uintptr(fd), "full")}
	defer f.file.Close()
	if f.rc, err = f.file.SyscallConn(); err != nil {
		t.Fatal(err)
	}
	// Before, send waited for room until a 1 s write deadline.
	err = f.send(netip.MustParseAddr("127.0.0.1"), 1, 64, make([]byte, 56))
	if !errors.Is(err, unix.EAGAIN) || errors.Is(err, os.ErrDeadlineExceeded) {
		t.Errorf("send on a full socket: %v, want EAGAIN without waiting", err)
	}
}
