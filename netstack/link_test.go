package netstack

import (
	"context"
	"net/netip"
	"os"
	"testing"
	"time"

	"golang.org/x/sys/unix"

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
