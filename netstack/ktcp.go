package netstack

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"runtime"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"
	"gvisor.dev/gvisor/pkg/buffer"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/stack"

	"github.com/netns-run/netns-run/netstack/egress"
	"github.com/netns-run/netns-run/netstack/ktcpnat"
	"github.com/netns-run/netns-run/netstack/sockrelay"
)

// The kernel TCP path terminates the guest's outbound TCP connections in
// the guest's own kernel instead of in gVisor, as sing-tun's "system"
// stack does: a guest segment from G:gp to D:dp is written back into the
// TAP as a segment from D:fp to a listener of ours inside the guest's
// namespace (G:L), and that listener's segments to D:fp go back to the
// guest as from D:dp to G:gp. The guest's kernel then runs TCP on both
// ends (handshake, acknowledgements, windows, retransmission), and the
// helper only rewrites addresses and moves bytes between the accepted
// socket and its host socket (a relay loop, package sockrelay). gVisor's
// TCP costs ~50 µs of each 1-byte round trip on the development VM; a
// kernel's costs a few.
// IPv4 and IPv6 alike: with IPv6 the listener is bound to all addresses,
// and each flow ends at its port on the guest's own address of the flow.
//
// Once a flow is busy, the guest's kernel does the rewriting itself
// (ktcpinkernel.go, package ktcpnat) and its segments stop crossing the TAP.
//
// The guest's SYN is held until the host connect succeeds, so a refused
// or unreachable destination looks exactly as it does through the stack:
// the SYN is then handed to the stack, whose forwarder answers it.

// ktcpLinger is how long a flow's translation outlives its relay: the
// closing handshake's last segments (and their resends) still cross the TAP.
const ktcpLinger = 5 * time.Second

// ktcpQuarantine keeps a fake source port from being used again while the
// listener's side of its last connection may sit in TIME_WAIT.
const ktcpQuarantine = 70 * time.Second

// ktcpAnswerTimeout is how long the listener has to answer a SYN before the
// flow goes to the stack instead: a firewall inside the namespace may drop
// what arrives for the listener. The guest's next SYN (its first resend
// comes after 1 s) then goes the stack's way.
const ktcpAnswerTimeout = 3 * time.Second

const (
	ktcpUnanswered = iota
	ktcpAnswered
	ktcpGivenUp
)

// ktcpHandoffHold keeps a flow handed to the stack marked as such while the
// guest may still resend its SYN to the stack's side of it.
const ktcpHandoffHold = 10 * time.Second

type ktcpState int32

const (
	ktcpConnecting ktcpState = iota
	// ktcpOpen: the host side is connected and the SYN went on to the
	// listener; ktcpAccepted: the relay runs; ktcpClosing: it ended,
	// and the closing handshake is still translated.
	ktcpOpen
	ktcpAccepted
	ktcpClosing
	// ktcpHandedOff: the stack serves the flow.
	ktcpHandedOff
)

// ktcpKey names a guest connection as the guest sees it.
type ktcpKey struct {
	guest, remote netip.AddrPort
}

// ktcpHandoff is what the kernel path already learned of a flow it hands
// to the stack, so the stack's forwarder does not decide or dial twice.
type ktcpHandoff struct {
	decided  bool
	decision egress.Decision
	dialed   bool
	dialErr  error
}

type ktcpFlow struct {
	key ktcpKey
	// listener is where the flow ends in the guest: the listener's
	// port on the guest's address of the flow's family.
	listener netip.AddrPort
	// fake is the source the listener sees: the remote address with a
	// port of our choosing.
	fake  netip.AddrPort
	state atomic.Int32
	// answer says whether the listener answered the SYN in time; see
	// ktcpAnswerTimeout.
	answer atomic.Int32
	// syn is the guest's first SYN (virtio-net header and frame), kept
	// until the host connect decides its fate.
	syn     []byte
	host    hostFD
	handoff ktcpHandoff
	// release ends the egress policy's hold on the flow's pins.
	release func()
	// nat: whether the flow is in the guest kernel's maps (k.nat); see
	// translateInKernel, which runs on a goroutine of its own and may
	// still be adding when the flow's linger ends.
	nat atomic.Int32
	// supersedes is the ended flow whose addresses the guest reused for
	// this one, if any.
	supersedes *ktcpFlow
}

