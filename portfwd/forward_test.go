package portfwd

import (
	"errors"
	"net"
	"net/netip"
	"strings"
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
