package netstack

import (
	"math/bits"
	"sync"
	"sync/atomic"

	"gvisor.dev/gvisor/pkg/tcpip"
)

// What the stack buffers for TCP flows is bounded overall. The relay keeps
// no buffers of its own (gVisor's go straight to the host socket and back),
// so a flow's memory is its endpoint's send buffer (host data the guest has
// not acknowledged: a guest that stops reading leaves it there) and receive
// buffer (guest data the host has not taken yet). gVisor grows both with
// the flow's window, up to tcpBufferMax. While the open flows' worth of
// that fits in tcpBufferBudget, nothing is cut; beyond, every flow's buffers
// are set to an equal share (budget/2n, a power of two, at least
// tcpBufferMin), and set again, for all flows, whenever the share halves.
//
// A buffer that is already full when it is cut keeps what it holds until
// the guest reads (gVisor cannot give it back), so flows that stalled while
// there were few flows keep their larger share: each doubling of the flows
// adds at most a quarter of the budget. At the 16,384-flow limit that is at
// most 2.5 times the budget (1.25 GiB), against 16 GiB and more unbounded.
const (
	tcpBufferBudget = 512 << 20
	tcpBufferMax    = 4 << 20
	tcpBufferMin    = 16 << 10
)

// tcpBuffers applies the budget to the open TCP flows' endpoints.
type tcpBuffers struct {
	budget int64

	mu  sync.Mutex
	eps map[tcpip.Endpoint]*flowBuffers
	// share is the size every endpoint's buffers are cut to, each way;
	// 0 while the budget holds every flow at tcpBufferMax.
	share int64
}

// flowBuffers is one flow's place in the budget. Its send buffer is cut by
// the flow's own writer, before its next write (applySend): gVisor reads a
// write's payload with its locks let go and then keeps only what still
// fits, so a cut from another flow's goroutine during a write would drop
// bytes already taken from the host socket, a hole in the guest's stream.
// (An atomic write would hold the locks while it reads the host socket:
// a fifth to a third of the throughput.)
type flowBuffers struct {
	sendCut atomic.Int64 // the size to set before the next write; 0: none
}

// applySend cuts ep's send buffer as the budget asked, if it did; f may be
// nil.
func (f *flowBuffers) applySend(ep tcpip.Endpoint) {
	if f == nil {
		return
	}
	if size := f.sendCut.Swap(0); size != 0 {
		ep.SocketOptions().SetSendBufferSize(size, true)
	}
}

func newTCPBuffers(budget int64) *tcpBuffers {
	return &tcpBuffers{budget: budget, eps: make(map[tcpip.Endpoint]*flowBuffers)}
}

// shareFor is the per-flow, per-direction share for n flows (0: no cut).
func (b *tcpBuffers) shareFor(n int) int64 {
	per := b.budget / int64(2*max(n, 1))
	if per >= tcpBufferMax {
		return 0
	}
	// A power of two, so that shares change only when the number of flows
	// doubles or halves, not with every flow.
	per = int64(1) << (63 - bits.LeadingZeros64(uint64(max(per, 1))))
	return max(per, tcpBufferMin)
}

// add counts a new flow's endpoint in, cutting every flow's buffers when
// its arrival lowers the share; the flow's writer applies its send cut.
func (b *tcpBuffers) add(ep tcpip.Endpoint) *flowBuffers {
	f := &flowBuffers{}
	b.mu.Lock()
	defer b.mu.Unlock()
	b.eps[ep] = f
	share := b.shareFor(len(b.eps))
	if share != 0 && (b.share == 0 || share < b.share) {
		b.share = share
		for e, fb := range b.eps {
			cutBuffers(e, fb, share)
		}
		return f
	}
	if b.share != 0 {
		cutBuffers(ep, f, b.share)
	}
	return f
}

// remove counts a flow's endpoint out. Flows opened later get the larger
// share fewer flows allow; the others keep theirs.
func (b *tcpBuffers) remove(ep tcpip.Endpoint) {
	b.mu.Lock()
	defer b.mu.Unlock()
	delete(b.eps, ep)
	if share := b.shareFor(len(b.eps)); share == 0 || share > b.share {
		b.share = share
	}
}

// cutBuffers sets ep's receive buffer to size, and has its writer set the
// send buffer to size (see flowBuffers); either ends gVisor's automatic
// growth of that buffer.
func cutBuffers(ep tcpip.Endpoint, f *flowBuffers, size int64) {
	f.sendCut.Store(size)
	ep.SocketOptions().SetReceiveBufferSize(size, true)
}
