package netstack

import (
	"testing"

	"golang.org/x/sys/unix"
)

// arpRequest is a broadcast ARP request from sender for target (the last
// bytes of 10.0.2.0/24 addresses; sender 0 is 0.0.0.0, a probe).
func arpRequest(sender, target byte) []byte {
	spa := []byte{10, 0, 2, sender}
	if sender == 0 {
		spa = []byte{0, 0, 0, 0}
	}
	f := []byte{0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02, 0, 0, 0, 0, 1, 0x08, 0x06,
		0, 1, 0x08, 0, 6, 4, 0, 1, 0x02, 0, 0, 0, 0, 1}
	f = append(f, spa...)
	return append(f, 0, 0, 0, 0, 0, 0, 10, 0, 2, target)
}

// The stack answers ARP for on-link addresses, but not a probe (RFC 5227)
// or an announcement of an address that is not its own: a DHCP client
// checking its offer must find it free.
func TestARPProbesUnanswered(t *testing.T) {
	_, peer := stackOnSocketpair(t, DefaultConfig(), 0)
	_ = unix.SetsockoptTimeval(peer, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &unix.Timeval{Usec: 300000})
	answered := func(frame []byte) bool {
		if _, err := unix.Write(peer, frame); err != nil {
			t.Fatal(err)
		}
		buf := make([]byte, 2048)
		for {
			n, err := readPeer(peer, buf)
			if err != nil {
				return false
			}
			if n >= 42 && buf[12] == 0x08 && buf[13] == 0x06 && buf[21] == 2 {
				return true
			}
		}
	}
	for _, c := range []struct {
		name           string
		sender, target byte
		want           bool
	}{
		{"probe of a pool address", 0, 15, false},
		{"probe of the guest's address", 0, 100, false},
		{"announcement", 100, 100, false},
		{"probe of the gateway", 0, 2, true},
		{"request for the gateway", 100, 2, true},
		{"request for the DNS address", 100, 3, true},
		{"request for another on-link address", 100, 77, true},
	} {
		if got := answered(arpRequest(c.sender, c.target)); got != c.want {
			t.Errorf("%s: answered %v, want %v", c.name, got, c.want)
		}
	}
}
