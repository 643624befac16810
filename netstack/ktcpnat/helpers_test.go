package ktcpnat

import (
	"crypto/sha256"
	"io"
	"math/rand/v2"
	"net"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
)

// acceptOne accepts one connection on ln in the background; the channel
// closes empty if the accept fails.
func acceptOne(ln *net.TCPListener) <-chan *net.TCPConn {
	accepted := make(chan *net.TCPConn, 1)
	go func() {
		if c, err := ln.AcceptTCP(); err == nil {
			accepted <- c
		}
		close(accepted)
	}()
	return accepted
}

// tapSent returns the bytes tap0 has sent so far.
func tapSent(t *testing.T) uint64 {
	t.Helper()
	l, err := netlink.LinkByName("tap0")
	if err != nil {
		t.Error(err)
		return 0
	}
	return l.Attrs().Statistics.TxBytes
}

// checkBothWays sends up random bytes from a to b and then down from b to
// a, each followed by a half-close, and checks that every byte arrived
// intact within 10 s.
func checkBothWays(t *testing.T, a, b *net.TCPConn, up, down int) {
	t.Helper()
	payload := make([]byte, max(up, down))
	for i := range payload {
		payload[i] = byte(rand.Uint32())
	}
	deadline := time.Now().Add(10 * time.Second)
	a.SetDeadline(deadline)
	b.SetDeadline(deadline)
	for _, dir := range []struct {
		name     string
		src, dst *net.TCPConn
		n        int
	}{{"a -> b", a, b, up}, {"b -> a", b, a, down}} {
		go func() {
			dir.src.Write(payload[:dir.n])
			dir.src.CloseWrite()
		}()
		got, err := io.ReadAll(dir.dst)
		if err != nil || sha256.Sum256(got) != sha256.Sum256(payload[:dir.n]) {
			t.Errorf("%s: %d of %d bytes, err %v", dir.name, len(got), dir.n, err)
		}
	}
}
