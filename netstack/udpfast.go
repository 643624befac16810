package netstack

import (
	"bytes"
	"context"
	"encoding/binary"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/checksum"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/waiter"

	"github.com/netns-run/netns-run/tap"
)

// The UDP fast path carries the datagrams of established guest UDP flows
// between the TAP and their host sockets without the stack: a guest
// datagram is sent to its host socket by the goroutine that read the frame,
// straight from the frame's buffers (no copy, no hand-off), and the host's
// replies are taken several at a time (recvmmsg) and written to the TAP as
// frames built here. gVisor still opens each flow (its forwarder sees the
// first datagram, and the flow's rules apply there) and carries what the
// fast path leaves to it: IP fragments, and replies larger than the MTU,
// which it fragments.
//
// At 1 Gbit/s of 1400-byte datagrams the stack path cost ~10 µs of CPU per
// datagram (one goroutine hand-off, gVisor's UDP and IP layers, a copy);
// here a datagram costs one readv and one sendmsg.

// udpKey names a guest UDP flow: the guest's address and port, and the
// destination it sent to as it sees it (10.0.2.2:53 rather than the host's
// 127.0.0.1:53).
type udpKey struct {
	guest, remote netip.AddrPort
}

// udpFastPath is the table of flows the link diverts frames to.
type udpFastPath struct {
	link *tapLink
	// flows (udpKey -> *udpFlow) is read by every TAP reader for every
	// UDP frame, on several CPUs: a sync.Map reads without a shared
	// lock.
	flows sync.Map
	// ipID numbers the IPv4 packets built here.
	ipID     atomic.Uint32
	counters linkCounters
}

func newUDPFastPath(link *tapLink) *udpFastPath {
	return &udpFastPath{link: link}
}

func (p *udpFastPath) add(f *udpFlow) { p.flows.Store(f.key, f) }

func (p *udpFastPath) remove(f *udpFlow) { p.flows.CompareAndDelete(f.key, f) }

func (p *udpFastPath) lookup(k udpKey) *udpFlow {
	f, _ := p.flows.Load(k)
	fl, _ := f.(*udpFlow)
	return fl
}

// frameScratch is a TAP reader's own working space for diverting frames.
type frameScratch struct {
	iov [len(readSizes)]unix.Iovec
}

// divert takes a guest frame (parts: the filled buffers, n bytes in all,
// starting with the Ethernet header) if it is a whole UDP datagram of a
// flow on the fast path, and sends its payload to the flow's host socket.
// It reports whether it took the frame.
func (p *udpFastPath) divert(_ []byte, parts [][]byte, n int, scratch *frameScratch) bool {
	first := parts[0]
	if len(first) < header.EthernetMinimumSize+header.IPv4MinimumSize+header.UDPMinimumSize {
		return false
	}
	var key udpKey
	var ipLen, l4 int
	var ttl uint8
	switch binary.BigEndian.Uint16(first[12:]) {
	case uint16(header.IPv4ProtocolNumber):
		ip := header.IPv4(first[header.EthernetMinimumSize:])
		ihl := int(ip.HeaderLength())
		if ip[0]>>4 != 4 || ihl < header.IPv4MinimumSize || ip.Protocol() != uint8(header.UDPProtocolNumber) ||
			ip.More() || ip.FragmentOffset() != 0 || len(ip) < ihl+header.UDPMinimumSize {
			return false
		}
		ipLen, l4, ttl = int(ip.TotalLength()), ihl, ip.TTL()
		src, dst := ip.SourceAddress().As4(), ip.DestinationAddress().As4()
		u := header.UDP(ip[ihl:])
		key.guest = netip.AddrPortFrom(netip.AddrFrom4(src), u.SourcePort())
		key.remote = netip.AddrPortFrom(netip.AddrFrom4(dst), u.DestinationPort())
	case uint16(header.IPv6ProtocolNumber):
		ip := header.IPv6(first[header.EthernetMinimumSize:])
		if len(ip) < header.IPv6MinimumSize+header.UDPMinimumSize || ip[0]>>4 != 6 ||
			ip.NextHeader() != uint8(header.UDPProtocolNumber) {
			return false
		}
		ipLen, l4, ttl = header.IPv6MinimumSize+int(ip.PayloadLength()), header.IPv6MinimumSize, ip.HopLimit()
		src, dst := ip.SourceAddress().As16(), ip.DestinationAddress().As16()
		u := header.UDP(ip[header.IPv6MinimumSize:])
		key.guest = netip.AddrPortFrom(netip.AddrFrom16(src), u.SourcePort())
		key.remote = netip.AddrPortFrom(netip.AddrFrom16(dst), u.DestinationPort())
	default:
		return false
	}
	if ipLen > n-header.EthernetMinimumSize || ipLen < l4+header.UDPMinimumSize {
		return false
	}
	u := header.UDP(first[header.EthernetMinimumSize+l4:])
	if int(u.Length()) != ipLen-l4 {
		return false
	}
	f := p.lookup(key)
	if f == nil {
		return false
	}
	// The payload, as iovecs over the frame's buffers (Ethernet padding
	// of short frames left out).
	off := header.EthernetMinimumSize + l4 + header.UDPMinimumSize
	left := ipLen - l4 - header.UDPMinimumSize
	iov := scratch.iov[:0]
	for _, b := range parts {
		if left == 0 {
			break
		}
		if off >= len(b) {
			off -= len(b)
			continue
		}
		b = b[off:]
		off = 0
		if len(b) > left {
			b = b[:left]
		}
		left -= len(b)
		var v unix.Iovec
		v.Base = &b[0]
		v.SetLen(len(b))
		iov = append(iov, v)
	}
	if !f.fromGuest(iov, ipLen-l4-header.UDPMinimumSize, ttl) {
		// The flow just ended (its socket closed, and it is about
		// to leave the table): the stack opens a new one.
		return false
	}
	p.counters.rxPackets.Add(1)
	p.counters.rxBytes.Add(uint64(n))
	return true
}

