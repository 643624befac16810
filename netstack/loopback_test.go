package netstack

import (
	"fmt"
	"net"
	"net/netip"
	"testing"
	"time"

	"golang.org/x/sys/unix"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/checksum"
	"gvisor.dev/gvisor/pkg/tcpip/header"
)

var guestMAC = tcpip.LinkAddress([]byte{0x02, 0, 0, 0, 0, 1})

// synFrame builds a guest TCP SYN from src to dst with valid checksums.
func synFrame(src, dst netip.AddrPort) []byte {
	tcp := make([]byte, header.TCPMinimumSize)
	header.TCP(tcp).Encode(&header.TCPFields{SrcPort: src.Port(), DstPort: dst.Port(), SeqNum: 1000,
		DataOffset: header.TCPMinimumSize, Flags: header.TCPFlagSyn, WindowSize: 65535})
	s, d := tcpipAddr(src.Addr()), tcpipAddr(dst.Addr())
	netProto, ipLen := header.IPv4ProtocolNumber, header.IPv4MinimumSize
	if dst.Addr().Is6() {
		s, d = tcpip.AddrFrom16(src.Addr().As16()), tcpip.AddrFrom16(dst.Addr().As16())
		netProto, ipLen = header.IPv6ProtocolNumber, header.IPv6MinimumSize
	}
	xsum := header.PseudoHeaderChecksum(header.TCPProtocolNumber, s, d, uint16(len(tcp)))
	header.TCP(tcp).SetChecksum(^checksum.Checksum(tcp, xsum))
	frame := make([]byte, header.EthernetMinimumSize+ipLen)
	header.Ethernet(frame).Encode(&header.EthernetFields{SrcAddr: guestMAC, DstAddr: tcpip.LinkAddress(DefaultGatewayMAC), Type: netProto})
	ip := frame[header.EthernetMinimumSize:]
	if netProto == header.IPv4ProtocolNumber {
		h := header.IPv4(ip)
		h.Encode(&header.IPv4Fields{TotalLength: uint16(ipLen + len(tcp)), TTL: 64, Protocol: uint8(header.TCPProtocolNumber), SrcAddr: s, DstAddr: d})
		h.SetChecksum(^h.CalculateChecksum())
	} else {
		header.IPv6(ip).Encode(&header.IPv6Fields{PayloadLength: uint16(len(tcp)), TransportProtocol: header.TCPProtocolNumber, HopLimit: 64, SrcAddr: s, DstAddr: d})
	}
	return append(frame, tcp...)
}

// awaitFrame reads frames from the stack until one matches, and returns
// it; nil if none came within a few seconds.
func awaitFrame(peer int, match func(header.Ethernet) bool) header.Ethernet {
	_ = unix.SetsockoptTimeval(peer, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &unix.Timeval{Sec: 2})
	buf := make([]byte, 65536)
	for deadline := time.Now().Add(3 * time.Second); time.Now().Before(deadline); {
		n, err := readPeer(peer, buf)
		if err != nil {
			break
		}
		if eth := header.Ethernet(buf[:n]); n >= header.EthernetMinimumSize && match(eth) {
			return eth
		}
	}
	return nil
}

// awaitUnreachable reads frames until an ICMP destination unreachable
// (v4 or v6) arrives, or fails.
func awaitUnreachable(t *testing.T, peer int) {
	t.Helper()
	readICMP(t, peer, uint8(header.ICMPv4DstUnreachable), uint8(header.ICMPv6DstUnreachable))
}

// TestHostLoopbackTricks: with host loopback disabled, a guest that uses
// the gateway addresses or the host's own addresses gets ICMP unreachable,
// and one that crafts packets straight to loopback addresses (also
// IPv4-mapped) reaches nothing: a listener there sees no connection.
func TestHostLoopbackTricks(t *testing.T) {
	refused := []string{"10.0.2.2:22", "[fd00::2]:22"}
	if addrs, err := net.InterfaceAddrs(); err == nil {
		for _, a := range addrs {
			if ipn, ok := a.(*net.IPNet); ok && !ipn.IP.IsLoopback() && ipn.IP.To4() != nil {
				refused = append(refused, net.JoinHostPort(ipn.IP.String(), "22")) // a host address, never dialed
				break
			}
		}
	}
	for _, target := range refused {
		t.Run(target, func(t *testing.T) {
			_, peer := newLoopbackStack(t)
			if _, err := unix.Write(peer, synFrame(guestSource(target), netip.MustParseAddrPort(target))); err != nil {
				t.Fatal(err)
			}
			awaitUnreachable(t, peer)
		})
	}
	for _, network := range []string{"tcp4", "tcp6"} {
		ln, err := net.Listen(network, map[string]string{"tcp4": "127.0.0.1:0", "tcp6": "[::1]:0"}[network])
		if err != nil {
			t.Fatal(err)
		}
		defer ln.Close()
		port := ln.Addr().(*net.TCPAddr).Port
		accepted := make(chan struct{}, 1)
		go func() {
			if c, err := ln.Accept(); err == nil {
				c.Close()
				accepted <- struct{}{}
			}
		}()
		targets := []string{fmt.Sprintf("127.0.0.1:%d", port), fmt.Sprintf("[::ffff:127.0.0.1]:%d", port)}
		if network == "tcp6" {
			targets = []string{fmt.Sprintf("[::1]:%d", port)}
		}
		for _, target := range targets {
			_, peer := newLoopbackStack(t)
			if _, err := unix.Write(peer, synFrame(guestSource(target), netip.MustParseAddrPort(target))); err != nil {
				t.Fatal(err)
			}
		}
		select {
		case <-accepted:
			t.Errorf("a crafted packet reached the host's loopback listener %s", ln.Addr())
		case <-time.After(500 * time.Millisecond):
		}
	}
}

func guestSource(target string) netip.AddrPort {
	if netip.MustParseAddrPort(target).Addr().Is6() {
		return netip.MustParseAddrPort("[fd00::100]:40000")
	}
	return netip.MustParseAddrPort("10.0.2.100:40000")
}

func newLoopbackStack(t *testing.T) (*Stack, int) {
	t.Helper()
	cfg := DefaultConfig()
	cfg.IPv6 = true
	cfg.DisableHostLoopback = true
	return stackOnSocketpair(t, cfg, 0)
}
