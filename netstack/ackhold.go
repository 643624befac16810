package netstack

import (
	"sync"
	"time"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
)

// gVisor's TCP acknowledges every batch of guest segments at once, from
// its processor goroutine, before the relay has even read the data; it has
// no delayed-ACK option (gvisor#387). For request/response traffic that
// costs a TAP write, and the guest kernel's work on a bare ACK, per
// request, although the answer follows microseconds later and acknowledges
// the same data. The link endpoint therefore holds a bare ACK for a moment
// and drops it when a later frame of the same flow (which carries an equal
// or higher acknowledgment number) goes out first.
//
// Only ACKs that say nothing else are held: no payload, no flag but ACK,
// no SACK blocks, the same window as the flow's previous frame, and at most
// ackHoldMaxBytes newly acknowledged, so bulk transfers (whose senders wait
// for ACKs to open their congestion window) are acknowledged at once, as
// a receiving Linux does after two full segments.
const (
	// ackHoldTime bounds the delay the guest may see on an ACK; Linux
	// itself delays ACKs by 40 ms or more.
	ackHoldTime = 500 * time.Microsecond
	// ackHoldMaxBytes is two Ethernet-sized segments.
	ackHoldMaxBytes = 2 * 1460
	// ackFlowIdle is how long a flow's entry outlives its last frame.
	ackFlowIdle = time.Minute
)

// flowKey names a TCP flow by its addresses as the stack sends them.
type flowKey struct {
	src, dst     tcpip.Address
	sport, dport uint16
}

// ackFlow is what the holder remembers of one flow.
type ackFlow struct {
	// lastAck and lastWnd are those of the last frame written to the
	// guest (not of a held one).
	lastAck  uint32
	lastWnd  uint16
	lastSeen time.Time
	held     *stack.PacketBuffer
	heldAt   time.Time
}

// ackHolder decides, frame by frame, what the link writes now, what it
// holds and what it drops. Its flows are spread over shards, so the TAP's
// writers on several CPUs do not all wait for one lock.
type ackHolder struct {
	shards [ackShards]*ackShard
}

const ackShards = 8

// ackShard is one lock's worth of flows. write puts a frame on the TAP.
type ackShard struct {
	write func(*stack.PacketBuffer)

	mu    sync.Mutex
	flows map[flowKey]*ackFlow
	// held lists the flows with a held ACK (and some whose ACK was
	// dropped since), so a flush does not walk every flow.
	held   []*ackFlow
	nheld  int
	timer  *time.Timer
	armed  bool
	swept  time.Time
	closed bool
}

func newAckHolder(write func(*stack.PacketBuffer)) *ackHolder {
	var h ackHolder
	for i := range h.shards {
		sh := &ackShard{write: write, flows: make(map[flowKey]*ackFlow)}
		sh.timer = time.AfterFunc(time.Hour, sh.flushDue)
		sh.timer.Stop()
		h.shards[i] = sh
	}
	return &h
}

// tcpFrame is the part of an outgoing TCP frame the holder looks at.
type tcpFrame struct {
	key   flowKey
	flags header.TCPFlags
	ack   uint32
	wnd   uint16
	bare  bool
}

// parseTCPFrame reads pkt's headers as the stack built them; ok is false
// for anything but TCP over IPv4 or IPv6.
func parseTCPFrame(pkt *stack.PacketBuffer) (f tcpFrame, ok bool) {
	if pkt.TransportProtocolNumber != header.TCPProtocolNumber {
		return f, false
	}
	th := header.TCP(pkt.TransportHeader().Slice())
	if len(th) < header.TCPMinimumSize {
		return f, false
	}
	switch nh := pkt.NetworkHeader().Slice(); pkt.NetworkProtocolNumber {
	case header.IPv4ProtocolNumber:
		if len(nh) < header.IPv4MinimumSize {
			return f, false
		}
		ip := header.IPv4(nh)
		f.key.src, f.key.dst = ip.SourceAddress(), ip.DestinationAddress()
	case header.IPv6ProtocolNumber:
		if len(nh) < header.IPv6MinimumSize {
			return f, false
		}
		ip := header.IPv6(nh)
		f.key.src, f.key.dst = ip.SourceAddress(), ip.DestinationAddress()
	default:
		return f, false
	}
	f.key.sport, f.key.dport = th.SourcePort(), th.DestinationPort()
	f.flags, f.ack, f.wnd = th.Flags(), th.AckNumber(), th.WindowSize()
	f.bare = f.flags == header.TCPFlagAck && pkt.Data().Size() == 0 && !hasSACK(th.Options())
	return f, true
}

// hasSACK reports whether TCP options carry SACK blocks.
func hasSACK(opts []byte) bool {
	for i := 0; i < len(opts); {
		switch opts[i] {
		case header.TCPOptionEOL:
			return false
		case header.TCPOptionNOP:
			i++
			continue
		case header.TCPOptionSACK:
			return true
		}
		if i+1 >= len(opts) || opts[i+1] < 2 {
			return false
		}
		i += int(opts[i+1])
	}
	return false
}