// udpFlow is one guest UDP flow on the fast path.
type udpFlow struct {
	key    udpKey
	path   *udpFastPath
	hostRC syscall.RawConn
	// table is the flow's entry in the stack's flow table, which
	// expires it by what it exchanged.
	table *tableFlow
	// guestMAC is where replies are addressed.
	guestMAC tcpip.LinkAddress
	// queue is the TAP queue fd replies go out on.
	queue int
	// ttl is the hop limit the host socket sends with; only the TAP
	// reader that diverts the flow's frames changes it.
	ttl      atomic.Uint32
	up, down atomic.Int64
	drops    *atomic.Uint64
	// hostErr hands an ICMP error queued on the host socket to the guest.
	hostErr func()
}

// fromGuest sends one datagram the guest sent to the flow's host socket,
// without blocking: a full socket drops it, as a full link would. It
// reports false if the socket is closed (the flow ended).
func (f *udpFlow) fromGuest(iov []unix.Iovec, size int, ttl uint8) bool {
	f.table.touch(false)
	if uint32(ttl) != f.ttl.Load() && ttl > 0 {
		f.ttl.Store(uint32(ttl))
		_ = setHopLimit(f.hostRC, f.key.remote.Addr().Is6(), int(ttl))
	}
	var errno unix.Errno
	// The socket's own Write keeps it open until this returns: the flow
	// may end, and its socket close, meanwhile.
	err := f.hostRC.Write(func(fd uintptr) bool {
		_, errno = sendIovecs(fd, iov)
		return true
	})
	switch {
	case err != nil:
		return false
	case errno == 0:
		f.up.Add(int64(size))
	case errno == unix.EAGAIN || errno == unix.ENOBUFS:
		f.drops.Add(1)
	default:
		// An ICMP error from the far end surfaced on the send.
		f.hostErr()
	}
	return true
}

// udpChecksumOffset is where the checksum sits in a UDP header.
const udpChecksumOffset = 6

// udpBatchSize is how many replies one recvmmsg takes.
const udpBatchSize = 16

// maxUDPFrameHeader is Ethernet + IPv6 + UDP, the larger of the two
// families.
const maxUDPFrameHeader = header.EthernetMinimumSize + header.IPv6MinimumSize + header.UDPMinimumSize

// udpBatch is the working space of one recvmmsg: room for udpBatchSize
// datagrams of any size. Flows take one only while they have replies to
// move, so idle flows hold no buffers.
type udpBatch struct {
	buf  []byte
	iov  [udpBatchSize]unix.Iovec
	msgs [udpBatchSize]unix.Mmsghdr
	hdr  [udpBatchSize][maxUDPFrameHeader]byte
	n    int
	err  unix.Errno
}

const maxDatagram = 1 << 16

var udpBatches = sync.Pool{New: func() any {
	b := &udpBatch{buf: make([]byte, udpBatchSize*maxDatagram)}
	for i := range b.msgs {
		b.iov[i].Base = &b.buf[i*maxDatagram]
		b.iov[i].SetLen(maxDatagram)
		b.msgs[i].Hdr.Iov = &b.iov[i]
		b.msgs[i].Hdr.SetIovlen(1)
	}
	return b
}}

