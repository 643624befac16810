package portfwd

import (
	"errors"
	"net"
	"net/netip"
	"strings"
	"syscall"
	"testing"
	"time"
)

// recordingGuest reports the guest address each forwarded flow was sent to.
type recordingGuest struct{ targets chan netip.AddrPort }

func (g recordingGuest) ForwardTCP(c *net.TCPConn, guest netip.AddrPort) error {
	c.Close()
	g.targets <- guest
	return nil
}

func (g recordingGuest) DialGuestUDP(_, guest netip.AddrPort) (net.Conn, error) {
	g.targets <- guest
	return nil, errors.New("recorded")
}

// TestGuestByClientFamily: a rule with an IPv6 guest address sends IPv6
// clients there and IPv4 clients (also through a dual-stack listener, as
// IPv4-mapped addresses) to its IPv4 guest address.
func TestGuestByClientFamily(t *testing.T) {
	if ln, err := net.Listen("tcp6", "[::1]:0"); err != nil {
		t.Skip("no IPv6 loopback:", err)
	} else {
		ln.Close()
	}
	g := recordingGuest{targets: make(chan netip.AddrPort, 1)}
	m := New(g, nil)
	t.Cleanup(func() { m.Close() })
	v4, v6 := netip.MustParseAddr("10.0.2.100"), netip.MustParseAddr("fd00::100")
	for _, proto := range []string{"tcp", "udp"} {
		port := uint16(freePort(t))
		if _, err := m.Add(Rule{Proto: proto, HostPort: port, GuestAddr: v4, GuestPort: 80, GuestAddr6: v6}); err != nil {
			t.Fatal(err)
		}
		for _, c := range []struct {
			client string
			want   netip.Addr
		}{{"127.0.0.1", v4}, {"::1", v6}} {
			conn, err := net.Dial(proto, net.JoinHostPort(c.client, itoa(int(port))))
			if err != nil {
				t.Fatal(err)
			}
			_, _ = conn.Write([]byte("x"))
			select {
			case got := <-g.targets:
				if got != netip.AddrPortFrom(c.want, 80) {
					t.Errorf("%s client %s went to %s, want %s", proto, c.client, got, c.want)
				}
			case <-time.After(5 * time.Second):
				t.Errorf("%s client %s: no flow reached the guest", proto, c.client)
			}
			conn.Close()
		}
	}
}

// TestAPIDefaultGuest6: a rule added without guest_addr sends IPv6 clients
// to the default IPv6 guest address; one that names a guest address keeps
// that address for every client, and list_hostfwd stays as slirp4netns has
// it.
func TestAPIDefaultGuest6(t *testing.T) {
	a := newTestAPI(t)
	a.AllowIPv6()
	a.SetDefaultGuest6(netip.MustParseAddr("fd00::100"))
	p1, p2 := itoa(freePort(t)), itoa(freePort(t))
	for _, req := range []string{
		`{"execute":"add_hostfwd","arguments":{"proto":"tcp","host_addr":"127.0.0.1","host_port":` + p1 + `,"guest_port":80}}`,
		`{"execute":"add_hostfwd","arguments":{"proto":"tcp","host_addr":"127.0.0.1","host_port":` + p2 + `,"guest_addr":"fd00::5","guest_port":80}}`,
	} {
		if got := string(a.Handle([]byte(req))); !strings.HasPrefix(got, `{"return":`) {
			t.Fatalf("%s: %s", req, got)
		}
	}
	l := a.ports.List()
	if l[0].GuestAddr6 != netip.MustParseAddr("fd00::100") || l[1].GuestAddr6.IsValid() || l[1].GuestAddr != netip.MustParseAddr("fd00::5") {
		t.Errorf("rules: %+v", l)
	}
	want := `{"entries":[{"id":1,"proto":"tcp","host_addr":"127.0.0.1","host_port":` + p1 + `,"guest_addr":"10.0.2.100","guest_port":80},` +
		`{"id":2,"proto":"tcp","host_addr":"127.0.0.1","host_port":` + p2 + `,"guest_addr":"fd00::5","guest_port":80}]}`
	if got := string(a.Handle([]byte(`{"execute":"list_hostfwd"}`))); got != want {
		t.Errorf("list:\n got %s\nwant %s", got, want)
	}
}

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