// kernelTCP is the table of translated flows and the listener they end at.
type kernelTCP struct {
	s    *Stack
	link *tapLink
	// ln is the listener, a pollable file (sockrelay.ListenerFile).
	ln    *os.File
	loops *sockrelay.Loops
	// nat, if set, moves busy flows' translation into the guest's
	// kernel once their host side is connected (package ktcpnat);
	// natOff: it failed, for IPv4 flows ([0]) or IPv6 ones ([1]), in a
	// way that will not pass (the kernel may lack IPv6 tables only).
	nat    ktcpnat.Table
	natOff [2]atomic.Bool
	// listener is the listener's address: the guest's IPv4 address, or
	// the unspecified address (all of the guest's, IPv4 and IPv6).
	listener netip.AddrPort
	vnetHdr  int

	later   flowQueues
	byGuest sync.Map // ktcpKey -> *ktcpFlow
	byFake  sync.Map // netip.AddrPort -> *ktcpFlow
	// handoffs (ktcpKey -> ktcpHandoff) wait for the stack's forwarder.
	handoffs sync.Map
	// connecting counts flows being dialed (ktcpMaxConnecting).
	connecting atomic.Int32
	// counters: the frames the path took from the TAP and wrote to it.
	counters linkCounters
	pipes    sockrelay.Pipes

	mu   sync.Mutex
	next uint16
	// quarantine holds fake addresses whose last connection ended less
	// than ktcpQuarantine ago, until when; expiry is that order.
	quarantine map[netip.AddrPort]time.Time
	expiry     []quarantined
}

type quarantined struct {
	addr  netip.AddrPort
	until time.Time
}

// ktcpMaxConnecting is the kernel TCP path's share of maxInFlightSYNs: the
// flows it dials at once. Past it, SYNs go to the stack's forwarder, which
// has the rest.
const ktcpMaxConnecting = maxInFlightSYNs / 2

// ktcpPortTries bounds the search for a free fake port: past it (the
// guest churns connections to one address faster than ports come out of
// quarantine) new flows go through the stack.
const ktcpPortTries = 1024

func newKernelTCP(s *Stack, link *tapLink, lnFile, natFile *os.File) (*kernelTCP, error) {
	l, err := net.FileListener(lnFile)
	if err != nil {
		return nil, err
	}
	ln, ok := l.(*net.TCPListener)
	if !ok {
		l.Close()
		return nil, errors.New("kernel TCP path: not a TCP listener")
	}
	addr := ln.Addr().(*net.TCPAddr).AddrPort()
	addr = netip.AddrPortFrom(addr.Addr().Unmap(), addr.Port())
	if !addr.Addr().Is4() && !addr.Addr().IsUnspecified() {
		ln.Close()
		return nil, errors.New("kernel TCP path: the listener must be bound to the guest's IPv4 address or to all (dual-stack)")
	}
	lf, err := sockrelay.ListenerFile(ln)
	if err != nil {
		return nil, fmt.Errorf("kernel TCP path: %w", err)
	}
	k := &kernelTCP{s: s, link: link, ln: lf, listener: addr, vnetHdr: link.vnetHdr,
		next: 20000, quarantine: make(map[netip.AddrPort]time.Time)}
	if natFile != nil {
		// The caller closes natFile; the map keeps a duplicate.
		fd, err := unix.FcntlInt(natFile.Fd(), unix.F_DUPFD_CLOEXEC, 0)
		if err != nil {
			lf.Close()
			return nil, fmt.Errorf("kernel TCP path: netlink socket: %w", err)
		}
		if k.nat, err = ktcpnat.Open(os.NewFile(uintptr(fd), "nftables")); err != nil {
			lf.Close()
			return nil, fmt.Errorf("kernel TCP path: %w", err)
		}
	}
	if k.loops, err = sockrelay.NewLoops(runtime.GOMAXPROCS(0), &k.pipes); err != nil {
		lf.Close()
		if k.nat != nil {
			k.nat.Close()
		}
		return nil, fmt.Errorf("kernel TCP path: %w", err)
	}
	return k, nil
}