// recv takes what the host socket holds, up to udpBatchSize datagrams,
// without waiting; n is 0 with err EAGAIN when there is nothing.
func (b *udpBatch) recv(fd uintptr) {
	for {
		n, _, errno := unix.RawSyscall6(unix.SYS_RECVMMSG, fd, uintptr(unsafe.Pointer(&b.msgs[0])), udpBatchSize,
			unix.MSG_DONTWAIT, 0, 0)
		if errno == unix.EINTR {
			continue
		}
		b.n, b.err = int(n), errno
		if errno != 0 {
			b.n = 0
		}
		return
	}
}

// toGuest writes the batch's datagrams to the guest as frames from the
// flow's remote address. Datagrams too large for the guest's MTU go
// through the stack instead (oversize), which fragments them.
func (f *udpFlow) toGuest(b *udpBatch, oversize func([]byte)) {
	l := f.path.link
	var vh [maxVnetHdr]byte
	for i := 0; i < b.n; i++ {
		size := int(b.msgs[i].Len)
		payload := b.buf[i*maxDatagram : i*maxDatagram+size]
		ipHdr := header.IPv4MinimumSize
		if f.key.remote.Addr().Is6() {
			ipHdr = header.IPv6MinimumSize
		}
		if ipHdr+header.UDPMinimumSize+size > int(l.mtu) {
			oversize(payload)
			continue
		}
		hdr := f.buildHeader(b.hdr[i][:], payload, vh[:l.vnetHdr])
		if errno := l.write(f.queue, vh[:l.vnetHdr], [][]byte{hdr, payload}); errno != 0 {
			f.drops.Add(1)
			continue
		}
		f.path.counters.txPackets.Add(1)
		f.path.counters.txBytes.Add(uint64(len(hdr) + size))
		f.down.Add(int64(size))
	}
}

// buildHeader writes the Ethernet, IP and UDP headers of a reply carrying
// payload into buf and returns them. With a virtio-net header (vh not empty)
// the UDP checksum is left to the guest's kernel, which trusts it for a
// local delivery; without, it is computed here.
func (f *udpFlow) buildHeader(buf, payload []byte, vh []byte) []byte {
	l := f.path.link
	src, dst := f.key.remote, f.key.guest
	eth := header.Ethernet(buf)
	var ipHdr int
	var pseudo uint16
	udpLen := uint16(header.UDPMinimumSize + len(payload))
	srcA, dstA := tcpipAddr(src.Addr()), tcpipAddr(dst.Addr())
	if src.Addr().Is4() {
		ipHdr = header.IPv4MinimumSize
		eth.Encode(&header.EthernetFields{SrcAddr: l.addr, DstAddr: f.guestMAC, Type: header.IPv4ProtocolNumber})
		ip := header.IPv4(buf[header.EthernetMinimumSize:])
		ip.Encode(&header.IPv4Fields{
			TotalLength: uint16(ipHdr) + udpLen,
			ID:          uint16(f.path.ipID.Add(1)),
			TTL:         64,
			Protocol:    uint8(header.UDPProtocolNumber),
			SrcAddr:     srcA,
			DstAddr:     dstA,
		})
		ip.SetChecksum(^ip.CalculateChecksum())
	} else {
		ipHdr = header.IPv6MinimumSize
		eth.Encode(&header.EthernetFields{SrcAddr: l.addr, DstAddr: f.guestMAC, Type: header.IPv6ProtocolNumber})
		ip := header.IPv6(buf[header.EthernetMinimumSize:])
		ip.Encode(&header.IPv6Fields{
			PayloadLength:     udpLen,
			TransportProtocol: header.UDPProtocolNumber,
			HopLimit:          64,
			SrcAddr:           srcA,
			DstAddr:           dstA,
		})
	}
	pseudo = header.PseudoHeaderChecksum(header.UDPProtocolNumber, srcA, dstA, udpLen)
	u := header.UDP(buf[header.EthernetMinimumSize+ipHdr:])
	u.Encode(&header.UDPFields{SrcPort: src.Port(), DstPort: dst.Port(), Length: udpLen})
	end := header.EthernetMinimumSize + ipHdr + header.UDPMinimumSize
	if len(vh) >= tap.VnetHdrSize {
		clear(vh)
		vh[0] = vnetFlagNeedsCsum
		binary.LittleEndian.PutUint16(vh[6:], uint16(header.EthernetMinimumSize+ipHdr))
		binary.LittleEndian.PutUint16(vh[8:], udpChecksumOffset)
		u.SetChecksum(pseudo)
		return buf[:end]
	}
	sum := checksum.Checksum(payload, checksum.Checksum(u[:header.UDPMinimumSize], pseudo))
	u.SetChecksum(^sum)
	if u.Checksum() == 0 {
		// Zero means "no checksum" in UDP over IPv4 and is invalid
		// over IPv6: an all-ones sum is sent as all ones.
		u.SetChecksum(0xffff)
	}
	return buf[:end]
}

