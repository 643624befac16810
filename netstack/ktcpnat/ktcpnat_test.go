package ktcpnat

import (
	"bytes"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/google/nftables"
	"github.com/google/nftables/binaryutil"
	"github.com/google/nftables/expr"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/checksum"
	"gvisor.dev/gvisor/pkg/tcpip/header"

	"github.com/netns-run/netns-run/tap"
	"github.com/netns-run/netns-run/tap/taptest"
)

// A connection to a remote address ends at a listener in the namespace
// once the maps have the flow, with every byte intact both ways and each
// side seeing the addresses the helper chose. Its SYN and the listener's
// answer cross the TAP (the rules leave SYNs alone, and the listener's side
// is translated once the guest's side was), where the test does the
// helper's part: rewrite them and write them back. The rest never reaches
// the TAP.
func TestMapRewritesToListener(t *testing.T) {
	inFreshNetns(t, func(skip func(string)) {
		dev, guest, ok := setUpGuest(t)
		if !ok {
			return
		}
		defer dev.Close()
		ln, err := net.ListenTCP("tcp4", &net.TCPAddr{IP: guest.AsSlice()})
		if err != nil {
			t.Error(err)
			return
		}
		defer ln.Close()
		lnPort := uint16(ln.Addr().(*net.TCPAddr).Port)
		for _, broker := range []bool{false, true} {
			sock, err := Install("tap0")
			if err != nil {
				skip(fmt.Sprintf("nftables unusable here: %v", err))
				return
			}
			var m Table = NewMap(sock)
			if broker {
				if sock, err = ServeInBackground(sock, lnPort); err == nil {
					m, err = Open(sock)
				}
				if err != nil {
					t.Error(err)
					return
				}
			}
			checkRewrites(t, m, dev.Queues()[0], ln, 41000+uint16(btoi(broker)))
			m.Close()
		}
	})
}

// checkRewrites puts a flow into m and checks a connection through it, and
// takes it out.
func checkRewrites(t *testing.T, m Table, tapQueue *os.File, ln *net.TCPListener, clientPort uint16) {
	t.Helper()
	lnAddr := ln.Addr().(*net.TCPAddr).AddrPort()
	guest := lnAddr.Addr()
	client := netip.AddrPortFrom(guest, clientPort)
	remote := netip.MustParseAddrPort("203.0.113.7:80")
	fake := netip.MustParseAddrPort("203.0.113.7:30000")
	f := Flow{Guest: client, Remote: remote, Fake: fake, Listener: lnAddr}
	if err := m.Add(f); err != nil {
		t.Errorf("add: %v", err)
		return
	}
	if err := m.Add(f); !errors.Is(err, unix.EEXIST) {
		t.Errorf("adding the same flow twice: %v, want EEXIST", err)
	}
	forwarded := make(chan struct{})
	go func() {
		forwardTAP(tapQueue, f, true)
		close(forwarded)
	}()
	defer func() {
		// The next flow's forwarder must be the queue's only reader.
		_ = tapQueue.SetReadDeadline(time.Now())
		<-forwarded
		_ = tapQueue.SetReadDeadline(time.Time{})
	}()
	accepted := acceptOne(ln)
	d := net.Dialer{LocalAddr: net.TCPAddrFromAddrPort(client), Timeout: 3 * time.Second}
	cc, err := d.Dial("tcp4", remote.String())
	if err != nil {
		t.Errorf("dial through the map: %v", err)
		return
	}
	c := cc.(*net.TCPConn)
	defer c.Close()
	s, ok := <-accepted
	if !ok {
		t.Error("the listener accepted nothing")
		return
	}
	defer s.Close()
	if got := s.RemoteAddr().(*net.TCPAddr).AddrPort(); got != fake {
		t.Errorf("listener sees peer %v, want %v", got, fake)
	}
	if got := c.RemoteAddr().(*net.TCPAddr).AddrPort(); got != remote {
		t.Errorf("client sees peer %v, want %v", got, remote)
	}
	sentBefore := tapSent(t)
	checkBothWays(t, c, s, 4<<20, 1<<20)
	if sent := tapSent(t) - sentBefore; sent > 64<<10 {
		t.Errorf("%d bytes left through the TAP during 5 MiB of transfers", sent)
	}
	if err := m.Remove(f, Both); err != nil {
		t.Errorf("remove: %v", err)
	}
	if err := m.Remove(f, Both); err != nil {
		t.Errorf("removing what is gone: %v", err)
	}
	v6 := f
	v6.Remote = netip.MustParseAddrPort("[2001:db8::1]:2")
	if err := m.Add(v6); err != ErrUnsupported {
		t.Errorf("an IPv6 flow: %v, want ErrUnsupported", err)
	}
}

