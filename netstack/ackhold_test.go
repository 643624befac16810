package netstack

import (
	"sync"
	"testing"
	"time"

	"gvisor.dev/gvisor/pkg/buffer"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
)

// tcpPacket builds an outgoing TCP segment as the stack would hand it to
// the link: headers set, payload of size bytes.
func tcpPacket(sport uint16, flags header.TCPFlags, ack uint32, wnd uint16, size int, opts []byte) *stack.PacketBuffer {
	pkt := stack.NewPacketBuffer(stack.PacketBufferOptions{
		ReserveHeaderBytes: header.IPv4MinimumSize + header.TCPMinimumSize + len(opts),
	})
	if size > 0 {
		pkt.Data().AppendView(buffer.NewViewSize(size))
	}
	th := header.TCP(pkt.TransportHeader().Push(header.TCPMinimumSize + len(opts)))
	th.Encode(&header.TCPFields{SrcPort: sport, DstPort: 40000, AckNum: ack, DataOffset: uint8(header.TCPMinimumSize + len(opts)),
		Flags: flags, WindowSize: wnd})
	copy(th[header.TCPMinimumSize:], opts)
	pkt.TransportProtocolNumber = header.TCPProtocolNumber
	ip := header.IPv4(pkt.NetworkHeader().Push(header.IPv4MinimumSize))
	ip.Encode(&header.IPv4Fields{TotalLength: uint16(pkt.Size()), TTL: 64, Protocol: uint8(header.TCPProtocolNumber),
		SrcAddr: tcpip.AddrFrom4([4]byte{10, 0, 2, 2}), DstAddr: tcpip.AddrFrom4([4]byte{10, 0, 2, 100})})
	pkt.NetworkProtocolNumber = header.IPv4ProtocolNumber
	return pkt
}

// recorder collects the ACK numbers of frames the holder writes later.
type recorder struct {
	mu   sync.Mutex
	acks []uint32
}

func (r *recorder) write(pkt *stack.PacketBuffer) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.acks = append(r.acks, header.TCP(pkt.TransportHeader().Slice()).AckNumber())
}

func (r *recorder) written() []uint32 {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]uint32(nil), r.acks...)
}

func TestAckHolder(t *testing.T) {
	var rec recorder
	h := newAckHolder(rec.write)
	t.Cleanup(h.close)
	admit := func(pkt *stack.PacketBuffer) bool {
		defer pkt.DecRef()
		return h.admit(pkt)
	}
	const port = 1000
	// The first frame of a flow is never held: nothing to compare with.
	if !admit(tcpPacket(port, header.TCPFlagAck, 100, 500, 10, nil)) {
		t.Fatal("first segment held")
	}
	// A bare ACK of one more small request, same window: held...
	if admit(tcpPacket(port, header.TCPFlagAck, 101, 500, 0, nil)) {
		t.Fatal("bare ACK of a small request not held")
	}
	// ...and dropped when the answer (which acknowledges as much) goes
	// out first.
	if !admit(tcpPacket(port, header.TCPFlagAck|header.TCPFlagPsh, 101, 500, 1, nil)) {
		t.Fatal("data segment held")
	}
	// Never held: a window update, SACK blocks, a large step, flags.
	for name, pkt := range map[string]*stack.PacketBuffer{
		"window opens": tcpPacket(port, header.TCPFlagAck, 102, 600, 0, nil),
		"sack":         tcpPacket(port, header.TCPFlagAck, 102, 600, 0, []byte{1, 1, header.TCPOptionSACK, 10, 0, 0, 0, 1, 0, 0, 0, 2}),
		"bulk":         tcpPacket(port, header.TCPFlagAck, 102+64<<10, 600, 0, nil),
		"fin":          tcpPacket(port, header.TCPFlagAck|header.TCPFlagFin, 102+64<<10, 600, 0, nil),
	} {
		if !admit(pkt) {
			t.Errorf("%s: held", name)
		}
	}
	if got := rec.written(); len(got) != 0 {
		t.Fatalf("the holder wrote %v itself; want nothing yet", got)
	}
	// A held ACK nothing supersedes goes out after ackHoldTime.
	const other = 2000
	admit(tcpPacket(other, header.TCPFlagAck, 5000, 500, 10, nil))
	if admit(tcpPacket(other, header.TCPFlagAck, 5001, 500, 0, nil)) {
		t.Fatal("bare ACK not held")
	}
	deadline := time.Now().Add(5 * time.Second)
	for len(rec.written()) == 0 && time.Now().Before(deadline) {
		time.Sleep(time.Millisecond)
	}
	if got := rec.written(); len(got) != 1 || got[0] != 5001 {
		t.Fatalf("flushed %v, want [5001]", got)
	}
}

// Closing writes what is held; afterwards nothing is held.
func TestAckHolderClose(t *testing.T) {
	var rec recorder
	h := newAckHolder(rec.write)
	admit := func(pkt *stack.PacketBuffer) bool {
		defer pkt.DecRef()
		return h.admit(pkt)
	}
	admit(tcpPacket(1, header.TCPFlagAck, 10, 500, 10, nil))
	if admit(tcpPacket(1, header.TCPFlagAck, 11, 500, 0, nil)) {
		t.Fatal("not held")
	}
	h.close()
	if got := rec.written(); len(got) != 1 || got[0] != 11 {
		t.Fatalf("close wrote %v, want [11]", got)
	}
	if !admit(tcpPacket(1, header.TCPFlagAck, 12, 500, 0, nil)) {
		t.Fatal("held after close")
	}
}
