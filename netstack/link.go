package netstack

import (
	"encoding/binary"
	"fmt"
	"os"
	"sync"
	"syscall"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
	"gvisor.dev/gvisor/pkg/buffer"
	"gvisor.dev/gvisor/pkg/rawfile"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/stack"

	"github.com/netns-run/netns-run/tap"
)

// tapLink is the stack's link endpoint on the guest's TAP queues: Ethernet
// frames, one per read or write (a TAP has no batched receive), optionally
// behind a virtio-net header.
//
// gVisor's fdbased endpoint does most of this, but it only speaks the
// virtio-net header (and so host GSO) on sockets, and it hands every frame
// to separate processor goroutines. Here a TAP with offloads gets 64 KiB TCP
// segments both ways, and frames are delivered in the goroutine that read
// them: TCP queues them to its own processors anyway, so one hand-off less
// per segment.
type tapLink struct {
	fds []int
	// vnetHdr is the size of the virtio-net header in front of each
	// frame, 0 without IFF_VNET_HDR.
	vnetHdr int
	mtu     uint32
	addr    tcpip.LinkAddress
	// closed is called once when reading fails (the TAP went away).
	closed     func(tcpip.Error)
	closedOnce sync.Once

	mu         sync.Mutex
	dispatcher stack.NetworkDispatcher
	// readFiles are the readers' own duplicates of the queues, in
	// non-blocking mode so that Go's netpoller wakes a reader: the
	// frame is then processed, and the goroutines it wakes run, on the
	// thread that polled, where a reader blocked in its own poll(2)
	// would hand its processor to another thread for every frame.
	// Writes use fds, whose owner closes them after the stack.
	readFiles []*os.File
	stopped   bool
	onClose   func()
	readers   sync.WaitGroup
	// acks holds back bare ACKs (see ackhold.go).
	acks *ackHolder
	// divert, if set before the stack attaches, is offered every frame
	// first; what it takes never reaches the stack (see udpfast.go).
	divert func(vh []byte, parts [][]byte, n int, scratch *frameScratch) bool
}

var (
	_ stack.LinkEndpoint = (*tapLink)(nil)
	_ stack.GSOEndpoint  = (*tapLink)(nil)
)

// gsoMaxSize is the largest TCP segment handed to the guest: what fits in
// an IP packet's 16-bit length.
const gsoMaxSize = 1 << 16

// virtio-net header fields (linux/virtio_net.h). Headers longer than the
// basic 10 bytes (TUNSETVNETHDRSZ) only add fields we leave zero.
const (
	maxVnetHdr        = 16
	vnetFlagNeedsCsum = 1
	vnetGSONone       = 0
	vnetGSOTCPv4      = 1
	vnetGSOTCPv6      = 4
	vnetGSOECN        = 0x80
)

// readSizes shapes the buffers one read fills: small frames (ACKs) take only
// the first, frames up to an Ethernet MTU the first two, and a large one
// (a guest TSO segment, up to 64 KiB) ends in one large buffer. gVisor
// clears each buffer it hands out, so small frames must not take a large
// one; and the relay sends each large buffer to the host socket as it is
// (streamWriter), so a 64 KiB segment costs one send, where eight graduated
// buffers cost four (guest -> host TCP, same run: 0.67-0.69 s of helper CPU
// per GB against 0.88-0.93).
var readSizes = [...]int{128, 1920, 63488}

// newTapLink serves the queues fds (owned by the caller, who closes them
// after the stack). mtu is the IP MTU.
func newTapLink(fds []int, vnetHdr int, mtu uint32, addr tcpip.LinkAddress, closed func(tcpip.Error)) (*tapLink, error) {
	if vnetHdr != 0 && (vnetHdr < tap.VnetHdrSize || vnetHdr > maxVnetHdr) {
		return nil, fmt.Errorf("tap: unsupported virtio-net header size %d", vnetHdr)
	}
	l := &tapLink{fds: fds, vnetHdr: vnetHdr, mtu: mtu, addr: addr, closed: closed}
	l.acks = newAckHolder(func(pkt *stack.PacketBuffer) { _ = l.writePacket(pkt) })
	for _, fd := range fds {
		dup, err := unix.FcntlInt(uintptr(fd), unix.F_DUPFD_CLOEXEC, 0)
		if err != nil {
			l.closeReadFiles()
			return nil, fmt.Errorf("tap queue %d: dup: %w", fd, err)
		}
		// O_NONBLOCK belongs to the open file, so writes on fd do not
		// block either: a TAP write never waits for room anyway.
		if err := unix.SetNonblock(dup, true); err != nil {
			unix.Close(dup)
			l.closeReadFiles()
			return nil, fmt.Errorf("tap queue %d: set non-blocking: %w", fd, err)
		}
		l.readFiles = append(l.readFiles, os.NewFile(uintptr(dup), "tap-queue"))
	}
	return l, nil
}