// admit decides for one outgoing frame: true means write it now, false
// that the holder kept it (and took a reference). A held ACK of the same
// flow that the frame supersedes is dropped.
func (h *ackHolder) admit(pkt *stack.PacketBuffer) bool {
	f, ok := parseTCPFrame(pkt)
	if !ok {
		return true
	}
	return h.shards[(f.key.sport^f.key.dport)%ackShards].admit(pkt, f)
}

func (h *ackShard) admit(pkt *stack.PacketBuffer, f tcpFrame) bool {
	now := time.Now()
	h.mu.Lock()
	defer h.mu.Unlock()
	fl := h.flows[f.key]
	if f.flags&(header.TCPFlagRst|header.TCPFlagFin|header.TCPFlagSyn) != 0 {
		// The flow starts or ends: nothing to compare with later.
		if fl != nil {
			h.dropHeldLocked(fl)
			delete(h.flows, f.key)
		}
		return true
	}
	if fl == nil {
		// A flow is only followed from its first data on: flows that
		// only acknowledge (a guest uploading) are never held anyway,
		// and the last ACK after a FIN must not bring back a flow
		// that has ended.
		if h.closed || pkt.Data().Size() == 0 {
			return true
		}
		h.sweepLocked(now)
		fl = &ackFlow{}
		h.flows[f.key] = fl
	} else {
		// Whatever this frame is, it acknowledges at least what a held
		// ACK of the same flow did.
		h.dropHeldLocked(fl)
	}
	hold := f.bare && !h.closed && fl.lastSeen != (time.Time{}) &&
		f.wnd <= fl.lastWnd && f.ack-fl.lastAck <= ackHoldMaxBytes
	fl.lastSeen = now
	if !hold {
		fl.lastAck, fl.lastWnd = f.ack, f.wnd
		return true
	}
	pkt.IncRef()
	fl.held, fl.heldAt = pkt, now
	h.held = append(h.held, fl)
	h.nheld++
	if !h.armed {
		h.armed = true
		h.timer.Reset(ackHoldTime)
	}
	return false
}

func (h *ackShard) dropHeldLocked(fl *ackFlow) {
	if fl.held == nil {
		return
	}
	fl.held.DecRef()
	fl.held = nil
	h.nheld--
	if h.nheld == 0 {
		h.held = h.held[:0]
	}
	if h.nheld == 0 && h.armed {
		// A timer left to fire with nothing to flush would wake an idle
		// helper for nothing; a stopped one is gone before the
		// scheduler next sleeps.
		h.timer.Stop()
		h.armed = false
	}
}

// flushDue writes the ACKs held for ackHoldTime and re-arms for the rest.
// It writes under the lock, so a flow's held ACK and its next frame cannot
// pass each other.
func (h *ackShard) flushDue() {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.armed = false
	now := time.Now()
	next := ackHoldTime
	keep := h.held[:0]
	for _, fl := range h.held {
		if fl.held == nil {
			continue
		}
		if wait := ackHoldTime - now.Sub(fl.heldAt); wait > 0 {
			next = min(next, wait)
			keep = append(keep, fl)
			continue
		}
		h.sendHeldLocked(fl)
	}
	clear(h.held[len(keep):])
	h.held = keep
	if h.nheld > 0 {
		h.armed = true
		h.timer.Reset(next)
	}
}

func (h *ackShard) sendHeldLocked(fl *ackFlow) {
	pkt := fl.held
	fl.held = nil
	h.nheld--
	th := header.TCP(pkt.TransportHeader().Slice())
	fl.lastAck, fl.lastWnd = th.AckNumber(), th.WindowSize()
	h.write(pkt)
	pkt.DecRef()
}

// sweepLocked forgets flows that have been quiet for ackFlowIdle (they
// ended without a FIN or RST the holder saw, e.g. aborted while idle). It
// runs at most once per ackFlowIdle, when a new flow is added.
func (h *ackShard) sweepLocked(now time.Time) {
	if now.Sub(h.swept) < ackFlowIdle {
		return
	}
	h.swept = now
	for k, fl := range h.flows {
		if fl.held == nil && now.Sub(fl.lastSeen) > ackFlowIdle {
			delete(h.flows, k)
		}
	}
}

// close writes what is held and makes every later frame go out at once.
func (h *ackHolder) close() {
	for _, sh := range h.shards {
		sh.close()
	}
}

func (h *ackShard) close() {
	h.timer.Stop()
	h.mu.Lock()
	defer h.mu.Unlock()
	h.closed = true
	for k, fl := range h.flows {
		if fl.held != nil {
			h.sendHeldLocked(fl)
		}
		delete(h.flows, k)
	}
}
