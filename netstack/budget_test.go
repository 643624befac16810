package netstack

import (
	"net"
	"net/netip"
	"runtime"
	"sync/atomic"
	"testing"
	"time"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv4"
	"gvisor.dev/gvisor/pkg/tcpip/transport/tcp"
	"gvisor.dev/gvisor/pkg/waiter"
)

// The TCP flows' buffers share the budget: while it holds every flow at
// tcpBufferMax nothing is cut; past that, every flow, old and new, is cut
// to the same power-of-two share, so the total stays within the budget; as
// flows end, new ones get more again.
func TestTCPBufferBudget(t *testing.T) {
	s, _ := stackOnSocketpair(t, DefaultConfig(), 0)
	const budget = 16 * tcpBufferMax // room for 8 flows at the maximum
	b := newTCPBuffers(budget)
	var eps []tcpip.Endpoint
	fbs := map[tcpip.Endpoint]*flowBuffers{}
	var rcv0 int64
	open := func() tcpip.Endpoint {
		var wq waiter.Queue
		ep, terr := s.stack.NewEndpoint(tcp.ProtocolNumber, ipv4.ProtocolNumber, &wq)
		if terr != nil {
			t.Fatal(terr)
		}
		t.Cleanup(ep.Close)
		fbs[ep] = b.add(ep)
		eps = append(eps, ep)
		return ep
	}
	// Both buffers are cut alike (the send buffer once the flow's
	// writer writes again); the receive buffer stands for both.
	size := func(ep tcpip.Endpoint) int64 {
		fbs[ep].applySend(ep)
		so := ep.SocketOptions()
		if snd, rcv := so.GetSendBufferSize(), so.GetReceiveBufferSize(); snd != rcv && rcv != rcv0 {
			t.Fatalf("send buffer %d, receive buffer %d: cut differently", snd, rcv)
		}
		return so.GetReceiveBufferSize()
	}
	first := open()
	rcv0 = first.SocketOptions().GetReceiveBufferSize()
	for range 7 {
		open()
	}
	if rcv := size(first); rcv != rcv0 {
		t.Fatalf("8 flows within the budget: first flow's receive buffer cut to %d", rcv)
	}
	for range 24 {
		open() // 32 flows: a quarter of the maximum each
	}
	var total int64
	for _, ep := range eps {
		rcv := size(ep)
		if rcv != tcpBufferMax/4 {
			t.Fatalf("32 flows: receive buffer %d, want %d", rcv, tcpBufferMax/4)
		}
		total += 2 * rcv
	}
	if total > budget {
		t.Errorf("%d bytes of buffers for %d flows, budget %d", total, len(eps), budget)
	}
	for _, ep := range eps[:24] {
		b.remove(ep)
	}
	if size(open()) == tcpBufferMax/4 {
		t.Errorf("a flow opened after most ended still got the small share")
	}
	if got := b.shareFor(1 << 20); got != tcpBufferMin {
		t.Errorf("share for a million flows %d, want the floor %d", got, tcpBufferMin)
	}
}

// Guests that stop reading while their hosts keep sending hold what the
// budget gives them, not gVisor's full buffers: with a 1 MiB budget, eight
// stalled flows leave the helper's heap a few MiB larger, where each held
// its whole send buffer before (1-4 MiB as gVisor grew it, plus the relay's
// copy buffers: 2.45 MiB a flow measured in a test world).
func TestStalledGuestsStayWithinBudget(t *testing.T) {
	ln, err := net.ListenTCP("tcp4", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	var sent atomic.Int64
	go func() {
		zeros := make([]byte, 64<<10)
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				for {
					n, err := c.Write(zeros)
					sent.Add(int64(n))
					if err != nil {
						return
					}
				}
			}()
		}
	}()
	const budget = 1 << 20
	lim := defaultLimits()
	lim.tcpBuffers = budget
	cfg := DefaultConfig()
	cfg.limits = &lim
	_, peer := stackOnSocketpair(t, cfg, 0)
	gs := guestStack(t, peer)
	// The guest's kernel takes little: what the helper holds shows.
	if terr := gs.SetTransportProtocolOption(tcp.ProtocolNumber,
		&tcpip.TCPReceiveBufferSizeRangeOption{Min: 4 << 10, Default: 16 << 10, Max: 16 << 10}); terr != nil {
		t.Fatal(terr)
	}
	heap := func() uint64 {
		var m runtime.MemStats
		runtime.GC()
		runtime.GC() // twice: pooled buffers go on the second
		runtime.ReadMemStats(&m)
		return m.HeapAlloc
	}
	before := heap()
	const flows = 8
	for range flows {
		guestDialTCP(t, gs, netip.AddrPortFrom(DefaultGateway, uint16(ln.Addr().(*net.TCPAddr).Port)))
	}
	// The guests read nothing: the host's sends stop once every buffer
	// on the way is full.
	last, stable := int64(-1), 0
	for i := 0; stable < 10; i++ {
		if i == 600 {
			t.Fatal("the host's sends never stopped")
		}
		time.Sleep(50 * time.Millisecond)
		if n := sent.Load(); n == last {
			stable++
		} else {
			last, stable = n, 0
		}
	}
	grew := int64(heap()) - int64(before)
	t.Logf("%d stalled flows: heap +%d KiB", flows, grew>>10)
	if limit := int64(4 * budget); grew > limit {
		t.Errorf("%d stalled flows grew the heap by %d KiB, bound %d KiB", flows, grew>>10, limit>>10)
	}
}
