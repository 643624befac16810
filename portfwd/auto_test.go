package portfwd

import (
	"net"
	"net/netip"
	"os"
	"reflect"
	"testing"
)

const procNetTCP = `  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0000000000000000 100 0 0 10 0
   1: 00000000:0050 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 2 1 0000000000000000 100 0 0 10 0
   2: 0100007F:1F90 0100007F:D431 01 00000000:00000000 00:00000000 00000000     0        0 3 1 0000000000000000 20 4 30 10 -1
`

const procNetUDP6 = `  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops
   0: 00000000000000000000000000000000:0035 00000000000000000000000000000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 4 2 0000000000000000 0
   1: 00000000000000000000000001000000:A1B2 00000000000000000000000001000000:0035 01 00000000:00000000 00:00000000 00000000     0        0 5 2 0000000000000000 0
`

func TestListeningPorts(t *testing.T) {
	if got := ListeningPorts([]byte(procNetTCP), false); !reflect.DeepEqual(got, []uint16{8080, 80}) {
		t.Errorf("tcp: %v", got)
	}
	if got := ListeningPorts([]byte(procNetUDP6), true); !reflect.DeepEqual(got, []uint16{53}) {
		t.Errorf("udp6 (connected sockets left out): %v", got)
	}
	if got := ListeningPorts([]byte("garbage\n 0: zz:zz 0 0A\n 1: 0:0 0:0 0A\n"), false); len(got) != 0 {
		t.Errorf("garbage: %v", got)
	}
}

func TestProcNetScan(t *testing.T) {
	f, err := os.CreateTemp(t.TempDir(), "udp")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteString(procNetUDP6); err != nil {
		t.Fatal(err)
	}
	p := ProcNet{Files: []*os.File{f}, UDP: true, SkipFrom: 50, SkipTo: 60}
	defer p.Close()
	for range 2 { // read again from the start every time
		if got, err := p.Scan(); err != nil || len(got) != 0 {
			t.Errorf("port 53 in the skipped range: %v %v", got, err)
		}
	}
	p.SkipFrom, p.SkipTo = 32768, 60999
	if got, err := p.Scan(); err != nil || !got[53] || len(got) != 1 {
		t.Errorf("scan: %v %v", got, err)
	}
}

// freePorts returns n TCP ports free on 127.0.0.1 at the time of asking.
func freePorts(t *testing.T, n int) []uint16 {
	var out []uint16
	for range n {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		defer ln.Close()
		out = append(out, uint16(ln.Addr().(*net.TCPAddr).Port))
	}
	return out
}

func TestFollower(t *testing.T) {
	m := New(nullGuest{}, nil)
	defer m.Close()
	ports := freePorts(t, 3)
	a, b, skipped := ports[0], ports[1], ports[2]
	listening := map[uint16]bool{}
	lo := netip.MustParseAddr("127.0.0.1")
	f := &Follower{Map: m, Proto: "tcp",
		Scan: func() (map[uint16]bool, error) { return listening, nil },
		Rules: func(p uint16) []Rule {
			return []Rule{{Proto: "tcp", HostAddr: lo, HostPort: p, GuestAddr: lo, GuestPort: p}}
		},
		Skip: func(p uint16) bool { return p == skipped },
	}
	listening[a], listening[skipped] = true, true
	if err := f.Sync(); err != nil {
		t.Fatal(err)
	}
	if !m.HasPort("tcp", a) || m.HasPort("tcp", skipped) {
		t.Fatalf("after the first scan: %v", m.List())
	}
	// b is taken on our side: not bound, and not tried again while it
	// keeps listening over there.
	taken, err := net.Listen("tcp", netip.AddrPortFrom(lo, b).String())
	if err != nil {
		t.Fatal(err)
	}
	listening[b] = true
	_ = f.Sync()
	taken.Close()
	_ = f.Sync()
	if m.HasPort("tcp", b) {
		t.Errorf("a port that failed was tried again while still listening")
	}
	delete(listening, a)
	delete(listening, b)
	_ = f.Sync()
	if m.HasPort("tcp", a) {
		t.Errorf("a port that stopped listening is still forwarded")
	}
	listening[b] = true
	_ = f.Sync()
	if !m.HasPort("tcp", b) {
		t.Errorf("a port that failed before is not bound once it listens again: %v", m.List())
	}
}