// linkCounters count frames a fast path (UDP, the kernel TCP path) moved,
// for the link statistics: the stack's own NIC counters never see them.
type linkCounters struct {
	rxPackets, rxBytes, txPackets, txBytes atomic.Uint64
}

// relayUDPFast serves a guest UDP flow on the fast path until the flow
// table ends it (expiry or eviction closes its sockets) or ctx ends. ep is the flow's endpoint in the stack, which
// still carries the first datagram and what the fast path leaves to the
// stack. It owns ep and host and closes them.
func (s *Stack) relayUDPFast(ctx context.Context, ep tcpip.Endpoint, wq *waiter.Queue, host *net.UDPConn, rc syscall.RawConn,
	table *tableFlow, key udpKey, first firstPacket, hostErr func()) (up, down int64) {
	l := s.udpFast.link
	f := &udpFlow{key: key, path: s.udpFast, hostRC: rc, table: table, guestMAC: first.mac,
		queue: l.fds[flowHash(key)%uint32(len(l.fds))], drops: &s.counters.dropFastPath, hostErr: hostErr}
	f.ttl.Store(uint32(first.ttl))
	s.udpFast.add(f)

	stop := context.AfterFunc(ctx, func() { host.Close(); ep.Abort() })
	defer stop()
	done := make(chan struct{})
	go func() {
		defer close(done)
		f.relayFromStack(ep, wq)
	}()
	f.relayReplies(ep)
	s.udpFast.remove(f)
	host.Close()
	ep.Close()
	<-done
	return f.up.Load(), f.down.Load()
}

// flowHash spreads flows over the TAP's queues.
func flowHash(k udpKey) uint32 {
	a := k.guest.Addr().As16()
	h := uint32(2166136261)
	for _, b := range a {
		h = (h ^ uint32(b)) * 16777619
	}
	return h ^ uint32(k.guest.Port())<<16 ^ uint32(k.remote.Port())
}

// relayFromStack sends what the stack delivers to the flow's endpoint (its
// first datagram, datagrams that arrived before the fast path took the
// flow, reassembled fragments) to the host, until the endpoint closes.
func (f *udpFlow) relayFromStack(ep tcpip.Endpoint, wq *waiter.Queue) {
	entry, ready := waiter.NewChannelEntry(waiter.ReadableEvents | waiter.EventHUp | waiter.EventErr)
	wq.EventRegister(&entry)
	defer wq.EventUnregister(&entry)
	for {
		buf := relayBuffers.Get().(*[]byte)
		w := tcpip.SliceWriter(*buf)
		res, terr := ep.Read(&w, tcpip.ReadOptions{})
		if terr == nil && res.Count > 0 {
			p := (*buf)[:res.Count]
			var v unix.Iovec
			v.Base = &p[0]
			v.SetLen(len(p))
			f.fromGuest([]unix.Iovec{v}, len(p), 0)
		}
		relayBuffers.Put(buf)
		switch terr.(type) {
		case nil:
		case *tcpip.ErrWouldBlock:
			<-ready
		default:
			return
		}
	}
}

// relayReplies moves the host's replies to the guest, a batch per wake-up,
// until its socket is closed: the flow table closes it when the flow
// expires or is evicted, the stack when it stops.
func (f *udpFlow) relayReplies(ep tcpip.Endpoint) {
	oversize := func(p []byte) {
		var r bytes.Reader
		r.Reset(p)
		if n, terr := ep.Write(&r, tcpip.WriteOptions{}); terr == nil {
			f.down.Add(n)
		}
	}
	// The netpoller calls relay when the socket is readable. It takes a
	// batch only once there is something to read, so a waiting flow holds
	// no buffers, and waits again after a short batch (the socket was
	// empty) without a read that would say EAGAIN. Batches go to the
	// guest within it, not after Read returns: each Read starts by
	// forgetting the readiness the poller noted, and a reply that came
	// while the batch went out would wait for the next one.
	relay := func(fd uintptr) bool {
		for {
			b := udpBatches.Get().(*udpBatch)
			b.recv(fd)
			short := true
			switch b.err {
			case unix.EAGAIN:
			case 0:
				f.table.touch(true)
				f.toGuest(b, oversize)
				short = b.n < udpBatchSize
			default:
				// An ICMP error from the far end (IP_RECVERR); the
				// flow stays.
				f.hostErr()
				short = false
			}
			udpBatches.Put(b)
			if short {
				return false
			}
		}
	}
	// Read returns only once the socket is closed: relay never ends it.
	_ = f.hostRC.Read(relay)
}
