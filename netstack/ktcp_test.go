package netstack

import (
	"bytes"
	"log/slog"
	"net/netip"
	"os"
	"testing"
	"time"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/checksum"
	"gvisor.dev/gvisor/pkg/tcpip/header"

	"github.com/netns-run/netns-run/netstack/ktcpnat"
)

// segmentFrame builds an Ethernet frame with a TCP segment from src to dst
// (IPv4 or IPv6, as the addresses are), its checksum complete or (partial)
// only the pseudo-header's, as a guest's kernel with checksum offload
// leaves it.
func segmentFrame(src, dst netip.AddrPort, payload []byte, partial bool) (vh, frame []byte) {
	const tcpLen = header.TCPMinimumSize
	ipLen, proto := header.IPv4MinimumSize, header.IPv4ProtocolNumber
	if src.Addr().Is6() {
		ipLen, proto = header.IPv6MinimumSize, header.IPv6ProtocolNumber
	}
	frame = make([]byte, header.EthernetMinimumSize+ipLen+tcpLen+len(payload))
	header.Ethernet(frame).Encode(&header.EthernetFields{
		SrcAddr: tcpip.LinkAddress("\x02\x00\x00\x00\x00\x01"), DstAddr: tcpip.LinkAddress("\x02\x00\x00\x00\x00\x02"),
		Type: proto,
	})
	l3 := frame[header.EthernetMinimumSize:]
	s, d := tcpipAddr(src.Addr()), tcpipAddr(dst.Addr())
	if proto == header.IPv4ProtocolNumber {
		ip := header.IPv4(l3)
		ip.Encode(&header.IPv4Fields{TotalLength: uint16(len(ip)), TTL: 64, Protocol: uint8(header.TCPProtocolNumber), SrcAddr: s, DstAddr: d})
		ip.SetChecksum(^ip.CalculateChecksum())
	} else {
		header.IPv6(l3).Encode(&header.IPv6Fields{PayloadLength: uint16(tcpLen + len(payload)),
			TransportProtocol: header.TCPProtocolNumber, HopLimit: 64, SrcAddr: s, DstAddr: d})
	}
	t := header.TCP(l3[ipLen:])
	t.Encode(&header.TCPFields{SrcPort: src.Port(), DstPort: dst.Port(), SeqNum: 1000, AckNum: 2000,
		DataOffset: tcpLen, Flags: header.TCPFlagAck | header.TCPFlagPsh, WindowSize: 512})
	copy(t[tcpLen:], payload)
	pseudo := header.PseudoHeaderChecksum(header.TCPProtocolNumber, s, d, uint16(len(t)))
	vh = make([]byte, 10)
	if partial {
		vh[0] = vnetFlagNeedsCsum
		t.SetChecksum(pseudo)
	} else {
		t.SetChecksum(^checksum.Checksum(t, pseudo))
	}
	return vh, frame
}

// checkSegment verifies that frame carries payload from src to dst with
// valid checksums (IPv4 or IPv6), first completing a partial one as the
// receiving kernel would.
func checkSegment(t *testing.T, vh, frame []byte, src, dst netip.AddrPort, payload []byte) {
	t.Helper()
	l3, seg, gotSrc, gotDst, ok := parseSegment(frame)
	if !ok {
		t.Fatal("not a TCP segment any more")
	}
	if l3[0]>>4 == 4 && !header.IPv4(l3).IsChecksumValid() {
		t.Error("IPv4 header checksum is wrong")
	}
	if gotSrc.Addr() != src.Addr() || gotDst.Addr() != dst.Addr() {
		t.Errorf("addresses %v -> %v, want %v -> %v", gotSrc.Addr(), gotDst.Addr(), src.Addr(), dst.Addr())
	}
	if gotSrc.Port() != src.Port() || gotDst.Port() != dst.Port() {
		t.Errorf("ports %d -> %d, want %d -> %d", gotSrc.Port(), gotDst.Port(), src.Port(), dst.Port())
	}
	if vh[0]&vnetFlagNeedsCsum != 0 {
		seg.SetChecksum(^checksum.Checksum(seg, 0))
	}
	if !seg.IsChecksumValid(tcpipAddr(src.Addr()), tcpipAddr(dst.Addr()), checksum.Checksum(seg.Payload(), 0), uint16(len(seg.Payload()))) {
		t.Error("TCP checksum is wrong")
	}
	if !bytes.Equal(seg.Payload(), payload) {
		t.Error("payload changed")
	}
}

