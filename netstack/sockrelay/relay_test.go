package sockrelay

import (
	"bytes"
	"crypto/rand"
	"errors"
	"io"
	"net"
	"os"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// pair returns both ends of a loopback TCP connection.
func pair(t *testing.T) (a, b *net.TCPConn) {
	t.Helper()
	ln, err := net.ListenTCP("tcp4", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	c, err := net.DialTCP("tcp4", nil, ln.Addr().(*net.TCPAddr))
	if err != nil {
		t.Fatal(err)
	}
	s, err := ln.AcceptTCP()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close(); s.Close() })
	return c, s
}

// Bytes cross whole both ways, counted; each end of stream arrives as one,
// after which the other direction still flows.
func TestRelayCopiesAndHalfCloses(t *testing.T) {
	guestApp, guest := pair(t)
	host, hostApp := pair(t)
	type counts struct{ up, down int64 }
	done := make(chan counts, 1)
	go func() {
		up, down := Relay(guest, host, nil, nil)
		done <- counts{up, down}
	}()
	up := make([]byte, 3<<20)
	down := make([]byte, 1<<20)
	rand.Read(up)
	rand.Read(down)
	deadline := time.Now().Add(10 * time.Second)
	guestApp.SetDeadline(deadline)
	hostApp.SetDeadline(deadline)
	go func() {
		guestApp.Write(up)
		guestApp.CloseWrite()
	}()
	got, err := io.ReadAll(hostApp)
	if err != nil || !bytes.Equal(got, up) {
		t.Fatalf("guest -> host: %d of %d bytes, err %v", len(got), len(up), err)
	}
	go func() {
		hostApp.Write(down)
		hostApp.CloseWrite()
	}()
	got, err = io.ReadAll(guestApp)
	if err != nil || !bytes.Equal(got, down) {
		t.Fatalf("host -> guest after the guest's end: %d of %d bytes, err %v", len(got), len(down), err)
	}
	select {
	case c := <-done:
		if c.up != int64(len(up)) || c.down != int64(len(down)) {
			t.Errorf("counted %d up, %d down; want %d, %d", c.up, c.down, len(up), len(down))
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the relay did not end after both ends of stream")
	}
}

// A reset of the guest's side, even after its end of stream, resets the
// host's.
func TestRelayPassesReset(t *testing.T) {
	guestApp, guest := pair(t)
	host, hostApp := pair(t)
	go Relay(guest, host, nil, nil)
	guestApp.CloseWrite()
	hostApp.SetDeadline(time.Now().Add(5 * time.Second))
	if n, err := hostApp.Read(make([]byte, 1)); n != 0 || err != io.EOF {
		t.Fatalf("after the guest's end: %d bytes, %v; want EOF", n, err)
	}
	guestApp.SetLinger(0)
	guestApp.Close()
	// The host keeps sending until it sees the reset.
	var err error
	for range 100 {
		if _, err = hostApp.Write([]byte("x")); err != nil {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	if !errors.Is(err, syscall.ECONNRESET) && !errors.Is(err, syscall.EPIPE) {
		t.Errorf("host side after the guest's reset: %v, want a reset", err)
	}
}

// fileOf returns c's socket as the *os.File of a non-blocking descriptor,
// as a port helper's sockets arrive, and closes c.
func fileOf(t *testing.T, c *net.TCPConn) *os.File {
	t.Helper()
	rc, err := c.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	fd := -1
	if err := rc.Control(func(s uintptr) { fd, err = unix.FcntlInt(s, unix.F_DUPFD_CLOEXEC, 0) }); err != nil || fd < 0 {
		t.Fatalf("dup: %v", err)
	}
	c.Close()
	if err := unix.SetNonblock(fd, true); err != nil {
		t.Fatal(err)
	}
	f := os.NewFile(uintptr(fd), "socket")
	t.Cleanup(func() { f.Close() })
	if err := f.SetDeadline(time.Time{}); err != nil {
		t.Fatalf("the poller did not take the socket: %v", err)
	}
	return f
}

// Sockets given as files relay as conns do, and relays that end cleanly
// leave their pipes to the next one.
func TestRelayFilesAndPipeReuse(t *testing.T) {
	var pipes Pipes
	defer pipes.Close()
	for round := range 3 {
		guestApp, guestConn := pair(t)
		host, hostApp := pair(t)
		guest := fileOf(t, guestConn)
		done := make(chan struct{})
		go func() {
			Relay(guest, host, &pipes, nil)
			close(done)
		}()
		msg := []byte("request")
		deadline := time.Now().Add(5 * time.Second)
		guestApp.SetDeadline(deadline)
		hostApp.SetDeadline(deadline)
		if _, err := guestApp.Write(msg); err != nil {
			t.Fatal(err)
		}
		got := make([]byte, len(msg))
		if _, err := io.ReadFull(hostApp, got); err != nil || !bytes.Equal(got, msg) {
			t.Fatalf("round %d: host got %q, %v", round, got, err)
		}
		guestApp.CloseWrite()
		hostApp.CloseWrite()
		if _, err := io.ReadAll(guestApp); err != nil {
			t.Fatal(err)
		}
		select {
		case <-done:
		case <-time.After(5 * time.Second):
			t.Fatal("the relay did not end")
		}
		pipes.mu.Lock()
		kept := len(pipes.free)
		pipes.mu.Unlock()
		if kept != 2 {
			t.Fatalf("round %d: %d pipes kept after a clean end, want 2", round, kept)
		}
	}
}