func (l *tapLink) closeReadFiles() {
	for _, f := range l.readFiles {
		f.Close()
	}
	l.readFiles = nil
}

// MTU implements stack.LinkEndpoint; it counts the Ethernet header, which
// the ethernet wrapper around this endpoint takes off again.
func (l *tapLink) MTU() uint32 { return l.mtu + header.EthernetMinimumSize }

// SetMTU implements stack.LinkEndpoint.
func (l *tapLink) SetMTU(mtu uint32) {
	if mtu > header.EthernetMinimumSize {
		l.mtu = mtu - header.EthernetMinimumSize
	}
}

// MaxHeaderLength implements stack.LinkEndpoint: the virtio-net header goes
// in its own iovec, so no room is reserved for it.
func (*tapLink) MaxHeaderLength() uint16 { return 0 }

// LinkAddress implements stack.LinkEndpoint.
func (l *tapLink) LinkAddress() tcpip.LinkAddress { return l.addr }

// SetLinkAddress implements stack.LinkEndpoint.
func (l *tapLink) SetLinkAddress(addr tcpip.LinkAddress) { l.addr = addr }

// Capabilities implements stack.LinkEndpoint. The guest's kernel has
// checksummed what it sends (or, with offloads, left the checksum to the
// receiver, which here is the stack itself), so it is not verified again.
func (*tapLink) Capabilities() stack.LinkEndpointCapabilities {
	return stack.CapabilityRXChecksumOffload
}

// ARPHardwareType implements stack.LinkEndpoint; the ethernet wrapper says
// Ethernet.
func (*tapLink) ARPHardwareType() header.ARPHardwareType { return header.ARPHardwareNone }

// AddHeader implements stack.LinkEndpoint; the ethernet wrapper adds it.
func (*tapLink) AddHeader(*stack.PacketBuffer) {}

// ParseHeader implements stack.LinkEndpoint.
func (*tapLink) ParseHeader(*stack.PacketBuffer) bool { return true }

// GSOMaxSize implements stack.GSOEndpoint.
func (l *tapLink) GSOMaxSize() uint32 {
	if !l.hostGSO() {
		return 0
	}
	return gsoMaxSize
}

// SupportedGSO implements stack.GSOEndpoint: with a virtio-net header the
// guest's kernel segments what the stack sends.
func (l *tapLink) SupportedGSO() stack.SupportedGSO {
	if !l.hostGSO() {
		return stack.GSONotSupported
	}
	return stack.HostGSOSupported
}

// hostGSO says whether the stack builds TCP segments for the guest's kernel
// to finish: with a virtio-net header it leaves the checksum to the guest
// (NEEDS_CSUM, which the guest's kernel then does not verify either) and,
// when the MTU is small, hands over 64 KiB segments to cut. Checksumming
// cost host -> guest TCP at MTU 65520 ~10 % of the helper's CPU per GB
// (0.86-0.98 s/GB with, 0.96-1.12 without, four alternating runs).
func (l *tapLink) hostGSO() bool {
	return l.vnetHdr > 0
}

// Attach implements stack.LinkEndpoint: it starts one reader per queue, or
// stops them when d is nil.
func (l *tapLink) Attach(d stack.NetworkDispatcher) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if d == nil {
		l.stopReadersLocked()
		l.dispatcher = nil
		return
	}
	if l.dispatcher != nil {
		l.dispatcher = d
		return
	}
	l.dispatcher = d
	if l.stopped {
		return
	}
	for _, f := range l.readFiles {
		rc, err := f.SyscallConn()
		if err != nil {
			l.linkFailed(&tcpip.ErrClosedForReceive{})
			return
		}
		r := newFrameReader(rc, l.vnetHdr)
		r.divert = l.divert
		l.readers.Add(1)
		go func() {
			defer l.readers.Done()
			defer r.release()
			l.readLoop(r)
		}()
	}
}

// stopReadersLocked makes every pending and future read fail at once.
func (l *tapLink) stopReadersLocked() {
	l.stopped = true
	for _, f := range l.readFiles {
		_ = f.SetReadDeadline(time.Unix(1, 0))
	}
}

// shutdown stops the readers and waits for them. gVisor's Stack.Wait
// holds the stack's lock while it waits for link endpoints, and a reader in
// the middle of delivering a frame needs that lock, so the stack's owner
// calls this first.
func (l *tapLink) shutdown() {
	l.mu.Lock()
	l.stopReadersLocked()
	l.mu.Unlock()
	l.Wait()
	l.acks.close()
}

