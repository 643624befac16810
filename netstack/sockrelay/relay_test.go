package sockrelay

import (
	"bytes"
	"errors"
	"io"
	"net"
	"os"
	"syscall"
	"testing"
	"time"

	"github.com/netns-run/netns-run/netstack/sockrelay/relaytest"
)

// Bytes cross whole both ways, counted; each end of stream arrives as one,
// after which the other direction still flows.
func TestRelayCopiesAndHalfCloses(t *testing.T) {
	guestApp, guest := relaytest.TCPPair(t)
	host, hostApp := relaytest.TCPPair(t)
	done := make(chan ended, 1)
	go func() {
		up, down := Relay(guest, host, nil)
		done <- ended{up, down}
	}()
	if err := exchange(guestApp, hostApp, done); err != nil {
		t.Fatal(err)
	}
}

// A reset of the guest's side, even after its end of stream, resets the
// host's.
func TestRelayPassesReset(t *testing.T) {
	guestApp, guest := relaytest.TCPPair(t)
	host, hostApp := relaytest.TCPPair(t)
	go Relay(guest, host, nil)
	checkResetPasses(t, guestApp, hostApp, "")
}

// checkResetPasses ends the guest's side, then resets it, and checks that
// the host's side sees the end, then the reset.
func checkResetPasses(t *testing.T, guestApp, hostApp *net.TCPConn, what string) {
	t.Helper()
	guestApp.CloseWrite()
	hostApp.SetDeadline(time.Now().Add(5 * time.Second))
	if n, err := hostApp.Read(make([]byte, 1)); n != 0 || err != io.EOF {
		t.Fatalf("%safter the guest's end: %d bytes, %v; want EOF", what, n, err)
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
		t.Errorf("%shost side after the guest's reset: %v, want a reset", what, err)
	}
}

// fileOf returns c's socket as the *os.File of a non-blocking descriptor,
// as a port helper's sockets arrive, and closes c.
func fileOf(t *testing.T, c *net.TCPConn) *os.File {
	t.Helper()
	f := os.NewFile(uintptr(rawOf(t, c)), "socket")
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
		guestApp, guestConn := relaytest.TCPPair(t)
		host, hostApp := relaytest.TCPPair(t)
		guest := fileOf(t, guestConn)
		done := make(chan struct{})
		go func() {
			Relay(guest, host, &pipes)
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