// TestKernelTCPRewrite: a guest segment rewritten for the listener, and the
// listener's segment rewritten back, keep valid checksums whether the guest
// left the checksum to the receiver or not.
func TestKernelTCPRewrite(t *testing.T) {
	gw := tcpip.LinkAddress("\x52\x55\x0a\x00\x02\x02")
	k := &kernelTCP{link: &tapLink{addr: gw}}
	guest := netip.MustParseAddrPort("10.0.2.100:40000")
	remote := netip.MustParseAddrPort("203.0.113.7:443")
	listener := netip.MustParseAddrPort("10.0.2.100:39000")
	fake := netip.MustParseAddrPort("203.0.113.7:20001")
	payload := []byte("odd-length payload!")
	for _, partial := range []bool{false, true} {
		vh, frame := segmentFrame(guest, remote, payload, partial)
		ip := header.IPv4(frame[header.EthernetMinimumSize:])
		k.rewrite(vh, frame, ip, header.TCP(ip[ip.HeaderLength():]), fake, listener)
		checkSegment(t, vh, frame, fake, listener, payload)
		eth := header.Ethernet(frame)
		if eth.SourceAddress() != gw || eth.DestinationAddress() != tcpip.LinkAddress("\x02\x00\x00\x00\x00\x01") {
			t.Errorf("MACs %v -> %v, want the gateway's to the guest's", eth.SourceAddress(), eth.DestinationAddress())
		}

		vh, frame = segmentFrame(listener, fake, payload, partial)
		ip = header.IPv4(frame[header.EthernetMinimumSize:])
		k.rewrite(vh, frame, ip, header.TCP(ip[ip.HeaderLength():]), remote, guest)
		checkSegment(t, vh, frame, remote, guest, payload)
	}
}

// FuzzKernelTCPDivert offers arbitrary guest frames to the kernel TCP path,
// which has one open flow: it must neither panic nor take what is not its
// own. The stack behind it refuses every destination, so no SYN is dialed.
func FuzzKernelTCPDivert(f *testing.F) {
	guest := netip.MustParseAddrPort("10.0.2.100:40000")
	remote := netip.MustParseAddrPort("10.0.2.2:22")
	listener := netip.MustParseAddrPort("10.0.2.100:39000")
	fake := netip.MustParseAddrPort("10.0.2.2:20001")
	devNull, err := os.OpenFile(os.DevNull, os.O_WRONLY, 0)
	if err != nil {
		f.Fatal(err)
	}
	f.Cleanup(func() { devNull.Close() })
	cfg := DefaultConfig()
	cfg.Restrict = true
	s := &Stack{cfg: cfg}
	link := &tapLink{fds: []int{int(devNull.Fd())}, vnetHdr: 10, addr: tcpip.LinkAddress("\x52\x55\x0a\x00\x02\x02")}
	k := &kernelTCP{s: s, link: link, listener: listener, vnetHdr: 10, quarantine: map[netip.AddrPort]time.Time{}}
	fl := &ktcpFlow{key: ktcpKey{guest: guest, remote: remote}, fake: fake, listener: listener}
	fl.state.Store(int32(ktcpAccepted))
	fl.answer.Store(ktcpAnswered)
	k.byGuest.Store(fl.key, fl)
	k.byFake.Store(fake, fl)

	for _, partial := range []bool{false, true} {
		vh, frame := segmentFrame(guest, remote, []byte("x"), partial)
		f.Add(vh, frame)
		vh, frame = segmentFrame(listener, fake, nil, partial)
		f.Add(vh, frame)
	}
	vh, frame := segmentFrame(guest, netip.MustParseAddrPort("198.51.100.1:80"), nil, false)
	header.TCP(frame[header.EthernetMinimumSize+header.IPv4MinimumSize:]).SetFlags(uint8(header.TCPFlagSyn))
	f.Add(vh, frame)
	// An IPv4 header claiming 60 bytes in a short frame.
	_, frame = segmentFrame(guest, remote, nil, false)
	frame[header.EthernetMinimumSize] = 0x4f
	f.Add(vh, frame[:header.EthernetMinimumSize+header.IPv4MinimumSize+header.TCPMinimumSize])
	f.Fuzz(func(t *testing.T, vh, frame []byte) {
		if len(frame) == 0 || len(frame) > 65535 {
			return
		}
		vnet := make([]byte, 10)
		copy(vnet, vh)
		// The reader's buffers, as the frame would fill them.
		var parts [][]byte
		rest := append([]byte(nil), frame...)
		for _, size := range readSizes {
			if len(rest) == 0 {
				break
			}
			n := min(size, len(rest))
			parts = append(parts, rest[:n])
			rest = rest[n:]
		}
		if len(rest) > 0 {
			return
		}
		took := k.divert(vnet, parts, len(frame))
		if took && len(frame) < header.EthernetMinimumSize+header.IPv4MinimumSize+header.TCPMinimumSize {
			t.Fatalf("took a %d-byte frame", len(frame))
		}
	})
}

// TestKernelTCPRewriteIPv6: the same for IPv6 segments, which have no
// header checksum.
func TestKernelTCPRewriteIPv6(t *testing.T) {
	k := &kernelTCP{link: &tapLink{addr: tcpip.LinkAddress("\x52\x55\x0a\x00\x02\x02")}}
	guest := netip.MustParseAddrPort("[fd00::100]:40000")
	remote := netip.MustParseAddrPort("[2001:db8::7]:443")
	listener := netip.MustParseAddrPort("[fd00::100]:39000")
	fake := netip.MustParseAddrPort("[2001:db8::7]:20001")
	payload := []byte("odd-length payload!")
	for _, partial := range []bool{false, true} {
		vh, frame := segmentFrame(guest, remote, payload, partial)
		l3, seg, _, _, _ := parseSegment(frame)
		k.rewrite(vh, frame, l3, seg, fake, listener)
		checkSegment(t, vh, frame, fake, listener, payload)
		vh, frame = segmentFrame(listener, fake, payload, partial)
		l3, seg, _, _, _ = parseSegment(frame)
		k.rewrite(vh, frame, l3, seg, remote, guest)
		checkSegment(t, vh, frame, remote, guest, payload)
	}
}

