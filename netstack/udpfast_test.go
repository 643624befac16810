package netstack

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"net"
	"net/netip"
	"testing"
	"time"

	"golang.org/x/sys/unix"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/checksum"
	"gvisor.dev/gvisor/pkg/tcpip/header"

	"github.com/netns-run/netns-run/tap"
)

// vnetUDPFrame builds a guest UDP datagram from src to dst, behind a zeroed
// virtio-net header of vnetHdr bytes.
func vnetUDPFrame(src, dst netip.AddrPort, payload []byte, vnetHdr int) []byte {
	u := make([]byte, header.UDPMinimumSize+len(payload))
	copy(u[header.UDPMinimumSize:], payload)
	s, d := tcpipAddr(src.Addr()), tcpipAddr(dst.Addr())
	header.UDP(u).Encode(&header.UDPFields{SrcPort: src.Port(), DstPort: dst.Port(), Length: uint16(len(u))})
	xsum := header.PseudoHeaderChecksum(header.UDPProtocolNumber, s, d, uint16(len(u)))
	header.UDP(u).SetChecksum(^checksum.Checksum(u, xsum))
	netProto, ipLen := header.IPv4ProtocolNumber, header.IPv4MinimumSize
	if dst.Addr().Is6() {
		netProto, ipLen = header.IPv6ProtocolNumber, header.IPv6MinimumSize
	}
	frame := make([]byte, vnetHdr+header.EthernetMinimumSize+ipLen)
	header.Ethernet(frame[vnetHdr:]).Encode(&header.EthernetFields{SrcAddr: guestMAC, DstAddr: tcpip.LinkAddress(DefaultGatewayMAC), Type: netProto})
	ip := frame[vnetHdr+header.EthernetMinimumSize:]
	if netProto == header.IPv4ProtocolNumber {
		h := header.IPv4(ip)
		h.Encode(&header.IPv4Fields{TotalLength: uint16(ipLen + len(u)), TTL: 64, Protocol: uint8(header.UDPProtocolNumber), SrcAddr: s, DstAddr: d})
		h.SetChecksum(^h.CalculateChecksum())
	} else {
		header.IPv6(ip).Encode(&header.IPv6Fields{PayloadLength: uint16(len(u)), TransportProtocol: header.UDPProtocolNumber, HopLimit: 64, SrcAddr: s, DstAddr: d})
	}
	return append(frame, u...)
}

// udpReply is a UDP datagram the stack sent the guest.
type udpReply struct {
	src, dst netip.AddrPort
	payload  []byte
	// csumOK: the checksum is right, or left to the guest's kernel
	// with a virtio-net header that says so.
	csumOK bool
}

// readUDPReplies reads frames from peer until want datagrams arrived or
// nothing came for a second, answering the stack's ARP requests.
func readUDPReplies(t *testing.T, peer, vnetHdr, want int) []udpReply {
	t.Helper()
	_ = unix.SetsockoptTimeval(peer, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &unix.Timeval{Sec: 1})
	buf := make([]byte, 1<<17)
	var got []udpReply
	frags := map[uint16][]byte{}
	for len(got) < want {
		n, err := readPeer(peer, buf)
		if err != nil {
			break
		}
		vh, frame := buf[:vnetHdr], buf[vnetHdr:n]
		eth := header.Ethernet(frame)
		if eth.Type() == header.ARPProtocolNumber {
			answerARP(t, peer, frame, vnetHdr)
			continue
		}
		if eth.Type() != header.IPv4ProtocolNumber {
			continue
		}
		ip := header.IPv4(frame[header.EthernetMinimumSize:])
		if ip.Protocol() != uint8(header.UDPProtocolNumber) {
			continue
		}
		body := ip.Payload()
		if ip.More() || ip.FragmentOffset() != 0 {
			// Reassemble the stack's fragments (in order on this link).
			frags[ip.ID()] = append(frags[ip.ID()], body...)
			if ip.More() {
				continue
			}
			body = frags[ip.ID()]
			delete(frags, ip.ID())
		}
		u := header.UDP(body)
		r := udpReply{
			src:     netip.AddrPortFrom(netipAddr(ip.SourceAddress()), u.SourcePort()),
			dst:     netip.AddrPortFrom(netipAddr(ip.DestinationAddress()), u.DestinationPort()),
			payload: append([]byte(nil), u.Payload()...),
		}
		xsum := header.PseudoHeaderChecksum(header.UDPProtocolNumber, ip.SourceAddress(), ip.DestinationAddress(), uint16(len(u)))
		r.csumOK = checksum.Checksum(u, xsum) == 0xffff
		if len(vh) >= tap.VnetHdrSize && vh[0]&vnetFlagNeedsCsum != 0 {
			// Partial: the field holds the pseudo-header sum for the
			// guest's kernel to finish.
			r.csumOK = u.Checksum() == xsum && binary.LittleEndian.Uint16(vh[8:]) == udpChecksumOffset
		}
		got = append(got, r)
	}
	return got
}