// divert takes the guest's TCP segments of translated flows, and the first
// SYN of new ones, and reports whether it took the frame.
func (k *kernelTCP) divert(vh []byte, parts [][]byte, n int) bool {
	if !k.take(vh, parts, n) {
		return false
	}
	k.counters.rxPackets.Add(1)
	k.counters.rxBytes.Add(uint64(n))
	return true
}

func (k *kernelTCP) take(vh []byte, parts [][]byte, n int) bool {
	first := parts[0]
	l3, t, src, dst, ok := parseSegment(first)
	if !ok {
		return false
	}
	if k.fromListener(src) {
		v, ok := k.byFake.Load(dst)
		if !ok {
			return false
		}
		f := v.(*ktcpFlow)
		if f.answer.Load() != ktcpAnswered && !f.answer.CompareAndSwap(ktcpUnanswered, ktcpAnswered) {
			return true // too late: the flow went to the stack
		}
		k.rewrite(vh, first, l3, t, f.key.remote, f.key.guest)
		k.write(vh, parts)
		return true
	}
	key := ktcpKey{guest: src, remote: dst}
	// A SYN alone (ECN bits aside) opens a connection.
	syn := t.Flags()&(header.TCPFlagSyn|header.TCPFlagAck|header.TCPFlagRst|header.TCPFlagFin) == header.TCPFlagSyn
	var old *ktcpFlow
	if v, ok := k.byGuest.Load(key); ok {
		f := v.(*ktcpFlow)
		switch ktcpState(f.state.Load()) {
		case ktcpConnecting:
			return true // a resent SYN: the first one is being served
		case ktcpHandedOff:
			return false
		case ktcpClosing:
			if syn {
				// The guest reuses the addresses of a connection that
				// just ended: a new flow, on a fresh fake port.
				old = f
				break
			}
			fallthrough
		default:
			k.rewrite(vh, first, l3, t, f.fake, f.listener)
			k.write(vh, parts)
			if t.Flags()&header.TCPFlagRst != 0 {
				// The guest gave up before the listener's side was
				// accepted: free the host socket now, not at the reap.
				k.finish(f, ktcpOpen)
			}
			return true
		}
	}
	if !syn {
		return false
	}
	if k.open(key, old, vh, parts, n) {
		return true
	}
	if old != nil {
		k.dropGuestSide(old)
	}
	return false
}

// open starts a flow for the guest's SYN (vh and parts, n bytes) on key,
// superseding old if not nil, and reports whether it took the SYN: if not,
// the stack does.
func (k *kernelTCP) open(key ktcpKey, old *ktcpFlow, vh []byte, parts [][]byte, n int) bool {
	src, dst := key.guest, key.remote
	lnAddr, ok := k.listenerFor(src.Addr())
	if !ok || k.s.isDNS(dst.Addr()) {
		return false
	}
	if _, err := k.s.hostTarget(dst); err != nil {
		return false
	}
	if k.connecting.Add(1) > ktcpMaxConnecting {
		k.connecting.Add(-1)
		return false
	}
	fake, ok := k.allocate(dst.Addr())
	if !ok {
		k.connecting.Add(-1)
		return false
	}
	f := &ktcpFlow{key: key, fake: fake, listener: lnAddr, supersedes: old}
	f.syn = make([]byte, 0, len(vh)+n)
	f.syn = append(f.syn, vh...)
	for _, p := range parts {
		f.syn = append(f.syn, p...)
	}
	f.syn = f.syn[:len(vh)+n]
	if !k.s.flows.enter() {
		k.connecting.Add(-1)
		return false
	}
	// Another reader may have taken the same SYN (resent, on another
	// queue) meanwhile: one flow per connection.
	stored := false
	if old != nil {
		stored = k.byGuest.CompareAndSwap(key, old, f)
	} else {
		_, loaded := k.byGuest.LoadOrStore(key, f)
		stored = !loaded
	}
	if !stored {
		k.s.flows.leave()
		k.connecting.Add(-1)
		return true
	}
	k.byFake.Store(fake, f)
	go func() {
		defer k.s.flows.leave()
		defer k.connecting.Add(-1)
		k.connect(f)
	}()
	return true
}

