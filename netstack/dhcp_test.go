package netstack

import (
	"net"
	"net/netip"
	"testing"
	"time"

	"github.com/insomniacslk/dhcp/dhcpv4"
	"golang.org/x/sys/unix"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/checksum"
	"gvisor.dev/gvisor/pkg/tcpip/header"
)

func testMAC(n byte) net.HardwareAddr { return net.HardwareAddr{0x02, 0, 0, 0, 0, n} }

// exchange sends req to d through the wire format and parses the reply
// (nil: none).
func exchange(t *testing.T, d *dhcpServer, req *dhcpv4.DHCPv4) *dhcpv4.DHCPv4 {
	t.Helper()
	b, err := d.answer(req.ToBytes())
	if err != nil {
		t.Fatalf("answer %s: %v", req.MessageType(), err)
	}
	if b == nil {
		return nil
	}
	reply, err := dhcpv4.FromBytes(b)
	if err != nil {
		t.Fatalf("reply does not parse: %v", err)
	}
	if reply.TransactionID != req.TransactionID || reply.ClientHWAddr.String() != req.ClientHWAddr.String() || reply.OpCode != dhcpv4.OpcodeBootReply {
		t.Fatalf("reply does not answer the request:\n%s", reply.Summary())
	}
	return reply
}

func discover(t *testing.T, mac net.HardwareAddr, mods ...dhcpv4.Modifier) *dhcpv4.DHCPv4 {
	t.Helper()
	m, err := dhcpv4.NewDiscovery(mac, mods...)
	if err != nil {
		t.Fatal(err)
	}
	return m
}

func request(t *testing.T, offer *dhcpv4.DHCPv4) *dhcpv4.DHCPv4 {
	t.Helper()
	m, err := dhcpv4.NewRequestFromOffer(offer)
	if err != nil {
		t.Fatal(err)
	}
	return m
}

// wantLease checks a positive answer of type typ for address a, with
// everything libslirp sends.
func wantLease(t *testing.T, reply *dhcpv4.DHCPv4, typ dhcpv4.MessageType, a string) {
	t.Helper()
	if reply == nil {
		t.Fatalf("no %s for %s", typ, a)
	}
	if reply.MessageType() != typ || reply.YourIPAddr.String() != a {
		t.Fatalf("want %s of %s, got:\n%s", typ, a, reply.Summary())
	}
	got := map[string]string{
		"server": reply.ServerIdentifier().String(), "siaddr": reply.ServerIPAddr.String(),
		"mask": net.IP(reply.SubnetMask()).String(), "lease": reply.IPAddressLeaseTime(0).String(),
	}
	want := map[string]string{"server": "10.0.2.2", "siaddr": "10.0.2.2", "mask": "255.255.255.0", "lease": "24h0m0s"}
	for k, v := range want {
		if got[k] != v {
			t.Errorf("%s: %s %s, want %s", typ, k, got[k], v)
		}
	}
	if r := reply.Router(); len(r) != 1 || r[0].String() != "10.0.2.2" {
		t.Errorf("%s: router %v, want 10.0.2.2", typ, r)
	}
	if d := reply.DNS(); len(d) != 1 || d[0].String() != "10.0.2.3" {
		t.Errorf("%s: dns %v, want 10.0.2.3", typ, d)
	}
}