// answerARP replies to the stack's ARP request for the guest.
func answerARP(t *testing.T, peer int, req []byte, vnetHdr int) {
	arp := header.ARP(req[header.EthernetMinimumSize:])
	if arp.Op() != header.ARPRequest {
		return
	}
	reply := make([]byte, vnetHdr+header.EthernetMinimumSize+header.ARPSize)
	header.Ethernet(reply[vnetHdr:]).Encode(&header.EthernetFields{SrcAddr: guestMAC, DstAddr: tcpip.LinkAddress(arp.HardwareAddressSender()), Type: header.ARPProtocolNumber})
	a := header.ARP(reply[vnetHdr+header.EthernetMinimumSize:])
	a.SetIPv4OverEthernet()
	a.SetOp(header.ARPReply)
	copy(a.HardwareAddressSender(), guestMAC)
	copy(a.ProtocolAddressSender(), arp.ProtocolAddressTarget())
	copy(a.HardwareAddressTarget(), arp.HardwareAddressSender())
	copy(a.ProtocolAddressTarget(), arp.ProtocolAddressSender())
	if _, err := unix.Write(peer, reply); err != nil {
		t.Errorf("ARP reply: %v", err)
	}
}

// udpServer answers every datagram on 127.0.0.1 with reply(datagram).
func udpServer(t *testing.T, reply func([]byte) []byte) netip.AddrPort {
	t.Helper()
	c, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	go func() {
		buf := make([]byte, 1<<16)
		for {
			n, from, err := c.ReadFromUDPAddrPort(buf)
			if err != nil {
				return
			}
			_, _ = c.WriteToUDPAddrPort(reply(buf[:n]), from)
		}
	}()
	return c.LocalAddr().(*net.UDPAddr).AddrPort()
}

// Guest datagrams reach a host socket and the replies come back whole,
// from the address the guest sent to, with valid checksums, both with and
// without a virtio-net header; after the first datagram they take the fast
// path.
func TestUDPFastPath(t *testing.T) {
	server := udpServer(t, func(b []byte) []byte { return append([]byte("re:"), b...) })
	for _, vnetHdr := range []int{0, tap.VnetHdrSize} {
		t.Run(fmt.Sprintf("vnethdr=%d", vnetHdr), func(t *testing.T) {
			cfg := DefaultConfig()
			cfg.DNSUpstreams = []netip.AddrPort{netip.MustParseAddrPort("127.0.0.1:9")}
			s, peer := stackOnSocketpair(t, cfg, vnetHdr)
			src := netip.MustParseAddrPort("10.0.2.100:40000")
			dst := netip.AddrPortFrom(DefaultGateway, server.Port())
			const n = 50
			for i := range n {
				if _, err := unix.Write(peer, vnetUDPFrame(src, dst, []byte(fmt.Sprintf("datagram %d", i)), vnetHdr)); err != nil {
					t.Fatal(err)
				}
				if i == 0 {
					// Let the first one open the flow.
					time.Sleep(50 * time.Millisecond)
				}
			}
			got := readUDPReplies(t, peer, vnetHdr, n)
			if len(got) != n {
				t.Fatalf("got %d replies, want %d", len(got), n)
			}
			seen := map[string]bool{}
			for _, r := range got {
				if r.src != dst || r.dst != src || !r.csumOK {
					t.Fatalf("reply %+v: want from %v to %v with a valid checksum", r, dst, src)
				}
				seen[string(r.payload)] = true
			}
			for i := range n {
				if want := fmt.Sprintf("re:datagram %d", i); !seen[want] {
					t.Errorf("no reply %q", want)
				}
			}
			if rx, tx := s.udpFast.counters.rxPackets.Load(), s.udpFast.counters.txPackets.Load(); rx == 0 || tx == 0 {
				t.Errorf("fast path carried rx %d tx %d datagrams, want some both ways", rx, tx)
			}
		})
	}
}

