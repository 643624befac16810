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

// A result larger than a control message holds (thousands of egress rules)
// comes through a pipe, whole, and the channel stays in step.
func TestLargeResult(t *testing.T) {
	engineEnd, parentEnd := seqpacketPair(t)
	e := &server{ctrl: engineEnd}
	big := []byte(`"` + strings.Repeat("r", 3*maxMessage) + `"`)
	if err := e.sendLarge(message{Op: opResult, ID: 7}, big); err != nil {
		t.Fatal(err)
	}
	if err := send(engineEnd, message{Op: opResult, ID: 8, Result: []byte(`1`)}); err != nil {
		t.Fatal(err)
	}
	m, f, err := recv(parentEnd)
	if err != nil || !m.Large || m.ID != 7 {
		t.Fatalf("first reply: %+v, %v", m, err)
	}
	got, err := readLarge(f)
	if err != nil || string(got) != string(big) {
		t.Fatalf("large result: %d of %d bytes, %v", len(got), len(big), err)
	}
	if m, _, err := recv(parentEnd); err != nil || m.ID != 8 || string(m.Result) != "1" {
		t.Errorf("the reply after it: %+v, %v", m, err)
	}
}
