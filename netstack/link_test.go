package netstack

import (
	"context"
	"net/netip"
	"os"
	"testing"
	"time"

	"golang.org/x/sys/unix"
	"gvisor.dev/gvisor/pkg/buffer"
	"gvisor.dev/gvisor/pkg/tcpip/stack"

	"github.com/netns-run/netns-run/tap"
)

// Closing the stack while the guest keeps sending must not deadlock: a
// reader delivering a frame needs the stack's lock, which gVisor's teardown
// holds while it waits for link endpoints (seen once: a helper hung at exit
// after an iperf3 run).
func TestCloseWhileFramesArrive(t *testing.T) {
	for i := 0; i < 20; i++ {
		cfg := DefaultConfig()
		cfg.Restrict = true
		cfg.DNSUpstreams = []netip.AddrPort{netip.MustParseAddrPort("127.0.0.1:9")}
		fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
		if err != nil {
			t.Fatal(err)
		}
		peer := fds[1]
		t.Cleanup(func() { unix.Close(peer) })
		// Not closed by a cleanup: closing it is the test, and a hung
		// Close must fail the test, not hang its cleanup.
		s, err := New(context.Background(), cfg, tap.FromFiles("test0", []*os.File{os.NewFile(uintptr(fds[0]), "stack")}))
		if err != nil {
			t.Fatal(err)
		}
		frame := synFrame(netip.MustParseAddrPort("10.0.2.100:40000"), netip.MustParseAddrPort("10.0.2.2:9"))
		stop := make(chan struct{})
		done := make(chan struct{})
		go func() {
			defer close(done)
			for {
				select {
				case <-stop:
					return
				default:
				}
				_ = unix.Send(peer, frame, unix.MSG_DONTWAIT)
				_, _, _ = unix.Recvfrom(peer, make([]byte, 2048), unix.MSG_DONTWAIT)
			}
		}()
		time.Sleep(5 * time.Millisecond)
		closed := make(chan struct{})
		go func() {
			s.Close()
			close(closed)
		}()
		select {
		case <-closed:
		case <-time.After(10 * time.Second):
			close(stop)
			t.Fatalf("round %d: Close did not return within 10 s while frames arrived", i)
		}
		close(stop)
		<-done
	}
}

// The virtio-net header the guest's kernel gets: checksum left to it from
// the TCP header on, and segments longer than the MSS marked for
// segmentation.
func TestEncodeVnetHdr(t *testing.T) {
	for _, c := range []struct {
		name    string
		gso     stack.GSO
		payload int
		want    [tap.VnetHdrSize]byte
	}{
		{"plain", stack.GSO{}, 3000, [10]byte{}},
		{"v4 segment", stack.GSO{Type: stack.GSOTCPv4, NeedsCsum: true, CsumOffset: 16, MSS: 1460, L3HdrLen: 20}, 3000,
			[10]byte{1, vnetGSOTCPv4, 54, 0, 0xb4, 0x05, 34, 0, 16, 0}},
		{"v4 small", stack.GSO{Type: stack.GSOTCPv4, NeedsCsum: true, CsumOffset: 16, MSS: 1460, L3HdrLen: 20}, 100,
			[10]byte{1, 0, 0, 0, 0, 0, 34, 0, 16, 0}},
		{"v6 segment", stack.GSO{Type: stack.GSOTCPv6, NeedsCsum: true, CsumOffset: 16, MSS: 1440, L3HdrLen: 40}, 65000,
			[10]byte{1, vnetGSOTCPv6, 74, 0, 0xa0, 0x05, 54, 0, 16, 0}},
	} {
		t.Run(c.name, func(t *testing.T) {
			pkt := stack.NewPacketBuffer(stack.PacketBufferOptions{
				ReserveHeaderBytes: 128,
				Payload:            buffer.MakeWithData(make([]byte, c.payload)),
			})
			defer pkt.DecRef()
			pkt.TransportHeader().Push(20)
			pkt.NetworkHeader().Push(int(max(c.gso.L3HdrLen, 20)))
			pkt.LinkHeader().Push(14)
			pkt.GSOOptions = c.gso
			var got [10]byte
			encodeVnetHdr(got[:], pkt)
			if got != c.want {
				t.Errorf("header % x, want % x", got, c.want)
			}
		})
	}
}

// A hostile or confused guest controls nothing of the virtio-net header
// (the kernel writes it), but the reader must still refuse what it did not
// ask for rather than hand it to the stack.
func FuzzVnetFrames(f *testing.F) {
	syn := synFrame(netip.MustParseAddrPort("10.0.2.100:40000"), netip.MustParseAddrPort("10.0.2.2:22"))
	for _, hdr := range [][]byte{
		make([]byte, 10),
		{1, vnetGSOTCPv4, 54, 0, 0xb4, 0x05, 34, 0, 16, 0},
		{1, vnetGSOTCPv6 | vnetGSOECN, 74, 0, 0xa0, 0x05, 54, 0, 16, 0},
		{1, 5, 42, 0, 0x78, 0x05, 34, 0, 6, 0}, // UDP segmentation, never asked for
		{1, 0, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff},
	} {
		f.Add(hdr, syn)
	}
	_, peer := newFrameStack(f, tap.VnetHdrSize)
	drain := make([]byte, 65536)
	f.Fuzz(func(t *testing.T, hdr, frame []byte) {
		if len(hdr) != tap.VnetHdrSize || len(frame) == 0 || len(frame) > 65535 {
			return
		}
		_ = unix.Send(peer, append(append([]byte(nil), hdr...), frame...), unix.MSG_DONTWAIT)
		for {
			if _, _, err := unix.Recvfrom(peer, drain, unix.MSG_DONTWAIT); err != nil {
				break
			}
		}
	})
}
