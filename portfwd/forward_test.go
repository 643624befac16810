package portfwd

import (
	"net"
	"net/netip"
	"testing"
	"time"
)

// echoGuest delivers published UDP flows to an echo server on loopback.
type echoGuest struct{ echo netip.AddrPort }

func (echoGuest) ForwardTCP(c *net.TCPConn, _ netip.AddrPort) error { c.Close(); return nil }
func (g echoGuest) DialGuestUDP(_, _ netip.AddrPort) (net.Conn, error) {
	return net.DialUDP("udp4", nil, net.UDPAddrFromAddrPort(g.echo))
}

func startUDPEcho(t *testing.T) netip.AddrPort {
	t.Helper()
	c, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	go func() {
		buf := make([]byte, 65536)
		for {
			n, from, err := c.ReadFromUDPAddrPort(buf)
			if err != nil {
				return
			}
			_, _ = c.WriteToUDPAddrPort(buf[:n], from)
		}
	}()
	return c.LocalAddr().(*net.UDPAddr).AddrPort()
}

// A published UDP port on a wildcard address answers from the address the
// client sent to: 127.0.0.2 here, where the kernel's choice by route would
// be 127.0.0.1 and the client's connected socket would drop the reply (as
// on a host with several addresses).
func TestPublishedUDPRepliesFromAddressUsed(t *testing.T) {
	ports := New(echoGuest{startUDPEcho(t)}, nil)
	t.Cleanup(func() { ports.Close() })
	for name, hostAddr := range map[string]netip.Addr{"all addresses": {}, "0.0.0.0": netip.IPv4Unspecified()} {
		port := freePort(t)
		if _, err := ports.Add(Rule{Proto: "udp", HostAddr: hostAddr, HostPort: uint16(port),
			GuestAddr: netip.MustParseAddr("10.0.2.100"), GuestPort: 53}); err != nil {
			t.Fatal(err)
		}
		c, err := net.DialUDP("udp4", nil, &net.UDPAddr{IP: net.IPv4(127, 0, 0, 2), Port: port})
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		_ = c.SetDeadline(time.Now().Add(2 * time.Second))
		if _, err := c.Write([]byte("hello")); err != nil {
			t.Fatal(err)
		}
		if _, err := c.Read(make([]byte, 16)); err != nil {
			t.Errorf("published on %s: no reply from 127.0.0.2: %v", name, err)
		}
	}
}