// gatedTable is a ktcpnat.Table whose Add waits to be let go, and which
// records what Remove takes out.
type gatedTable struct {
	adding  chan struct{}
	letGo   chan struct{}
	removed chan ktcpnat.Parts
}

func (g *gatedTable) Add(ktcpnat.Flow) error {
	g.adding <- struct{}{}
	<-g.letGo
	return nil
}

func (g *gatedTable) Remove(_ ktcpnat.Flow, p ktcpnat.Parts) error {
	g.removed <- p
	return nil
}

func (g *gatedTable) Close() error { return nil }

// A flow whose linger ends while its entries are still going into the
// guest kernel's maps (a slow broker) does not leave them there: the adder
// takes them out once in. A flow whose linger ended first never adds.
func TestTranslationOutlivesLinger(t *testing.T) {
	tbl := &gatedTable{adding: make(chan struct{}), letGo: make(chan struct{}), removed: make(chan ktcpnat.Parts, 2)}
	s := &Stack{cfg: DefaultConfig(), log: slog.New(slog.DiscardHandler)}
	k := &kernelTCP{s: s, nat: tbl}
	f := &ktcpFlow{key: ktcpKey{guest: netip.MustParseAddrPort("10.0.2.100:40000"), remote: netip.MustParseAddrPort("203.0.113.7:80")}}
	k.byGuest.Store(f.key, f)
	go k.translateInKernel(f)
	<-tbl.adding
	// The linger ends (laterUnmap's order: untranslated, then forgotten).
	k.translateHere(f)
	k.byGuest.CompareAndDelete(f.key, f)
	select {
	case p := <-tbl.removed:
		t.Fatalf("removed %v before the entries went in", p)
	default:
	}
	close(tbl.letGo)
	select {
	case p := <-tbl.removed:
		if p != ktcpnat.Both {
			t.Errorf("removed %v, want both sides", p)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the entries stayed in the guest's kernel")
	}
	s.flows.closeAndWait()

	late := &ktcpFlow{key: f.key}
	k.translateHere(late)
	k.translateInKernel(late) // Add would block: it must not be called
}

// A SYN that reuses the addresses of a lingering flow, but which this path
// cannot take (every dial slot busy, say), goes to the stack, and so do its
// later segments: none reaches the old flow's listener side, and the old
// flow's translation of the guest's side leaves the guest's kernel.
func TestReusedAddressesFallBackWhole(t *testing.T) {
	guest := netip.MustParseAddrPort("10.0.2.100:40000")
	remote := netip.MustParseAddrPort("203.0.113.7:80")
	listener := netip.MustParseAddrPort("10.0.2.100:39000")
	oldFake := netip.MustParseAddrPort("203.0.113.7:20001")
	devNull, err := os.OpenFile(os.DevNull, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer devNull.Close()
	tbl := &gatedTable{removed: make(chan ktcpnat.Parts, 2)}
	s := &Stack{cfg: DefaultConfig(), log: slog.New(slog.DiscardHandler)}
	link := &tapLink{fds: []int{int(devNull.Fd())}, vnetHdr: 10, addr: tcpip.LinkAddress("\x52\x55\x0a\x00\x02\x02")}
	k := &kernelTCP{s: s, link: link, listener: listener, vnetHdr: 10, nat: tbl, quarantine: map[netip.AddrPort]time.Time{}}
	old := &ktcpFlow{key: ktcpKey{guest: guest, remote: remote}, fake: oldFake, listener: listener}
	old.state.Store(int32(ktcpClosing))
	old.answer.Store(ktcpAnswered)
	old.nat.Store(natIn)
	k.byGuest.Store(old.key, old)
	k.byFake.Store(oldFake, old)
	k.connecting.Store(ktcpMaxConnecting)

	vh, syn := segmentFrame(guest, remote, nil, false)
	header.TCP(syn[header.EthernetMinimumSize+header.IPv4MinimumSize:]).SetFlags(uint8(header.TCPFlagSyn))
	if k.take(vh, [][]byte{syn}, len(syn)) {
		t.Fatal("the SYN was taken with every dial slot busy")
	}
	vh, ack := segmentFrame(guest, remote, nil, false)
	if k.take(vh, [][]byte{ack}, len(ack)) {
		t.Error("the new connection's ACK went to the old flow's listener side")
	}
	s.flows.closeAndWait()
	select {
	case p := <-tbl.removed:
		if p != ktcpnat.Out {
			t.Errorf("removed %v of the old flow's translation, want the guest's side", p)
		}
	default:
		t.Error("the old flow's translation of the guest's side stayed in the guest's kernel")
	}
}