// dropGuestSide gives up old's guest side: the guest reused its addresses
// for a connection the stack takes, whose segments must reach neither old's
// listener nor, through the guest kernel's maps, its listener connection.
// (A translation still being added when this runs stays until old's linger
// ends.)
func (k *kernelTCP) dropGuestSide(old *ktcpFlow) {
	if k.byGuest.CompareAndDelete(old.key, old) && old.nat.Load() == natIn {
		k.removeTranslation(old, ktcpnat.Out)
	}
}

// allocate picks a fake source port for a flow to remote.
func (k *kernelTCP) allocate(remote netip.Addr) (netip.AddrPort, bool) {
	k.mu.Lock()
	defer k.mu.Unlock()
	k.expireLocked(time.Now())
	for range ktcpPortTries {
		k.next++
		if k.next < 1024 {
			k.next = 1024
		}
		a := netip.AddrPortFrom(remote, k.next)
		if _, used := k.byFake.Load(a); used {
			continue
		}
		if _, held := k.quarantine[a]; held {
			continue
		}
		return a, true
	}
	return netip.AddrPort{}, false
}

func (k *kernelTCP) expireLocked(now time.Time) {
	i := 0
	for ; i < len(k.expiry) && now.After(k.expiry[i].until); i++ {
		q := k.expiry[i]
		if k.quarantine[q.addr] == q.until {
			delete(k.quarantine, q.addr)
		}
	}
	// Slicing, not copying: append reallocates (with only the live
	// entries) once the front has used up the capacity.
	k.expiry = k.expiry[i:]
}

// hold keeps a fake address out of use for a while after a
// connection ended on it.
func (k *kernelTCP) hold(fake netip.AddrPort) {
	k.mu.Lock()
	defer k.mu.Unlock()
	now := time.Now()
	k.expireLocked(now)
	until := now.Add(ktcpQuarantine)
	k.quarantine[fake] = until
	k.expiry = append(k.expiry, quarantined{fake, until})
}

// connect dials the host side of f and, once connected, sends the guest's
// SYN on to the listener; a failed dial hands the SYN to the stack.
func (k *kernelTCP) connect(f *ktcpFlow) {
	s := k.s
	if old := f.supersedes; old != nil && k.nat != nil {
		// The old flow's translation of the guest's side may linger
		// in the kernel, and would take this one's segments after
		// the SYN (which the rules leave alone) to the old listener
		// side. Its listener side stays until its own linger ends.
		_ = k.nat.Remove(old.natFlow(), ktcpnat.Out)
	}
	f.supersedes = nil
	dst := f.key.remote
	d := s.decideTCP(dst)
	f.handoff = ktcpHandoff{decided: true, decision: d}
	if !d.Allowed || d.Inspect || !reserve(&s.counters.tcpOpen, s.lim.tcpFlows) {
		k.handOff(f)
		return
	}
	f.release = s.egress.Hold(d)
	host, err := s.dialHostSocket(dst)
	if err != nil {
		s.counters.tcpOpen.Add(-1)
		f.release()
		f.handoff.dialed, f.handoff.dialErr = true, err
		k.handOff(f)
		return
	}
	f.host = hostFD{fd: host, set: true}
	f.state.Store(int32(ktcpOpen))
	if s.ctx.Err() != nil {
		// The stack closed while this dialed: close() did not see it.
		k.finish(f, ktcpOpen)
		return
	}
	vh, frame := f.syn[:k.vnetHdr], f.syn[k.vnetHdr:]
	f.syn = nil
	l3, t, _, _, _ := parseSegment(frame)
	k.rewrite(vh, frame, l3, t, f.fake, f.listener)
	k.write(vh, [][]byte{frame})
	k.later.add(laterAnswer, f)
}

