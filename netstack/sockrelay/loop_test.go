package sockrelay

import (
	"bytes"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"net"
	"syscall"
	"testing"
	"time"

	"github.com/netns-run/netns-run/netstack/sockrelay/relaytest"
)

// rawOf returns a non-blocking duplicate of c's socket, which the caller
// owns, and closes c.
func rawOf(t *testing.T, c *net.TCPConn) int {
	t.Helper()
	fd, err := Detach(c)
	if err != nil {
		t.Fatal(err)
	}
	return fd
}

type ended struct{ up, down int64 }

func newLoop(t *testing.T, pipes *Pipes) *Loop {
	t.Helper()
	l, err := NewLoop(pipes)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(l.Close)
	return l
}

// Bytes cross whole both ways, counted, in several pairs at once; each end
// of stream arrives as one, after which the other direction still flows;
// clean ends leave their pipes to later pairs.
func TestLoopCopiesAndHalfCloses(t *testing.T) {
	var pipes Pipes
	defer pipes.Close()
	l := newLoop(t, &pipes)
	const pairs = 3
	errs := make(chan error, pairs)
	for range pairs {
		guestApp, guest := relaytest.TCPPair(t)
		host, hostApp := relaytest.TCPPair(t)
		done := make(chan ended, 1)
		if err := l.Add(rawOf(t, guest), rawOf(t, host), nil, func(up, down int64) { done <- ended{up, down} }); err != nil {
			t.Fatal(err)
		}
		go func() { errs <- exchange(guestApp, hostApp, done) }()
	}
	for range pairs {
		if err := <-errs; err != nil {
			t.Error(err)
		}
	}
	kept := l.keptPipes()
	// Pipes that grew (bulk) were closed, the others kept: a pair's two
	// in the goroutine's pool when it went to the fast loop, and its
	// down one there (a pair may have started with one an earlier pair
	// had returned).
	if kept == 0 || kept > 3*pairs {
		t.Errorf("%d pipes kept after clean ends, want 1 to %d", kept, 3*pairs)
	}
}

// exchange sends 3 MiB up and, after the guest's end of stream, 512 KiB
// down, and checks what arrived and what the loop counted.
func exchange(guestApp, hostApp *net.TCPConn, done chan ended) error {
	up := make([]byte, 3<<20)
	down := make([]byte, 512<<10)
	rand.Read(up)
	rand.Read(down)
	deadline := time.Now().Add(20 * time.Second)
	guestApp.SetDeadline(deadline)
	hostApp.SetDeadline(deadline)
	go func() {
		guestApp.Write(up)
		guestApp.CloseWrite()
	}()
	got, err := io.ReadAll(hostApp)
	if err != nil || !bytes.Equal(got, up) {
		return errors.New("guest -> host: bytes differ or " + errString(err))
	}
	go func() {
		hostApp.Write(down)
		hostApp.CloseWrite()
	}()
	got, err = io.ReadAll(guestApp)
	if err != nil || !bytes.Equal(got, down) {
		return errors.New("host -> guest after the guest's end: bytes differ or " + errString(err))
	}
	select {
	case c := <-done:
		if c.up != int64(len(up)) || c.down != int64(len(down)) {
			return errors.New("counted wrong")
		}
	case <-time.After(10 * time.Second):
		return errors.New("the pair did not end after both ends of stream")
	}
	return nil
}

func errString(err error) string {
	if err == nil {
		return "no error"
	}
	return err.Error()
}

// A reset of the guest's side, even after its end of stream, resets the
// host's: a pair's first exchanges, and a busy pair's (with cgo, the fast
// loop has it by then).
func TestLoopPassesReset(t *testing.T) {
	for _, exchanges := range []int{0, 4} {
		passesReset(t, exchanges)
	}
}

func passesReset(t *testing.T, exchanges int) {
	l := newLoop(t, nil)
	guestApp, guest := relaytest.TCPPair(t)
	host, hostApp := relaytest.TCPPair(t)
	if err := l.Add(rawOf(t, guest), rawOf(t, host), nil, nil); err != nil {
		t.Fatal(err)
	}
	requests(t, guestApp, hostApp, exchanges, nil)
	checkResetPasses(t, guestApp, hostApp, fmt.Sprintf("after %d exchanges, ", exchanges))
}

// requests makes n 1-byte requests from guestApp that hostApp answers;
// after each, check (if not nil) may look at what the relay did.
func requests(t *testing.T, guestApp, hostApp *net.TCPConn, n int, check func(i int)) {
	t.Helper()
	guestApp.SetDeadline(time.Now().Add(5 * time.Second))
	hostApp.SetDeadline(time.Now().Add(5 * time.Second))
	buf := make([]byte, 1)
	for i := range n {
		guestApp.Write([]byte("q"))
		if _, err := io.ReadFull(hostApp, buf); err != nil {
			t.Fatal(err)
		}
		hostApp.Write([]byte("a"))
		if _, err := io.ReadFull(guestApp, buf); err != nil {
			t.Fatal(err)
		}
		if check != nil {
			check(i)
		}
	}
}

// Closing the loop resets the pairs it relays; it takes no more.
func TestLoopCloseResets(t *testing.T) {
	l, err := NewLoop(nil)
	if err != nil {
		t.Fatal(err)
	}
	guestApp, guest := relaytest.TCPPair(t)
	host, hostApp := relaytest.TCPPair(t)
	if err := l.Add(rawOf(t, guest), rawOf(t, host), nil, nil); err != nil {
		t.Fatal(err)
	}
	// The relay works before the close.
	guestApp.SetDeadline(time.Now().Add(5 * time.Second))
	hostApp.SetDeadline(time.Now().Add(5 * time.Second))
	guestApp.Write([]byte("x"))
	if _, err := io.ReadFull(hostApp, make([]byte, 1)); err != nil {
		t.Fatal(err)
	}
	l.Close()
	if _, err := hostApp.Read(make([]byte, 1)); !errors.Is(err, syscall.ECONNRESET) {
		t.Errorf("host side after the loop closed: %v, want a reset", err)
	}
	a, b := relaytest.TCPPair(t)
	if err := l.Add(rawOf(t, a), rawOf(t, b), nil, nil); !errors.Is(err, errLoopClosed) {
		t.Errorf("Add after Close: %v", err)
	}
}

// busy runs once a pair carried more than a request and its answer.
func TestLoopBusy(t *testing.T) {
	l := newLoop(t, nil)
	guestApp, guest := relaytest.TCPPair(t)
	host, hostApp := relaytest.TCPPair(t)
	busy := make(chan struct{}, 2)
	if err := l.Add(rawOf(t, guest), rawOf(t, host), func() { busy <- struct{}{} }, nil); err != nil {
		t.Fatal(err)
	}
	requests(t, guestApp, hostApp, 4, func(i int) {
		if i == 0 && len(busy) > 0 {
			t.Fatal("busy after one request and its answer")
		}
	})
	select {
	case <-busy:
	case <-time.After(5 * time.Second):
		t.Fatal("busy did not run")
	}
	if len(busy) > 0 {
		t.Error("busy ran twice")
	}
}
