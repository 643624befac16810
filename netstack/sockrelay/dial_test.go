package sockrelay

import (
	"context"
	"errors"
	"io"
	"net"
	"net/netip"
	"os"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/netns-run/netns-run/netstack/sockrelay/relaytest"
)

// Dial's socket is connected; a refused connect says so.
func TestDialConnectsAndRefuses(t *testing.T) {
	ln, err := net.ListenTCP("tcp4", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	to := ln.Addr().(*net.TCPAddr).AddrPort()
	ctx := context.Background()
	fd, err := Dial(ctx, netip.MustParseAddr("127.0.0.1"), to, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	for _, o := range []struct {
		level, name int
		what        string
	}{{unix.IPPROTO_TCP, unix.TCP_NODELAY, "TCP_NODELAY"}, {unix.SOL_SOCKET, unix.SO_KEEPALIVE, "SO_KEEPALIVE"}} {
		if v, err := unix.GetsockoptInt(fd, o.level, o.name); err != nil || v == 0 {
			t.Errorf("%s: %d, %v; want it set", o.what, v, err)
		}
	}
	f := os.NewFile(uintptr(fd), "tcp")
	c, err := ln.AcceptTCP()
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, err := f.Write([]byte("hi")); err != nil {
		t.Fatal(err)
	}
	f.Close()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	if got, err := io.ReadAll(c); err != nil || string(got) != "hi" {
		t.Fatalf("read %q, %v", got, err)
	}
	ln.Close()
	if _, err := Dial(ctx, netip.Addr{}, to, 5*time.Second); !errors.Is(err, unix.ECONNREFUSED) {
		t.Fatalf("dial to a closed port: %v, want ECONNREFUSED", err)
	}
}

// A connect that gets no answer ends at the timeout as ETIMEDOUT, and at
// once when its context ends.
func TestDialTimesOut(t *testing.T) {
	// A listener with a full accept queue drops SYNs.
	fd, to := relaytest.FullListener(t)
	full := false
	for range 8 {
		fd, err := Dial(context.Background(), netip.Addr{}, to, 300*time.Millisecond)
		if errors.Is(err, unix.ETIMEDOUT) {
			full = true
			break
		}
		if err != nil {
			t.Fatalf("dial: %v", err)
		}
		defer unix.Close(fd)
	}
	if !full {
		t.Skip("the kernel answered every connect to a listener with a full queue")
	}
	// A connect that ends after a wait gives a socket that works: the
	// queue makes room, and the SYN's resend (after a second) gets in.
	go func() {
		time.Sleep(200 * time.Millisecond)
		for {
			// (The runtime's preemption signal may interrupt it.)
			nfd, _, err := unix.Accept4(fd, unix.SOCK_CLOEXEC)
			if err == nil {
				unix.Close(nfd)
			}
			if err != unix.EINTR {
				return
			}
		}
	}()
	late, err := Dial(context.Background(), netip.Addr{}, to, 10*time.Second)
	if err != nil {
		t.Fatalf("dial once the queue had room: %v", err)
	}
	if ended, err := Connected(late); !ended || err != nil {
		t.Fatalf("the late connection: connected %v, %v", ended, err)
	}
	unix.Close(late)
	ctx, cancel := context.WithCancel(context.Background())
	time.AfterFunc(100*time.Millisecond, cancel)
	// Without the context's end it would wait out the minute and say
	// ETIMEDOUT.
	if _, err := Dial(ctx, netip.Addr{}, to, time.Minute); !errors.Is(err, context.Canceled) {
		t.Fatalf("dial whose context ended: %v, want context.Canceled", err)
	}
}