// IsAttached implements stack.LinkEndpoint.
func (l *tapLink) IsAttached() bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.dispatcher != nil
}

// Wait implements stack.LinkEndpoint: it waits for the readers, then closes
// their descriptors.
func (l *tapLink) Wait() {
	l.readers.Wait()
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.stopped {
		l.closeReadFiles()
	}
}

// Close implements stack.LinkEndpoint. The TAP's descriptors belong to the
// tap.Device and are closed there.
func (l *tapLink) Close() {
	l.mu.Lock()
	l.stopReadersLocked()
	onClose := l.onClose
	l.onClose = nil
	l.mu.Unlock()
	if onClose != nil {
		onClose()
	}
}

// SetOnCloseAction implements stack.LinkEndpoint.
func (l *tapLink) SetOnCloseAction(f func()) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.onClose = f
}

func (l *tapLink) linkFailed(err tcpip.Error) {
	if l.closed != nil {
		l.closedOnce.Do(func() { l.closed(err) })
	}
}

func (l *tapLink) readLoop(r *frameReader) {
	for {
		pkt, err := r.read()
		if err != nil {
			l.mu.Lock()
			stopped := l.stopped
			l.mu.Unlock()
			if !stopped {
				l.linkFailed(err)
			}
			return
		}
		if pkt == nil {
			continue
		}
		l.mu.Lock()
		d := l.dispatcher
		l.mu.Unlock()
		if d != nil {
			d.DeliverNetworkPacket(0, pkt)
		}
		pkt.DecRef()
	}
}

// WritePackets implements stack.LinkWriter. A TAP write takes one frame and
// does not block (the kernel drops what its queue cannot take), so frames
// are written one by one.
func (l *tapLink) WritePackets(pkts stack.PacketBufferList) (int, tcpip.Error) {
	n := 0
	for _, pkt := range pkts.AsSlice() {
		if l.acks != nil && !l.acks.admit(pkt) {
			n++
			continue
		}
		if errno := l.writePacket(pkt); errno != 0 {
			if n == 0 {
				return 0, tcpip.TranslateErrno(errno)
			}
			break
		}
		n++
	}
	return n, nil
}

// writePacket puts one frame the stack built on its queue.
func (l *tapLink) writePacket(pkt *stack.PacketBuffer) unix.Errno {
	var hdr [maxVnetHdr]byte
	vh := hdr[:l.vnetHdr]
	encodeVnetHdr(vh, pkt)
	return l.write(l.fds[pkt.Hash%uint32(len(l.fds))], vh, pkt.AsSlices())
}

// writeFrame writes a whole Ethernet frame the stack did not build (router
// advertisements, ICMP errors) to the first queue.
func (l *tapLink) writeFrame(frame []byte) error {
	var hdr [maxVnetHdr]byte
	if errno := l.write(l.fds[0], hdr[:l.vnetHdr], [][]byte{frame}); errno != 0 {
		return errno
	}
	return nil
}

// write puts one frame, made of parts, on the queue fd behind the
// virtio-net header vh (empty without one).
func (l *tapLink) write(fd int, vh []byte, parts [][]byte) unix.Errno {
	var buf [8]unix.Iovec
	iovecs := rawfile.AppendIovecFromBytes(buf[:0], vh, rawfile.MaxIovs)
	for _, p := range parts {
		iovecs = rawfile.AppendIovecFromBytes(iovecs, p, rawfile.MaxIovs)
	}
	return rawfile.NonBlockingWriteIovec(fd, iovecs)
}

// encodeVnetHdr fills the virtio-net header for pkt: for a TCP segment the
// stack built for offload, the checksum is only the pseudo-header's and the
// guest's kernel must finish it, and a segment longer than the MSS must be
// cut into MSS-sized ones.
func encodeVnetHdr(h []byte, pkt *stack.PacketBuffer) {
	clear(h)
	gso := pkt.GSOOptions
	if gso.Type == stack.GSONone || len(h) < tap.VnetHdrSize {
		return
	}
	if gso.NeedsCsum {
		h[0] = vnetFlagNeedsCsum
		binary.LittleEndian.PutUint16(h[6:], uint16(header.EthernetMinimumSize)+gso.L3HdrLen)
		binary.LittleEndian.PutUint16(h[8:], gso.CsumOffset)
	}
	if pkt.Data().Size() <= int(gso.MSS) {
		return
	}
	switch gso.Type {
	case stack.GSOTCPv4:
		h[1] = vnetGSOTCPv4
	case stack.GSOTCPv6:
		h[1] = vnetGSOTCPv6
	default:
		return
	}
	binary.LittleEndian.PutUint16(h[2:], uint16(pkt.HeaderSize()))
	binary.LittleEndian.PutUint16(h[4:], gso.MSS)
}