// A broker takes well-formed requests only (the sandbox it serves may be
// hostile): whatever comes, no panic, and what parses encodes back the same.
func FuzzParseRequest(f *testing.F) {
	flow := Flow{Guest: netip.MustParseAddrPort("10.0.2.100:41000"), Remote: netip.MustParseAddrPort("203.0.113.7:80"),
		Fake: netip.MustParseAddrPort("203.0.113.7:30000"), Listener: netip.MustParseAddrPort("10.0.2.100:5000")}
	f.Add(appendRequest(nil, opAdd, flow, Both))
	f.Add(appendRequest(nil, opRemove, flow, Back))
	f.Add(appendRequest(nil, opAdd, flow, Out))
	f.Add(appendRequest(nil, opAdd, Flow{Guest: netip.MustParseAddrPort("[fd00::100]:41000"), Remote: netip.MustParseAddrPort("[2001:db8::7]:80"),
		Fake: netip.MustParseAddrPort("[2001:db8::7]:30000"), Listener: netip.MustParseAddrPort("[fd00::100]:5000")}, Both))
	f.Add([]byte{opAdd, 3})
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, b []byte) {
		op, flow, p, err := parseRequest(b)
		if err != nil {
			return
		}
		if out := appendRequest(nil, op, flow, p); !bytes.Equal(out, b) {
			t.Errorf("parsed %x as %v %v, which encodes as %x", b, flow, p, out)
		}
	})
}

// inFreshNetns runs f in a fresh network namespace (taptest.InFreshNetns);
// the reason f gives skip skips the test once f returned, from the test's
// own goroutine (t.Skip must not run on the namespace's).
func inFreshNetns(t *testing.T, f func(skip func(why string))) {
	t.Helper()
	var reason string
	taptest.InFreshNetns(t, func() { f(func(why string) { reason = why }) })
	if reason != "" {
		t.Skip(reason)
	}
}

func btoi(b bool) int {
	if b {
		return 1
	}
	return 0
}

var remoteMAC = net.HardwareAddr{0x02, 0, 0, 0, 0, 7}

// setUpGuest gives the namespace the guest's TAP (nobody reads it but the
// test), address and a route to 203.0.113.0/24 through it, with the
// remote's MAC known (no ARP: a SYN goes out at once).
func setUpGuest(t *testing.T) (*tap.TapDevice, netip.Addr, bool) {
	guest := netip.MustParseAddr("10.0.2.100")
	dev, err := tap.Create("tap0", tap.Options{})
	if err != nil {
		t.Error(err)
		return nil, guest, false
	}
	for _, name := range []string{"lo", "tap0"} {
		l, err := netlink.LinkByName(name)
		if err == nil {
			err = netlink.LinkSetUp(l)
		}
		if err == nil && name == "tap0" {
			err = netlink.AddrAdd(l, &netlink.Addr{IPNet: &net.IPNet{IP: guest.AsSlice(), Mask: net.CIDRMask(24, 32)}})
		}
		if err == nil && name == "tap0" {
			_, dst, _ := net.ParseCIDR("203.0.113.0/24")
			err = netlink.RouteAdd(&netlink.Route{LinkIndex: l.Attrs().Index, Dst: dst, Scope: netlink.SCOPE_LINK})
		}
		if err == nil && name == "tap0" {
			err = netlink.NeighAdd(&netlink.Neigh{LinkIndex: l.Attrs().Index, Family: netlink.FAMILY_V4,
				State: netlink.NUD_PERMANENT, IP: net.ParseIP("203.0.113.7"), HardwareAddr: remoteMAC})
		}
		if err != nil {
			t.Errorf("set up %s: %v", name, err)
			dev.Close()
			return nil, guest, false
		}
	}
	return dev, guest, true
}