// TestDHCPLeases walks the exchanges libslirp answers, and the ones the RFC
// adds: one address per MAC from .15 up, the same one again on renewal and
// on a new DISCOVER, NAK for an address that is someone else's, INFORM,
// RELEASE and DECLINE.
func TestDHCPLeases(t *testing.T) {
	d := newDHCPServer(DefaultConfig())
	a, b, c := testMAC(1), testMAC(2), testMAC(3)

	offer := exchange(t, d, discover(t, a))
	wantLease(t, offer, dhcpv4.MessageTypeOffer, "10.0.2.15")
	ack := exchange(t, d, request(t, offer))
	wantLease(t, ack, dhcpv4.MessageTypeAck, "10.0.2.15")
	wantLease(t, exchange(t, d, discover(t, a)), dhcpv4.MessageTypeOffer, "10.0.2.15")

	offerB := exchange(t, d, discover(t, b))
	wantLease(t, offerB, dhcpv4.MessageTypeOffer, "10.0.2.16")
	// B asks for A's address (INIT-REBOOT with a remembered lease).
	reboot := discover(t, b, dhcpv4.WithMessageType(dhcpv4.MessageTypeRequest), dhcpv4.WithOption(dhcpv4.OptRequestedIPAddress(net.IPv4(10, 0, 2, 15))))
	if nak := exchange(t, d, reboot); nak == nil || nak.MessageType() != dhcpv4.MessageTypeNak {
		t.Fatalf("request for another client's address: want NAK, got %v", nak)
	}
	// A renews: ciaddr, no requested address, no server identifier.
	renew, err := dhcpv4.NewRenewFromAck(ack)
	if err != nil {
		t.Fatal(err)
	}
	renew.DeleteOption(dhcpv4.OptionServerIdentifier)
	wantLease(t, exchange(t, d, renew), dhcpv4.MessageTypeAck, "10.0.2.15")
	// A request that chose another server is not ours to answer.
	other := request(t, offerB)
	other.UpdateOption(dhcpv4.OptServerIdentifier(net.IPv4(10, 0, 2, 99)))
	if r := exchange(t, d, other); r != nil {
		t.Fatalf("answered a request for another server: %s", r.Summary())
	}

	inform, err := dhcpv4.NewInform(a, net.IPv4(10, 0, 2, 15))
	if err != nil {
		t.Fatal(err)
	}
	r := exchange(t, d, inform)
	if r == nil || r.MessageType() != dhcpv4.MessageTypeAck || !r.YourIPAddr.IsUnspecified() || r.Options.Has(dhcpv4.OptionIPAddressLeaseTime) ||
		len(r.Router()) != 1 || len(r.DNS()) != 1 || r.ClientIPAddr.String() != "10.0.2.15" {
		t.Fatalf("inform: want an ACK with parameters and no lease, got %v", r)
	}

	release, err := dhcpv4.NewReleaseFromACK(ack)
	if err != nil {
		t.Fatal(err)
	}
	if r := exchange(t, d, release); r != nil {
		t.Fatalf("release answered: %s", r.Summary())
	}
	wantLease(t, exchange(t, d, discover(t, c)), dhcpv4.MessageTypeOffer, "10.0.2.15")

	decline := discover(t, b, dhcpv4.WithMessageType(dhcpv4.MessageTypeDecline), dhcpv4.WithOption(dhcpv4.OptRequestedIPAddress(net.IPv4(10, 0, 2, 16))))
	if r := exchange(t, d, decline); r != nil {
		t.Fatalf("decline answered: %s", r.Summary())
	}
	wantLease(t, exchange(t, d, discover(t, b)), dhcpv4.MessageTypeOffer, "10.0.2.17")

	// 16 addresses: C's, B's, the declined one and 13 more; then no
	// answer.
	for n := byte(4); n < 20; n++ {
		r := exchange(t, d, discover(t, testMAC(n)))
		if full := r == nil; full != (n >= 17) {
			t.Fatalf("client %d of a 16-address pool with 3 taken: reply %v", n, r)
		}
	}
	// Once its hold is over, the declined address is offered again.
	d.mu.Lock()
	for i := range d.slots {
		if !d.slots[i].declinedUntil.IsZero() {
			d.slots[i].declinedUntil = time.Now().Add(-time.Second)
		}
	}
	d.mu.Unlock()
	wantLease(t, exchange(t, d, discover(t, testMAC(30))), dhcpv4.MessageTypeOffer, "10.0.2.16")
}