// giveUp sends the rest of a flow the listener never answered to the stack.
func (k *kernelTCP) giveUp(f *ktcpFlow) {
	if !f.state.CompareAndSwap(int32(ktcpOpen), int32(ktcpHandedOff)) {
		return
	}
	k.s.log.Debug("tcp: the kernel path's listener did not answer; the stack takes the flow", "src", f.key.guest, "dst", f.key.remote)
	k.s.counters.tcpOpen.Add(-1)
	f.release()
	f.release = nil
	f.host.close()
	// The listener may still hold a half-open connection from it.
	k.hold(f.fake)
	k.byFake.CompareAndDelete(f.fake, f)
	k.later.add(laterForget, f)
}

// handOff gives a flow's SYN to the stack, which serves it as any other.
func (k *kernelTCP) handOff(f *ktcpFlow) {
	f.state.Store(int32(ktcpHandedOff))
	k.byFake.Delete(f.fake)
	frame := f.syn[k.vnetHdr:]
	f.syn = nil
	k.handoffs.Store(f.key, f.handoff)
	// The forwarder takes the note if the SYN reaches it; one it drops
	// (its own limits) must not leave a note for a later flow.
	k.later.add(laterForget, f)
	k.link.mu.Lock()
	d := k.link.dispatcher
	k.link.mu.Unlock()
	if d == nil {
		k.handoffs.Delete(f.key)
		return
	}
	pkt := stack.NewPacketBuffer(stack.PacketBufferOptions{Payload: buffer.MakeWithData(frame)})
	d.DeliverNetworkPacket(0, pkt)
	pkt.DecRef()
}

// takeHandoff returns, once, what the kernel path learned of the flow
// from guest to remote before handing it over.
func (k *kernelTCP) takeHandoff(guest, remote netip.AddrPort) (ktcpHandoff, bool) {
	if k == nil {
		return ktcpHandoff{}, false
	}
	v, ok := k.handoffs.LoadAndDelete(ktcpKey{guest: guest, remote: remote})
	if !ok {
		return ktcpHandoff{}, false
	}
	return v.(ktcpHandoff), true
}

// rewrite makes the segment in frame go from src to dst, and addresses the
// frame to the guest from the gateway's MAC.
func (k *kernelTCP) rewrite(vh, frame, l3 []byte, t header.TCP, src, dst netip.AddrPort) {
	copy(frame[0:6], frame[6:12])
	copy(frame[6:12], k.link.addr)
	full := len(vh) == 0 || vh[0]&vnetFlagNeedsCsum == 0
	newSrc, newDst := tcpipAddr(src.Addr()), tcpipAddr(dst.Addr())
	var oldSrc, oldDst tcpip.Address
	if l3[0]>>4 == 4 {
		ip := header.IPv4(l3)
		oldSrc, oldDst = ip.SourceAddress(), ip.DestinationAddress()
		ip.SetSourceAddressWithChecksumUpdate(newSrc)
		ip.SetDestinationAddressWithChecksumUpdate(newDst)
	} else {
		// IPv6 has no header checksum.
		ip := header.IPv6(l3)
		oldSrc, oldDst = ip.SourceAddress(), ip.DestinationAddress()
		ip.SetSourceAddress(newSrc)
		ip.SetDestinationAddress(newDst)
	}
	t.UpdateChecksumPseudoHeaderAddress(oldSrc, newSrc, full)
	t.UpdateChecksumPseudoHeaderAddress(oldDst, newDst, full)
	if full {
		t.SetSourcePortWithChecksumUpdate(src.Port())
		t.SetDestinationPortWithChecksumUpdate(dst.Port())
	} else {
		// The guest's kernel sums the header itself.
		t.SetSourcePort(src.Port())
		t.SetDestinationPort(dst.Port())
	}
}

