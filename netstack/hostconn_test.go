package netstack

import (
	"bytes"
	"crypto/sha256"
	"errors"
	"io"
	"net"
	"testing"

	"github.com/netns-run/netns-run/netstack/sockrelay/relaytest"
)

// tcpPair returns both ends of a loopback TCP connection with small
// buffers, so that writes fill the socket quickly.
func tcpPair(t *testing.T) (*net.TCPConn, *net.TCPConn) {
	t.Helper()
	c, s := relaytest.TCPPair(t)
	_ = c.SetWriteBuffer(32 << 10)
	_ = s.SetReadBuffer(32 << 10)
	return c, s
}

// A streamWriter fed views of every size, as Endpoint.Read would, loses and
// reorders nothing when the socket fills: what it cannot send it keeps,
// refuses the rest, and flush delivers it.
func TestStreamWriterFullSocket(t *testing.T) {
	c, s := tcpPair(t)
	rc, err := c.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	w := newStreamWriter(rc)
	defer w.release()

	var data []byte
	for i := range 4 << 20 {
		data = append(data, byte(i*7+i>>9))
	}
	want := sha256.Sum256(data)
	got := make(chan [32]byte, 1)
	go func() {
		h := sha256.New()
		_, _ = io.Copy(h, s)
		got <- [32]byte(h.Sum(nil))
	}()

	sizes := []int{1, 128, 1920, 63488, 7, 4096, 100000}
	full := 0
	for off, i := 0, 0; off < len(data); i++ {
		// One "read": views until the writer refuses one.
		for off < len(data) {
			n := min(sizes[i%len(sizes)], len(data)-off)
			m, err := w.Write(data[off : off+n])
			off += m
			i++
			if err != nil {
				if !errors.Is(err, errStreamFull) {
					t.Fatal(err)
				}
				full++
				break
			}
		}
		if err := w.flush(); err != nil {
			t.Fatal(err)
		}
	}
	if full == 0 {
		t.Error("the socket never filled; the test shows nothing")
	}
	c.CloseWrite()
	if h := <-got; !bytes.Equal(h[:], want[:]) {
		t.Fatal("the receiver got other bytes than were written")
	}
}