// forwardTAP does the helper's part for f's segments that cross the TAP
// (with synOnly, the handshake's alone): the guest's go to the listener as
// from the fake address, the listener's back to the guest as from the
// remote one, rewritten and written back into the TAP. It returns once a
// read fails (the TAP closed, or a deadline passed).
func forwardTAP(q *os.File, f Flow, synOnly bool) {
	buf := make([]byte, 65536)
	for {
		n, err := q.Read(buf)
		if err != nil {
			return
		}
		fr := buf[:n]
		if len(fr) < header.EthernetMinimumSize+header.IPv4MinimumSize+header.TCPMinimumSize ||
			header.Ethernet(fr).Type() != header.IPv4ProtocolNumber {
			continue
		}
		ip := header.IPv4(fr[header.EthernetMinimumSize:])
		tcp := header.TCP(ip[ip.HeaderLength():ip.TotalLength()])
		if ip.Protocol() != uint8(header.TCPProtocolNumber) || synOnly && tcp.Flags()&header.TCPFlagSyn == 0 {
			continue
		}
		from := netip.AddrPortFrom(netip.AddrFrom4(ip.SourceAddress().As4()), tcp.SourcePort())
		var src, dst netip.AddrPort
		switch from {
		case f.Guest:
			src, dst = f.Fake, f.Listener
		case f.Listener:
			src, dst = f.Remote, f.Guest
		default:
			continue
		}
		s4, d4 := tcpip.AddrFrom4(src.Addr().As4()), tcpip.AddrFrom4(dst.Addr().As4())
		copy(fr[0:6], fr[6:12])
		copy(fr[6:12], remoteMAC)
		ip.SetSourceAddress(s4)
		ip.SetDestinationAddress(d4)
		ip.SetChecksum(0)
		ip.SetChecksum(^ip.CalculateChecksum())
		tcp.SetSourcePort(src.Port())
		tcp.SetDestinationPort(dst.Port())
		tcp.SetChecksum(0)
		sum := header.PseudoHeaderChecksum(header.TCPProtocolNumber, s4, d4, uint16(len(tcp)))
		tcp.SetChecksum(^tcp.CalculateChecksum(checksum.Checksum(tcp.Payload(), sum)))
		_, _ = q.Write(fr)
	}
}

// A flow's connections, tracked by the namespace's conntrack while their
// segments crossed the TAP (an input rule that looks at conntrack state
// turns it on), leave conntrack when the flow leaves the maps: once
// translated, the rules kept their segments out of it, and the entries
// would have stayed, ESTABLISHED, for days.
func TestRemoveForgetsConntrack(t *testing.T) {
	inFreshNetns(t, func(skip func(string)) {
		dev, guest, ok := setUpGuest(t)
		if !ok {
			return
		}
		defer dev.Close()
		sock, err := Install("tap0")
		if err != nil {
			skip(fmt.Sprintf("nftables unusable here: %v", err))
			return
		}
		m := NewMap(sock)
		defer m.Close()
		if err := trackConnections(); err != nil {
			skip(fmt.Sprintf("conntrack unusable here: %v", err))
			return
		}
		ln, err := net.ListenTCP("tcp4", &net.TCPAddr{IP: guest.AsSlice()})
		if err != nil {
			t.Error(err)
			return
		}
		defer ln.Close()
		f := Flow{Guest: netip.AddrPortFrom(guest, 41010), Remote: netip.MustParseAddrPort("203.0.113.7:80"),
			Fake: netip.MustParseAddrPort("203.0.113.7:30010"), Listener: ln.Addr().(*net.TCPAddr).AddrPort()}
		go forwardTAP(dev.Queues()[0], f, false)
		accepted := acceptOne(ln)
		d := net.Dialer{LocalAddr: net.TCPAddrFromAddrPort(f.Guest), Timeout: 3 * time.Second}
		cc, err := d.Dial("tcp4", f.Remote.String())
		if err != nil {
			t.Errorf("dial: %v", err)
			return
		}
		defer cc.Close()
		s := <-accepted
		if s == nil {
			t.Error("no accept")
			return
		}
		defer s.Close()
		tracked := func() (guestSide, listenerSide bool) {
			b, _ := os.ReadFile("/proc/thread-self/net/nf_conntrack")
			for _, l := range strings.Split(string(b), "\n") {
				guestSide = guestSide || strings.Contains(l, fmt.Sprintf("sport=%d dport=%d", f.Guest.Port(), f.Remote.Port()))
				listenerSide = listenerSide || strings.Contains(l, fmt.Sprintf("sport=%d dport=%d", f.Fake.Port(), f.Listener.Port()))
			}
			return guestSide, listenerSide
		}
		if g, l := tracked(); !g || !l {
			t.Errorf("before the maps, conntrack tracks the guest's connection %v, the listener's %v; want both", g, l)
		}
		if err := m.Add(f); err != nil {
			t.Errorf("add: %v", err)
			return
		}
		if err := m.Remove(f, Both); err != nil {
			t.Errorf("remove: %v", err)
		}
		if g, l := tracked(); g || l {
			t.Errorf("after the flow left the maps, conntrack still tracks the guest's connection %v, the listener's %v", g, l)
		}
	})
}

