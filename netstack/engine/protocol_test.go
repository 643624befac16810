package engine

import (
	"errors"
	"io"
	"net"
	"os"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/netns-run/netns-run/tap"
)

func seqpacketPair(t *testing.T) (*net.UnixConn, *net.UnixConn) {
	t.Helper()
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_SEQPACKET|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	a, err := tap.UnixConn(os.NewFile(uintptr(fds[0]), "a"))
	if err != nil {
		t.Fatal(err)
	}
	b, err := tap.UnixConn(os.NewFile(uintptr(fds[1]), "b"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { a.Close(); b.Close() })
	return a, b
}

// TestDatagramConnEmptyDatagram: an empty UDP datagram crosses as an empty
// record and is not mistaken for the end of the flow; the peer's close is.
func TestDatagramConnEmptyDatagram(t *testing.T) {
	a, b := seqpacketPair(t)
	d, err := newDatagramConn(b)
	if err != nil {
		t.Fatal(err)
	}
	_ = d.SetReadDeadline(time.Now().Add(5 * time.Second))
	for _, msg := range []string{"", "x", ""} {
		if _, err := a.Write([]byte(msg)); err != nil {
			t.Fatal(err)
		}
		buf := make([]byte, 16)
		n, err := d.Read(buf)
		if err != nil || string(buf[:n]) != msg {
			t.Fatalf("read %q, %v; want %q", buf[:n], err, msg)
		}
	}
	a.Close()
	if n, err := d.Read(make([]byte, 16)); !errors.Is(err, io.EOF) {
		t.Fatalf("after the peer closed: %d, %v; want EOF", n, err)
	}
}

// TestRecvRejectsGarbage: what a broken or hostile engine sends is an
// error, never a panic or a half-read message.
func TestRecvRejectsGarbage(t *testing.T) {
	a, b := seqpacketPair(t)
	for _, msg := range []string{"not json", `{"op":"result","id":"x"}`, strings.Repeat("x", maxMessage+10)} {
		if _, err := a.Write([]byte(msg)); err != nil {
			t.Fatal(err)
		}
		if _, _, err := recv(b); err == nil {
			t.Errorf("%.20q: accepted", msg)
		}
	}
	a.Close()
	if _, _, err := recv(b); !errors.Is(err, errHangup) {
		t.Errorf("after close: %v, want hang-up", err)
	}
}
