package ktcpnat

import (
	"bytes"
	"crypto/sha256"
	"errors"
	"io"
	"math/rand/v2"
	"net"
	"net/netip"
	"os"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/checksum"
	"gvisor.dev/gvisor/pkg/tcpip/header"

	"github.com/netns-run/netns-run/tap"
	"github.com/netns-run/netns-run/tap/taptest"
)

// A connection to a remote address ends at a listener in the namespace
// once the maps have the flow, with every byte intact both ways and each
// side seeing the addresses the helper chose. Its SYN and the listener's
// answer cross the TAP (the rules leave SYNs alone, and the listener's side
// is translated once the guest's side was), where the test does the
// helper's part: rewrite them and write them back. The rest never reaches
// the TAP.
func TestMapRewritesToListener(t *testing.T) {
	taptest.InFreshNetns(t, func() {
		guest := netip.MustParseAddr("10.0.2.100")
		dev, err := tap.Create("tap0", tap.Options{})
		if err != nil {
			t.Error(err)
			return
		}
		defer dev.Close()
		for _, name := range []string{"lo", "tap0"} {
			l, err := netlink.LinkByName(name)
			if err == nil {
				err = netlink.LinkSetUp(l)
			}
			if err == nil && name == "tap0" {
				err = netlink.AddrAdd(l, &netlink.Addr{IPNet: &net.IPNet{IP: guest.AsSlice(), Mask: net.CIDRMask(24, 32)}})
			}
			if err == nil && name == "tap0" {
				_, dst, _ := net.ParseCIDR("203.0.113.0/24")
				err = netlink.RouteAdd(&netlink.Route{LinkIndex: l.Attrs().Index, Dst: dst, Scope: netlink.SCOPE_LINK})
			}
			if err == nil && name == "tap0" {
				// No ARP: the SYN comes at once.
				err = netlink.NeighAdd(&netlink.Neigh{LinkIndex: l.Attrs().Index, Family: netlink.FAMILY_V4,
					State: netlink.NUD_PERMANENT, IP: net.ParseIP("203.0.113.7"), HardwareAddr: remoteMAC})
			}
			if err != nil {
				t.Errorf("set up %s: %v", name, err)
				return
			}
		}
		for _, broker := range []bool{false, true} {
			sock, err := Install()
			if err != nil {
				t.Skipf("nftables unusable here: %v", err)
			}
			var m Table = NewMap(sock)
			if broker {
				if sock, err = ServeInBackground(sock); err == nil {
					m, err = Open(sock)
				}
				if err != nil {
					t.Error(err)
					return
				}
			}
			checkRewrites(t, guest, m, dev.Queues()[0], 41000+uint16(btoi(broker)))
			m.Close()
		}
	})
}

// checkRewrites puts a flow into m and checks a connection through it, and
// takes it out.
func checkRewrites(t *testing.T, guest netip.Addr, m Table, tapQueue *os.File, clientPort uint16) {
	t.Helper()
	{
		ln, err := net.ListenTCP("tcp4", &net.TCPAddr{IP: guest.AsSlice()})
		if err != nil {
			t.Error(err)
			return
		}
		defer ln.Close()
		lnAddr := netip.AddrPortFrom(guest, uint16(ln.Addr().(*net.TCPAddr).Port))
		client := netip.AddrPortFrom(guest, clientPort)
		remote := netip.MustParseAddrPort("203.0.113.7:80")
		fake := netip.MustParseAddrPort("203.0.113.7:30000")
		f := Flow{Guest: client, Remote: remote, Fake: fake, Listener: lnAddr}
		if err := m.Add(f); err != nil {
			t.Errorf("add: %v", err)
			return
		}
		if err := m.Add(f); !errors.Is(err, unix.EEXIST) {
			t.Errorf("adding the same flow twice: %v, want EEXIST", err)
		}
		go forwardHandshake(tapQueue, f)
		tapSent := func() uint64 {
			l, err := netlink.LinkByName("tap0")
			if err != nil {
				t.Fatal(err)
			}
			return l.Attrs().Statistics.TxBytes
		}
		accepted := make(chan *net.TCPConn, 1)
		go func() {
			c, err := ln.AcceptTCP()
			if err == nil {
				accepted <- c
			}
			close(accepted)
		}()
		d := net.Dialer{LocalAddr: net.TCPAddrFromAddrPort(client), Timeout: 3 * time.Second}
		cc, err := d.Dial("tcp4", remote.String())
		if err != nil {
			t.Errorf("dial through the map: %v", err)
			return
		}
		c := cc.(*net.TCPConn)
		defer c.Close()
		s, ok := <-accepted
		if !ok {
			t.Error("the listener accepted nothing")
			return
		}
		defer s.Close()
		if got := s.RemoteAddr().(*net.TCPAddr).AddrPort(); got != fake {
			t.Errorf("listener sees peer %v, want %v", got, fake)
		}
		if got := c.RemoteAddr().(*net.TCPAddr).AddrPort(); got != remote {
			t.Errorf("client sees peer %v, want %v", got, remote)
		}
		sentBefore := tapSent()
		payload := make([]byte, 4<<20)
		for i := range payload {
			payload[i] = byte(rand.Uint32())
		}
		want := sha256.Sum256(payload)
		go func() {
			c.Write(payload)
			c.CloseWrite()
		}()
		deadline := time.Now().Add(10 * time.Second)
		s.SetDeadline(deadline)
		got, err := io.ReadAll(s)
		if err != nil || sha256.Sum256(got) != want {
			t.Errorf("guest -> listener: %d of %d bytes, err %v, intact %v", len(got), len(payload), err, sha256.Sum256(got) == want)
		}
		go func() {
			s.Write(payload[:1<<20])
			s.CloseWrite()
		}()
		c.SetDeadline(deadline)
		back, err := io.ReadAll(c)
		if err != nil || !bytes.Equal(back, payload[:1<<20]) {
			t.Errorf("listener -> guest: %d of %d bytes, err %v", len(back), 1<<20, err)
		}
		if sent := tapSent() - sentBefore; sent > 64<<10 {
			t.Errorf("%d bytes left through the TAP during 5 MiB of transfers", sent)
		}
		if err := m.Remove(f, Both); err != nil {
			t.Errorf("remove: %v", err)
		}
		if err := m.Remove(f, Both); err != nil {
			t.Errorf("removing what is gone: %v", err)
		}
		v6 := f
		v6.Remote = netip.MustParseAddrPort("[2001:db8::1]:2")
		if err := m.Add(v6); err != ErrUnsupported {
			t.Errorf("an IPv6 flow: %v, want ErrUnsupported", err)
		}
	}
}