// A client that sent to a broadcast address gets its reply, from an
// address of the host's: no reply can leave from the broadcast address.
func TestPublishedUDPAnswersBroadcast(t *testing.T) {
	for _, host := range []netip.Addr{netip.IPv4Unspecified(), {}} {
		ports := New(echoGuest{startUDPEcho(t)}, nil)
		port := freePort(t)
		if _, err := ports.Add(Rule{Proto: "udp", HostAddr: host, HostPort: uint16(port),
			GuestAddr: netip.MustParseAddr("10.0.2.100"), GuestPort: 53}); err != nil {
			t.Fatal(err)
		}
		c, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
		if err != nil {
			t.Fatal(err)
		}
		rc, err := c.SyscallConn()
		if err != nil {
			t.Fatal(err)
		}
		_ = rc.Control(func(fd uintptr) { _ = syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_BROADCAST, 1) })
		_ = c.SetDeadline(time.Now().Add(5 * time.Second))
		if _, err := c.WriteToUDP([]byte("hello"), &net.UDPAddr{IP: net.IPv4(127, 255, 255, 255), Port: port}); err != nil {
			t.Fatal(err)
		}
		if _, _, err := c.ReadFromUDP(make([]byte, 16)); err != nil {
			t.Errorf("listening on %v: no reply to a broadcast: %v", host, err)
		}
		c.Close()
		ports.Close()
	}
}

// One host port may be published once per family's wildcard, as the kernel
// allows (an IPv6 listener is IPv6-only); what would take the same
// connections is refused.
func TestPublishSamePortPerFamily(t *testing.T) {
	if ln, err := net.Listen("tcp6", "[::1]:0"); err != nil {
		t.Skip("no IPv6 here")
	} else {
		ln.Close()
	}
	m := New(nullGuest{}, nil)
	defer m.Close()
	port := uint16(freePort(t))
	add := func(host string) error {
		var a netip.Addr
		if host != "" {
			a = netip.MustParseAddr(host)
		}
		_, err := m.Add(Rule{Proto: "tcp", HostAddr: a, HostPort: port, GuestAddr: netip.MustParseAddr("10.0.2.100"), GuestPort: 80})
		return err
	}
	for _, c := range []struct {
		host string
		ok   bool
	}{{"0.0.0.0", true}, {"::", true}, {"127.0.0.1", false}, {"::1", false}, {"", false}, {"0.0.0.0", false}} {
		if err := add(c.host); (err == nil) != c.ok {
			t.Errorf("publish %q: %v, want ok %v", c.host, err, c.ok)
		}
	}
}

// At the bound a new client takes the place of the least recently used one
// (whose flow ends), and one whose flow ended gets a new one.
func TestPublishedUDPFlowsMakeRoom(t *testing.T) {
	pc, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer pc.Close()
	u := &udpFlows{pc: pc, guest: echoGuest{startUDPEcho(t)}, max: 2, m: map[netip.AddrPort]*udpFlow{}}
	defer u.closeAll()
	client := func(port uint16) netip.AddrPort { return netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), port) }
	first, err := u.get(client(1))
	if err != nil {
		t.Fatal(err)
	}
	u.mu.Lock()
	first.lastSeen = time.Now().Add(-time.Minute)
	u.mu.Unlock()
	for _, p := range []uint16{2, 3} {
		if _, err := u.get(client(p)); err != nil {
			t.Fatal(err)
		}
	}
	u.mu.Lock()
	_, kept := u.m[client(1)]
	n := len(u.m)
	u.mu.Unlock()
	if kept || n != 2 {
		t.Errorf("after a third client: the first kept %v, %d flows; want it gone, 2", kept, n)
	}
	if _, err := first.conn.Write([]byte("x")); !errors.Is(err, net.ErrClosed) {
		t.Errorf("the evicted flow's connection: %v, want closed", err)
	}
	if again, err := u.get(client(1)); err != nil || again == first {
		t.Errorf("the evicted client again: %v, same flow %v", err, again == first)
	}
}