// parseSegment finds the IP header (l3) and TCP header of an Ethernet frame
// whose headers lie in first, and the segment's addresses. IPv4 fragments
// and IPv6 extension headers are left to the stack.
func parseSegment(first []byte) (l3 []byte, t header.TCP, src, dst netip.AddrPort, ok bool) {
	if len(first) < header.EthernetMinimumSize+header.IPv4MinimumSize+header.TCPMinimumSize {
		return nil, nil, src, dst, false
	}
	switch binary.BigEndian.Uint16(first[12:]) {
	case uint16(header.IPv4ProtocolNumber):
		ip := header.IPv4(first[header.EthernetMinimumSize:])
		ihl := int(ip.HeaderLength())
		if ip[0]>>4 != 4 || ihl < header.IPv4MinimumSize || len(ip) < ihl+header.TCPMinimumSize ||
			ip.Protocol() != uint8(header.TCPProtocolNumber) || ip.More() || ip.FragmentOffset() != 0 {
			return nil, nil, src, dst, false
		}
		t = header.TCP(ip[ihl:])
		src = netip.AddrPortFrom(netip.AddrFrom4(ip.SourceAddress().As4()), t.SourcePort())
		dst = netip.AddrPortFrom(netip.AddrFrom4(ip.DestinationAddress().As4()), t.DestinationPort())
		return ip, t, src, dst, true
	case uint16(header.IPv6ProtocolNumber):
		ip := header.IPv6(first[header.EthernetMinimumSize:])
		if len(ip) < header.IPv6MinimumSize+header.TCPMinimumSize || ip[0]>>4 != 6 ||
			ip.NextHeader() != uint8(header.TCPProtocolNumber) {
			return nil, nil, src, dst, false
		}
		t = header.TCP(ip[header.IPv6MinimumSize:])
		src = netip.AddrPortFrom(netip.AddrFrom16(ip.SourceAddress().As16()), t.SourcePort())
		dst = netip.AddrPortFrom(netip.AddrFrom16(ip.DestinationAddress().As16()), t.DestinationPort())
		return ip, t, src, dst, true
	}
	return nil, nil, src, dst, false
}

// fromListener says whether a guest segment comes from the listener.
func (k *kernelTCP) fromListener(src netip.AddrPort) bool {
	if k.listener.Addr().IsUnspecified() {
		// No socket of the guest's can share the port of a listener
		// bound to all addresses.
		return src.Port() == k.listener.Port()
	}
	return src == k.listener
}

// listenerFor returns where a flow from the guest's address a ends, and
// whether the listener takes connections there.
func (k *kernelTCP) listenerFor(a netip.Addr) (netip.AddrPort, bool) {
	if k.listener.Addr().IsUnspecified() {
		return netip.AddrPortFrom(a, k.listener.Port()), !a.IsLoopback() && !a.IsUnspecified()
	}
	return k.listener, a == k.listener.Addr()
}

// write puts a rewritten frame on the first queue (a TAP takes a frame on
// any queue). parts hold exactly the frame: the reader's filled buffers.
func (k *kernelTCP) write(vh []byte, parts [][]byte) {
	if k.link.write(k.link.fds[0], vh, parts) != 0 {
		return
	}
	n := 0
	for _, p := range parts {
		n += len(p)
	}
	k.counters.txPackets.Add(1)
	k.counters.txBytes.Add(uint64(n))
}