// A broker takes well-formed requests only (the sandbox it serves may be
// hostile): whatever comes, no panic, and what parses encodes back the same.
func FuzzParseRequest(f *testing.F) {
	flow := Flow{Guest: netip.MustParseAddrPort("10.0.2.100:41000"), Remote: netip.MustParseAddrPort("203.0.113.7:80"),
		Fake: netip.MustParseAddrPort("203.0.113.7:30000"), Listener: netip.MustParseAddrPort("10.0.2.100:5000")}
	f.Add(appendRequest(nil, opAdd, flow, Both))
	f.Add(appendRequest(nil, opRemove, flow, Back))
	f.Add(appendRequest(nil, opAdd, flow, Out))
	f.Add([]byte{opAdd, 3})
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, b []byte) {
		op, flow, p, err := parseRequest(b)
		if err != nil {
			return
		}
		if out := appendRequest(nil, op, flow, p); !bytes.Equal(out, b) {
			t.Errorf("parsed %x as %v %v, which encodes as %x", b, flow, p, out)
		}
	})
}

func btoi(b bool) int {
	if b {
		return 1
	}
	return 0
}

var remoteMAC = net.HardwareAddr{0x02, 0, 0, 0, 0, 7}

// forwardHandshake does the helper's part for one connection: the guest's
// SYN goes to the listener as from the fake address, and the listener's
// SYN-ACK back to the guest as from the remote one (both rewritten and
// written back into the TAP); it returns once both went, or the TAP closed.
func forwardHandshake(q *os.File, f Flow) {
	buf := make([]byte, 65536)
	for done := 0; done < 2; {
		n, err := q.Read(buf)
		if err != nil {
			return
		}
		fr := buf[:n]
		if len(fr) < header.EthernetMinimumSize+header.IPv4MinimumSize+header.TCPMinimumSize ||
			header.Ethernet(fr).Type() != header.IPv4ProtocolNumber {
			continue
		}
		ip := header.IPv4(fr[header.EthernetMinimumSize:])
		tcp := header.TCP(ip[ip.HeaderLength():])
		if ip.Protocol() != uint8(header.TCPProtocolNumber) || tcp.Flags()&header.TCPFlagSyn == 0 {
			continue
		}
		from := netip.AddrPortFrom(netip.AddrFrom4(ip.SourceAddress().As4()), tcp.SourcePort())
		var src, dst netip.AddrPort
		switch from {
		case f.Guest:
			src, dst = f.Fake, f.Listener
		case f.Listener:
			src, dst = f.Remote, f.Guest
		default:
			continue
		}
		s4, d4 := tcpip.AddrFrom4(src.Addr().As4()), tcpip.AddrFrom4(dst.Addr().As4())
		copy(fr[0:6], fr[6:12])
		copy(fr[6:12], remoteMAC)
		ip.SetSourceAddress(s4)
		ip.SetDestinationAddress(d4)
		ip.SetChecksum(0)
		ip.SetChecksum(^ip.CalculateChecksum())
		tcp.SetSourcePort(src.Port())
		tcp.SetDestinationPort(dst.Port())
		tcp.SetChecksum(0)
		sum := header.PseudoHeaderChecksum(header.TCPProtocolNumber, s4, d4, uint16(len(tcp)))
		tcp.SetChecksum(^tcp.CalculateChecksum(checksum.Checksum(tcp.Payload(), sum)))
		_, _ = q.Write(fr)
		done++
	}
}