// A reply larger than the guest's MTU goes through the stack, which
// fragments it; the guest gets it whole.
func TestUDPFastPathOversizeReply(t *testing.T) {
	big := bytes.Repeat([]byte("0123456789abcdef"), 250) // 4000 bytes
	server := udpServer(t, func([]byte) []byte { return big })
	cfg := DefaultConfig()
	cfg.MTU = 1500
	cfg.DNSUpstreams = []netip.AddrPort{netip.MustParseAddrPort("127.0.0.1:9")}
	_, peer := stackOnSocketpair(t, cfg, 0)
	src := netip.MustParseAddrPort("10.0.2.100:40001")
	dst := netip.AddrPortFrom(DefaultGateway, server.Port())
	for i := range 3 {
		if _, err := unix.Write(peer, vnetUDPFrame(src, dst, []byte{byte(i)}, 0)); err != nil {
			t.Fatal(err)
		}
		time.Sleep(20 * time.Millisecond)
	}
	got := readUDPReplies(t, peer, 0, 3)
	if len(got) != 3 {
		t.Fatalf("got %d replies, want 3", len(got))
	}
	for _, r := range got {
		if !bytes.Equal(r.payload, big) || !r.csumOK {
			t.Fatalf("reply of %d bytes (checksum ok %v), want the %d-byte datagram", len(r.payload), r.csumOK, len(big))
		}
	}
}

// slowEndpoint is a stack endpoint whose first write (a reply too large
// for the link: all of them here) takes a while; it hands on what it got.
type slowEndpoint struct {
	tcpip.Endpoint
	got    chan []byte
	writes int
}

func (e *slowEndpoint) Write(r tcpip.Payloader, _ tcpip.WriteOptions) (int64, tcpip.Error) {
	b := make([]byte, r.Len())
	n, _ := r.Read(b)
	e.writes++
	if e.writes == 1 {
		time.Sleep(100 * time.Millisecond)
	}
	e.got <- b[:n]
	return int64(n), nil
}

// A reply that arrives while the one before is on its way to the guest is
// not left in the host socket until a third comes (the poller's note of it
// was forgotten by the next wait).
func TestUDPFastPathReplyDuringDelivery(t *testing.T) {
	far, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer far.Close()
	host, err := net.DialUDP("udp4", nil, far.LocalAddr().(*net.UDPAddr))
	if err != nil {
		t.Fatal(err)
	}
	defer host.Close()
	rc, err := host.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	table := newFlowTable(t.Context(), &flowGroup{}, 10, flowTimeouts{time.Hour, time.Hour, time.Hour})
	f := &udpFlow{path: &udpFastPath{link: &tapLink{mtu: 1}}, hostRC: rc, table: &tableFlow{t: table}, hostErr: func() {}}
	ep := &slowEndpoint{got: make(chan []byte, 4)}
	relayed := make(chan struct{})
	go func() { f.relayReplies(ep); close(relayed) }()
	defer func() { host.Close(); <-relayed }()
	to := host.LocalAddr()
	if _, err := far.WriteTo([]byte("one"), to); err != nil {
		t.Fatal(err)
	}
	// While "one" is being written to the stack:
	time.Sleep(20 * time.Millisecond)
	if _, err := far.WriteTo([]byte("two"), to); err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"one", "two"} {
		select {
		case b := <-ep.got:
			if string(b) != want {
				t.Errorf("got %q, want %q", b, want)
			}
		case <-time.After(10 * time.Second):
			t.Fatalf("%q stayed in the host socket", want)
		}
	}
}

// A datagram that finds its flow ended (the socket closed, the flow not
// yet out of the table) goes to the stack instead of being dropped.
func TestUDPFastPathEndedFlowPassesOn(t *testing.T) {
	server := udpServer(t, func(b []byte) []byte { return append([]byte("re:"), b...) })
	cfg := DefaultConfig()
	cfg.DNSUpstreams = []netip.AddrPort{netip.MustParseAddrPort("127.0.0.1:9")}
	s, peer := stackOnSocketpair(t, cfg, 0)
	src := netip.MustParseAddrPort("10.0.2.100:40001")
	dst := netip.AddrPortFrom(DefaultGateway, server.Port())
	if _, err := unix.Write(peer, vnetUDPFrame(src, dst, []byte("first"), 0)); err != nil {
		t.Fatal(err)
	}
	if got := readUDPReplies(t, peer, 0, 1); len(got) != 1 {
		t.Fatalf("got %d replies to the first datagram, want 1", len(got))
	}
	var flow *udpFlow
	s.udpFast.flows.Range(func(_, v any) bool { flow = v.(*udpFlow); return false })
	if flow == nil {
		t.Fatal("the flow is not on the fast path")
	}
	// The flow as it is between its socket's close and its removal.
	closed, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	rc, err := closed.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	closed.Close()
	ended := &udpFlow{key: flow.key, path: flow.path, hostRC: rc, table: flow.table, drops: flow.drops, hostErr: func() {}}
	s.udpFast.flows.Store(flow.key, ended)
	if _, err := unix.Write(peer, vnetUDPFrame(src, dst, []byte("second"), 0)); err != nil {
		t.Fatal(err)
	}
	got := readUDPReplies(t, peer, 0, 1)
	if len(got) != 1 || string(got[0].payload) != "re:second" {
		t.Fatalf("replies to the datagram sent on the ended flow: %+v, want re:second", got)
	}
}