// TestDHCPConfigMovesIt: --cidr moves the pool, router, DNS and netmask;
// without DNS no DNS server is offered; restricted mode offers neither
// router nor DNS; a network too small for the pool offers nothing.
func TestDHCPConfigMovesIt(t *testing.T) {
	cfg := DefaultConfig()
	cfg.Network = netip.MustParsePrefix("10.0.3.0/25")
	cfg.Gateway, cfg.DNS = netip.MustParseAddr("10.0.3.2"), netip.MustParseAddr("10.0.3.3")
	cfg.DisableDNS = true
	r := exchange(t, newDHCPServer(cfg), discover(t, testMAC(1)))
	if r == nil || r.YourIPAddr.String() != "10.0.3.15" || net.IP(r.SubnetMask()).String() != "255.255.255.128" ||
		r.ServerIdentifier().String() != "10.0.3.2" || len(r.Router()) != 1 || r.Router()[0].String() != "10.0.3.2" || len(r.DNS()) != 0 {
		t.Errorf("--cidr 10.0.3.0/25 --disable-dns: %v", r)
	}

	cfg = DefaultConfig()
	cfg.Restrict = true
	if r := exchange(t, newDHCPServer(cfg), discover(t, testMAC(1))); r == nil || len(r.Router()) != 0 || len(r.DNS()) != 0 {
		t.Errorf("restricted: want an offer without router and DNS, got %v", r)
	}

	cfg = DefaultConfig()
	cfg.Network = netip.MustParsePrefix("10.0.2.0/28")
	if r := exchange(t, newDHCPServer(cfg), discover(t, testMAC(1))); r != nil {
		t.Errorf("a /28 has no room for the pool (its .15 is the broadcast address), got %s", r.Summary())
	}
}

// dhcpFrame builds a guest's DHCP message as a frame from src:68 to dst:67.
func guestDHCPFrame(msg *dhcpv4.DHCPv4, src, dst netip.Addr) []byte {
	payload := msg.ToBytes()
	u := make([]byte, header.UDPMinimumSize+len(payload))
	header.UDP(u).Encode(&header.UDPFields{SrcPort: dhcpClientPort, DstPort: dhcpServerPort, Length: uint16(len(u))})
	copy(u[header.UDPMinimumSize:], payload)
	s, d := tcpipAddr(src), tcpipAddr(dst)
	header.UDP(u).SetChecksum(^checksum.Checksum(u, header.PseudoHeaderChecksum(header.UDPProtocolNumber, s, d, uint16(len(u)))))
	frame := make([]byte, header.EthernetMinimumSize+header.IPv4MinimumSize)
	header.Ethernet(frame).Encode(&header.EthernetFields{SrcAddr: tcpip.LinkAddress(msg.ClientHWAddr), DstAddr: "\xff\xff\xff\xff\xff\xff", Type: header.IPv4ProtocolNumber})
	ip := header.IPv4(frame[header.EthernetMinimumSize:])
	ip.Encode(&header.IPv4Fields{TotalLength: uint16(header.IPv4MinimumSize + len(u)), TTL: 64, Protocol: uint8(header.UDPProtocolNumber), SrcAddr: s, DstAddr: d})
	ip.SetChecksum(^ip.CalculateChecksum())
	return append(frame, u...)
}

// awaitDHCP reads frames until a DHCP reply arrives and checks its
// headers: broadcast, from the gateway's port 67 to port 68, checksummed.
func awaitDHCP(t *testing.T, peer int) *dhcpv4.DHCPv4 {
	t.Helper()
	eth := awaitFrame(peer, func(eth header.Ethernet) bool {
		if eth.Type() != header.IPv4ProtocolNumber {
			return false
		}
		ip := header.IPv4(eth[header.EthernetMinimumSize:])
		return ip.Protocol() == uint8(header.UDPProtocolNumber) && header.UDP(ip.Payload()).SourcePort() == dhcpServerPort
	})
	if eth == nil {
		t.Fatal("no DHCP reply came back")
	}
	ip := header.IPv4(eth[header.EthernetMinimumSize:])
	u := header.UDP(ip.Payload())
	if eth.DestinationAddress() != "\xff\xff\xff\xff\xff\xff" || ip.SourceAddress() != tcpipAddr(DefaultGateway) ||
		ip.DestinationAddress() != header.IPv4Broadcast || u.DestinationPort() != dhcpClientPort || !ip.IsChecksumValid() ||
		!u.IsChecksumValid(ip.SourceAddress(), ip.DestinationAddress(), checksum.Checksum(u.Payload(), 0)) {
		t.Fatalf("DHCP reply headers: eth dst %v, ip %v -> %v, udp -> %d", eth.DestinationAddress(), ip.SourceAddress(), ip.DestinationAddress(), u.DestinationPort())
	}
	m, err := dhcpv4.FromBytes(u.Payload())
	if err != nil {
		t.Fatal(err)
	}
	return m
}