// start serves the listener and the flows' deferred work until the stack
// closes.
func (k *kernelTCP) start() error {
	ctx := k.s.ctx
	if !k.s.flows.spawn(k.serve) {
		k.close()
		return net.ErrClosed
	}
	context.AfterFunc(ctx, k.close)
	if !k.s.flows.spawn(func() { k.runLater(ctx) }) {
		return net.ErrClosed
	}
	return nil
}

// serve accepts the listener's connections and hands each, with its host
// socket, to the relay loops, until the listener is closed.
func (k *kernelTCP) serve() {
	rc, err := k.ln.SyscallConn()
	if err != nil {
		return
	}
	// As the net package's listener did: the guest's small answers
	// leave at once. Accepted sockets inherit the option from the
	// listener. (Keepalive is the guest's own.)
	_ = rc.Control(func(fd uintptr) { sockrelay.SetOption(int(fd), unix.IPPROTO_TCP, unix.TCP_NODELAY, 1) })
	var backoff sockrelay.AcceptBackoff
	for {
		fd, peer, err := sockrelay.Accept(rc)
		if err != nil {
			if backoff.Wait(err) {
				continue
			}
			return
		}
		backoff.Reset()
		v, ok := k.byFake.Load(peer)
		if !ok {
			unix.Close(fd)
			continue
		}
		f := v.(*ktcpFlow)
		if !f.state.CompareAndSwap(int32(ktcpOpen), int32(ktcpAccepted)) {
			unix.Close(fd)
			continue
		}
		k.relay(f, fd)
	}
}

// relay hands the listener's connection from f's guest, guest, and f's
// host socket to the relay loops, which finish f once both ended.
func (k *kernelTCP) relay(f *ktcpFlow, guest int) {
	s := k.s
	start := time.Now()
	s.counters.tcpTotal.Add(1)
	s.counters.tcpKernelTotal.Add(1)
	err := k.loops.Add(guest, f.host.take(), func() { k.translateInKernel(f) }, func(up, down int64) {
		s.counters.bytesFromGuest.Add(uint64(up))
		s.counters.bytesToGuest.Add(uint64(down))
		s.log.Debug("tcp flow closed (kernel path)", "src", f.key.guest, "dst", f.key.remote,
			"duration", time.Since(start), "bytes_out", up, "bytes_in", down)
		k.finish(f, ktcpAccepted)
	})
	if err != nil {
		k.finish(f, ktcpAccepted)
	}
}

// hostFD is a flow's host socket until the relay loops take it.
type hostFD struct {
	fd  int
	set bool
}

func (h *hostFD) close() {
	if h.set {
		unix.Close(h.fd)
		h.set = false
	}
}

func (h *hostFD) take() int {
	h.set = false
	return h.fd
}

// finish ends f's translation after the closing handshake had its time.
func (k *kernelTCP) finish(f *ktcpFlow, from ktcpState) {
	// Only from the state the caller saw: a flow the reaper found open
	// may have been accepted since, and its relay now owns it.
	if !f.state.CompareAndSwap(int32(from), int32(ktcpClosing)) {
		return
	}
	k.s.counters.tcpOpen.Add(-1)
	if f.release != nil {
		f.release()
		f.release = nil
	}
	f.host.close()
	f.handoff = ktcpHandoff{}
	k.later.add(laterUnmap, f)
}

// close stops the listener and the host sockets of flows not yet relayed.
func (k *kernelTCP) close() {
	k.ln.Close()
	k.loops.Close()
	k.pipes.Close()
	if k.nat != nil {
		// The flows' deferred work may still remove entries: it
		// finds the map closed. The table ends with the namespace.
		k.nat.Close()
	}
	k.byGuest.Range(func(_, v any) bool {
		k.finish(v.(*ktcpFlow), ktcpOpen)
		return true
	})
}
