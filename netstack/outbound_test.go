package netstack

import (
	"net"
	"net/netip"
	"testing"

	"golang.org/x/sys/unix"
)

// DNS upstream sockets and ping sockets leave from --outbound-addr, like
// every other host socket; they used to let the kernel choose.
func TestOutboundAddrForDNSAndPing(t *testing.T) {
	outbound := netip.MustParseAddr("127.0.0.2") // loopback: all of 127/8 is local
	pc, ln := listenUDPAndTCP(t)
	defer pc.Close()
	defer ln.Close()
	upstream := pc.LocalAddr().(*net.UDPAddr).AddrPort()
	udpFrom := make(chan netip.Addr, 1)
	go func() {
		buf := make([]byte, 65536)
		n, from, err := pc.ReadFromUDPAddrPort(buf)
		if err != nil {
			return
		}
		udpFrom <- from.Addr()
		buf[2] |= 0x80
		_, _ = pc.WriteToUDPAddrPort(buf[:n], from)
	}()
	tcpFrom := make(chan netip.Addr, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		tcpFrom <- c.RemoteAddr().(*net.TCPAddr).AddrPort().Addr()
		c.Close()
	}()

	cfg := DefaultConfig()
	cfg.DNSUpstreams = []netip.AddrPort{upstream}
	cfg.OutboundAddr4 = outbound
	s, _, g := withGuest(t, cfg)
	if m := g.exchange("f.example.test", 5); m == nil {
		t.Fatal("no answer")
	}
	if got := <-udpFrom; got != outbound {
		t.Errorf("DNS over UDP left from %v, want %v", got, outbound)
	}
	guestDialTCP(t, g.gs, netip.AddrPortFrom(DefaultDNS, 53))
	if got := <-tcpFrom; got != outbound {
		t.Errorf("DNS over TCP left from %v, want %v", got, outbound)
	}

	if s.ping.mode4 == pingNone {
		t.Skip("no ICMP socket for outside pings")
	}
	f, err := s.ping.flow(pingKey{DefaultGuestAddr, 7}, false, s.ping.mode4)
	if err != nil {
		t.Fatal(err)
	}
	var sa unix.Sockaddr
	var serr error
	if err := f.rc.Control(func(fd uintptr) { sa, serr = unix.Getsockname(int(fd)) }); err != nil || serr != nil {
		t.Fatal(err, serr)
	}
	if got := sockaddrAddr(sa); got != outbound {
		t.Errorf("ping socket bound to %v, want %v", got, outbound)
	}
}
