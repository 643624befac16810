package netstack

import (
	"context"
	"net/netip"
	"os"
	"testing"

	"github.com/miekg/dns"
	"golang.org/x/sys/unix"
	"gvisor.dev/gvisor/pkg/tcpip/header"

	"github.com/netns-run/netns-run/tap"
)

// packQuery is a DNS query for name (A, class IN) with the given ID.
func packQuery(id uint16, name string) []byte {
	m := new(dns.Msg)
	m.SetQuestion(dns.Fqdn(name), dns.TypeA)
	m.Id = id
	b, err := m.Pack()
	if err != nil {
		panic(err)
	}
	return b
}

// Frames that arrive while the stack starts must not meet it half built:
// before the NIC was created disabled, DNS queries queued at start could
// reach a stack without its UDP handler and come back as ICMP port
// unreachable (1 round in 20), and `go test -race` saw the handlers being
// installed while the TAP readers delivered packets.
func TestFramesDuringStart(t *testing.T) {
	cfg := DefaultConfig()
	cfg.Restrict = true
	cfg.DNSUpstreams = []netip.AddrPort{netip.MustParseAddrPort("127.0.0.1:9")}
	for round := 0; round < 20; round++ {
		fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
		if err != nil {
			t.Fatal(err)
		}
		peer := fds[1]
		sent := make(chan struct{})
		go func() {
			defer close(sent)
			for i := 0; i < 300; i++ {
				src := netip.AddrPortFrom(DefaultGuestAddr, uint16(20000+i))
				_ = unix.Send(peer, udpFrame(src, netip.AddrPortFrom(DefaultDNS, 53), packQuery(uint16(i), "example.test")), 0)
			}
		}()
		s, err := newStack(context.Background(), cfg, tap.FromFiles("test0", []*os.File{os.NewFile(uintptr(fds[0]), "stack")}), 0)
		if err != nil {
			t.Fatal(err)
		}
		<-sent
		buf := make([]byte, 65536)
		_ = unix.SetsockoptTimeval(peer, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &unix.Timeval{Usec: 200000})
		unreachable := 0
		for {
			n, err := readPeer(peer, buf)
			if err != nil {
				break
			}
			if isICMPUnreachable(buf[:n], header.ICMPv4PortUnreachable) {
				unreachable++
			}
		}
		s.Close()
		unix.Close(peer)
		if unreachable > 0 {
			t.Fatalf("round %d: %d DNS queries sent while the stack started came back port unreachable", round, unreachable)
		}
	}
}