// trackConnections turns conntrack on in the calling thread's namespace: a
// rule that looks at connection state.
func trackConnections() error {
	c, err := nftables.New()
	if err != nil {
		return err
	}
	defer c.CloseLasting()
	table := c.AddTable(&nftables.Table{Family: nftables.TableFamilyINet, Name: "fw"})
	chain := c.AddChain(&nftables.Chain{Table: table, Name: "in", Type: nftables.ChainTypeFilter,
		Hooknum: nftables.ChainHookInput, Priority: nftables.ChainPriorityFilter})
	c.AddRule(&nftables.Rule{Table: table, Chain: chain, Exprs: []expr.Any{
		&expr.Ct{Register: 1, Key: expr.CtKeySTATE},
		&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 4,
			Mask: binaryutil.NativeEndian.PutUint32(expr.CtStateBitINVALID), Xor: binaryutil.NativeEndian.PutUint32(0)},
		&expr.Cmp{Op: expr.CmpOpNeq, Register: 1, Data: []byte{0, 0, 0, 0}},
		&expr.Verdict{Kind: expr.VerdictDrop},
	}})
	return c.Flush()
}

// recordingTable is a Table that notes what it was asked.
type recordingTable struct{ adds, removes int }

func (r *recordingTable) Add(Flow) error           { r.adds++; return nil }
func (r *recordingTable) Remove(Flow, Parts) error { r.removes++; return nil }
func (r *recordingTable) Close() error             { return nil }

// The broker applies flows the kernel TCP path makes and refuses others: a
// compromised sandbox could otherwise point connections inside the
// namespace at whatever it likes.
func TestBrokerRefusesImplausibleFlows(t *testing.T) {
	ours, theirs, err := Pair()
	if err != nil {
		t.Fatal(err)
	}
	defer theirs.Close()
	rec := &recordingTable{}
	served := make(chan error, 1)
	go func() { served <- Serve(theirs, rec, 5000) }()
	c, err := Open(ours)
	if err != nil {
		t.Fatal(err)
	}
	good := Flow{Guest: netip.MustParseAddrPort("10.0.2.100:41000"), Remote: netip.MustParseAddrPort("203.0.113.7:80"),
		Fake: netip.MustParseAddrPort("203.0.113.7:30000"), Listener: netip.MustParseAddrPort("10.0.2.100:5000")}
	if err := c.Add(good); err != nil {
		t.Errorf("a plausible flow: %v", err)
	}
	if err := c.Remove(good, Back); err != nil {
		t.Errorf("removing it: %v", err)
	}
	good6 := Flow{Guest: netip.MustParseAddrPort("[fd00::100]:41000"), Remote: netip.MustParseAddrPort("[2001:db8::7]:80"),
		Fake: netip.MustParseAddrPort("[2001:db8::7]:30000"), Listener: netip.MustParseAddrPort("[fd00::100]:5000")}
	if err := c.Add(good6); err != nil {
		t.Errorf("a plausible IPv6 flow: %v", err)
	}
	mixed := good6
	mixed.Remote, mixed.Fake = good.Remote, good.Fake
	if err := c.Add(mixed); !errors.Is(err, ErrUnsupported) {
		t.Errorf("a flow of two families: %v, want ErrUnsupported", err)
	}
	for name, mutate := range map[string]func(*Flow){
		"another listener port": func(f *Flow) { f.Listener = netip.MustParseAddrPort("10.0.2.100:5001") },
		"fake not the remote":   func(f *Flow) { f.Fake = netip.MustParseAddrPort("198.51.100.1:30000") },
		"loopback remote": func(f *Flow) {
			f.Remote, f.Fake = netip.MustParseAddrPort("127.0.0.1:80"), netip.MustParseAddrPort("127.0.0.1:30000")
		},
		"listener elsewhere": func(f *Flow) { f.Listener = netip.MustParseAddrPort("10.0.2.101:5000") },
	} {
		f := good
		mutate(&f)
		if err := c.Add(f); !errors.Is(err, unix.EINVAL) {
			t.Errorf("%s: %v, want EINVAL", name, err)
		}
	}
	c.Close()
	if err := <-served; err != nil {
		t.Errorf("serve after the client closed: %v", err)
	}
	if rec.adds != 2 || rec.removes != 1 {
		t.Errorf("the table saw %d adds and %d removes, want 2 and 1", rec.adds, rec.removes)
	}
}
