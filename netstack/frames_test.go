package netstack

import (
	"context"
	"net/netip"
	"os"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/netns-run/netns-run/tap"
)

// newFrameStack runs a Stack whose "TAP" is one end of a datagram
// socketpair: every write to the other end is one Ethernet frame.
func newFrameStack(t testing.TB, vnetHdr int) (*Stack, int) {
	t.Helper()
	cfg := DefaultConfig()
	cfg.IPv6 = true
	// Nothing a fuzzed frame asks for may leave the stack: no outbound
	// flows, no host loopback, DNS only to the discard port on loopback.
	cfg.Restrict = true
	cfg.DisableHostLoopback = true
	cfg.DNSUpstreams = []netip.AddrPort{netip.MustParseAddrPort("127.0.0.1:9")}
	return stackOnSocketpair(t, cfg, vnetHdr)
}

// stackOnSocketpair runs a Stack on one end of a datagram socketpair as
// if it were a TAP and returns the other end; both close with the test.
func stackOnSocketpair(t testing.TB, cfg Config, vnetHdr int) (*Stack, int) {
	t.Helper()
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	s, err := newStack(context.Background(), cfg, tap.FromFiles("test0", []*os.File{os.NewFile(uintptr(fds[0]), "stack")}), vnetHdr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		s.Close()
		unix.Close(fds[1])
	})
	return s, fds[1]
}

// A valid ARP request for the gateway gets an answer: the harness works.
func TestFrameStackAnswersARP(t *testing.T) {
	_, peer := newFrameStack(t, 0)
	frame := []byte{
		0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02, 0, 0, 0, 0, 1, 0x08, 0x06, // Ethernet
		0, 1, 0x08, 0, 6, 4, 0, 1, // ARP request
		0x02, 0, 0, 0, 0, 1, 10, 0, 2, 100, // sender
		0, 0, 0, 0, 0, 0, 10, 0, 2, 2, // target 10.0.2.2
	}
	if _, err := unix.Write(peer, frame); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 2048)
	_ = unix.SetsockoptTimeval(peer, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &unix.Timeval{Sec: 2})
	// Router advertisements may come first.
	for i := 0; i < 10; i++ {
		n, err := readPeer(peer, buf)
		if err != nil {
			t.Fatalf("no ARP reply: %v", err)
		}
		if n >= 42 && buf[12] == 0x08 && buf[13] == 0x06 && buf[21] == 2 {
			return
		}
	}
	t.Fatal("no ARP reply among the first frames")
}

// FuzzFrames injects arbitrary frames from the guest side: the stack must
// not panic. (A panic in the stack's goroutines kills the fuzzing worker,
// which the fuzzer reports with the input.)
func FuzzFrames(f *testing.F) {
	seeds := [][]byte{
		make([]byte, 14),
		// IPv4 TCP SYN to 198.51.100.10:80 (checksums wrong on purpose).
		append([]byte{0x52, 0x55, 10, 0, 2, 2, 2, 0, 0, 0, 0, 1, 0x08, 0x00,
			0x45, 0, 0, 40, 0, 1, 0, 0, 64, 6, 0, 0, 10, 0, 2, 100, 198, 51, 100, 10},
			[]byte{0x30, 0x39, 0, 80, 0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x02, 0xff, 0xff, 0, 0, 0, 0}...),
		// IPv6 header with a huge payload length.
		{0x52, 0x55, 10, 0, 2, 2, 2, 0, 0, 0, 0, 1, 0x86, 0xdd, 0x60, 0, 0, 0, 0xff, 0xff, 58, 64},
		synFrame(netip.MustParseAddrPort("10.0.2.100:40000"), netip.MustParseAddrPort("10.0.2.2:22")),
	}
	for _, s := range seeds {
		f.Add(s)
	}
	_, peer := newFrameStack(f, 0)
	drain := make([]byte, 65536)
	f.Fuzz(func(t *testing.T, frame []byte) {
		// A TAP never delivers an empty frame; on this socketpair one
		// would read as end-of-file and stop the link.
		if len(frame) == 0 || len(frame) > 65535 {
			return
		}
		// Never block: if the stack is slow, frames are dropped, as a
		// full TAP queue would drop them.
		_ = unix.Send(peer, frame, unix.MSG_DONTWAIT)
		for {
			if _, _, err := unix.Recvfrom(peer, drain, unix.MSG_DONTWAIT); err != nil {
				break
			}
		}
	})
}

// readPeer reads a frame from the guest's end of a test link (blocking,
// with a receive timeout), again when the runtime's preemption signal
// interrupts the read.
func readPeer(peer int, buf []byte) (int, error) {
	for {
		n, err := unix.Read(peer, buf)
		if err != unix.EINTR {
			return n, err
		}
	}
}