// TestDHCPThroughStack: the stack answers a broadcast DISCOVER from
// 0.0.0.0 and a unicast renewal to the gateway, also with host loopback
// disabled (the gateway is then blocked for every other flow).
func TestDHCPThroughStack(t *testing.T) {
	cfg := DefaultConfig()
	cfg.DisableHostLoopback = true
	cfg.DNSUpstreams = []netip.AddrPort{netip.MustParseAddrPort("127.0.0.1:9")}
	_, peer := stackOnSocketpair(t, cfg, 0)
	mac := testMAC(7)
	if _, err := unix.Write(peer, guestDHCPFrame(discover(t, mac), netip.IPv4Unspecified(), limitedBroadcast)); err != nil {
		t.Fatal(err)
	}
	offer := awaitDHCP(t, peer)
	wantLease(t, offer, dhcpv4.MessageTypeOffer, "10.0.2.15")
	if _, err := unix.Write(peer, guestDHCPFrame(request(t, offer), netip.IPv4Unspecified(), limitedBroadcast)); err != nil {
		t.Fatal(err)
	}
	ack := awaitDHCP(t, peer)
	wantLease(t, ack, dhcpv4.MessageTypeAck, "10.0.2.15")
	renew, err := dhcpv4.NewRenewFromAck(ack)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := unix.Write(peer, guestDHCPFrame(renew, netip.MustParseAddr("10.0.2.15"), DefaultGateway)); err != nil {
		t.Fatal(err)
	}
	wantLease(t, awaitDHCP(t, peer), dhcpv4.MessageTypeAck, "10.0.2.15")
}

// FuzzDHCPRequest: no request makes the server panic, and every answer
// parses and offers only pool addresses.
func FuzzDHCPRequest(f *testing.F) {
	mac := testMAC(1)
	d0, _ := dhcpv4.NewDiscovery(mac)
	inform, _ := dhcpv4.NewInform(mac, net.IPv4(10, 0, 2, 15))
	req, _ := dhcpv4.NewDiscovery(mac, dhcpv4.WithMessageType(dhcpv4.MessageTypeRequest), dhcpv4.WithOption(dhcpv4.OptRequestedIPAddress(net.IPv4(10, 0, 2, 20))))
	rel, _ := dhcpv4.NewDiscovery(mac, dhcpv4.WithMessageType(dhcpv4.MessageTypeRelease), dhcpv4.WithClientIP(net.IPv4(10, 0, 2, 15)))
	for _, m := range []*dhcpv4.DHCPv4{d0, inform, req, rel} {
		f.Add(m.ToBytes())
	}
	f.Add([]byte{})
	f.Add(make([]byte, 240))
	d := newDHCPServer(DefaultConfig())
	f.Fuzz(func(t *testing.T, payload []byte) {
		b, err := d.answer(payload)
		if err != nil || b == nil {
			return
		}
		reply, err := dhcpv4.FromBytes(b)
		if err != nil {
			t.Fatalf("reply does not parse: %v", err)
		}
		if y, _ := netip.AddrFromSlice(reply.YourIPAddr.To4()); !y.IsUnspecified() && (y.Less(netip.MustParseAddr("10.0.2.15")) || netip.MustParseAddr("10.0.2.30").Less(y)) {
			t.Fatalf("offered %s outside the pool", y)
		}
	})
}