// frameReader reads frames from one queue into pooled views.
type frameReader struct {
	queue   syscall.RawConn
	vnetHdr []byte
	views   [len(readSizes)]*buffer.View
	iovecs  []unix.Iovec
	// tryRead is r.tryRead, bound once: a closure made per frame would
	// cost two allocations per frame.
	tryRead func(fd uintptr) bool
	n       int
	errno   unix.Errno
	// divert and its working space: see tapLink.divert.
	divert  func(vh []byte, parts [][]byte, n int, scratch *frameScratch) bool
	parts   [len(readSizes)][]byte
	scratch frameScratch
}

func newFrameReader(queue syscall.RawConn, vnetHdr int) *frameReader {
	r := &frameReader{queue: queue, iovecs: make([]unix.Iovec, 0, len(readSizes)+1)}
	if vnetHdr > 0 {
		r.vnetHdr = make([]byte, vnetHdr)
	}
	r.tryRead = r.readOnce
	return r
}

// readOnce is the netpoller's callback: false asks it to wait for the
// queue to become readable.
func (r *frameReader) readOnce(fd uintptr) bool {
	r.n, r.errno = readv(fd, r.iovecs)
	return r.errno != unix.EAGAIN
}

// read waits for the next frame. It returns a nil packet for frames to
// skip, and an error once the queue fails or the link stops.
func (r *frameReader) read() (*stack.PacketBuffer, tcpip.Error) {
	r.iovecs = r.iovecs[:0]
	if r.vnetHdr != nil {
		r.iovecs = append(r.iovecs, rawfile.IovecFromBytes(r.vnetHdr))
	}
	for i, size := range readSizes {
		if r.views[i] == nil {
			r.views[i] = buffer.NewViewSize(size)
		}
		r.iovecs = append(r.iovecs, rawfile.IovecFromBytes(r.views[i].AsSlice()))
	}
	if err := r.queue.Read(r.tryRead); err != nil {
		return nil, &tcpip.ErrClosedForReceive{}
	}
	n, errno := r.n, r.errno
	if errno != 0 {
		return nil, tcpip.TranslateErrno(errno)
	}
	if n == 0 {
		// End of file: a socket peer standing in for the TAP hung up.
		return nil, &tcpip.ErrConnectionAborted{}
	}
	n -= len(r.vnetHdr)
	if n < header.EthernetMinimumSize || !r.acceptVnetHdr() {
		return nil, nil
	}
	if r.divert != nil && r.divert(r.vnetHdr, r.filled(n), n, &r.scratch) {
		// The frame's buffers are kept for the next read.
		return nil, nil
	}
	var payload buffer.Buffer
	for i := range r.views {
		if n == 0 {
			break
		}
		v := r.views[i]
		r.views[i] = nil
		if v.Size() > n {
			v.CapLength(n)
		}
		n -= v.Size()
		payload.Append(v)
	}
	return stack.NewPacketBuffer(stack.PacketBufferOptions{Payload: payload}), nil
}

// acceptVnetHdr says whether the frame's virtio-net header asks for
// something the stack can take: TCP segments of any size are fine (the
// stack terminates them and does not check their checksums), anything the
// TAP was not told it may send (UDP segmentation, ECN) is dropped.
func (r *frameReader) acceptVnetHdr() bool {
	if r.vnetHdr == nil {
		return true
	}
	switch r.vnetHdr[1] &^ vnetGSOECN {
	case vnetGSONone, vnetGSOTCPv4, vnetGSOTCPv6:
		return r.vnetHdr[1]&vnetGSOECN == 0
	}
	return false
}

// filled returns the parts of the buffers a frame of n bytes filled.
func (r *frameReader) filled(n int) [][]byte {
	parts := r.parts[:0]
	for _, v := range r.views {
		if n == 0 {
			break
		}
		b := v.AsSlice()
		if len(b) > n {
			b = b[:n]
		}
		n -= len(b)
		parts = append(parts, b)
	}
	return parts
}

func (r *frameReader) release() {
	for i, v := range r.views {
		if v != nil {
			v.Release()
			r.views[i] = nil
		}
	}
}

// readv reads one frame without blocking (the queue is non-blocking and
// ready). x/sys/unix.Readv would allocate its iovecs on every frame.
func readv(fd uintptr, iovecs []unix.Iovec) (int, unix.Errno) {
	for {
		// Raw: the queue is non-blocking, and telling the scheduler about
		// a syscall that cannot block only invites it to hand the P to
		// another thread.
		n, _, errno := unix.RawSyscall(unix.SYS_READV, fd, uintptr(unsafe.Pointer(&iovecs[0])), uintptr(len(iovecs)))
		if errno != unix.EINTR {
			return int(n), errno
		}
	}
}
