// Package netstack is the host side of the userspace network: a gVisor
// TCP/IP stack on the guest's TAP that answers for every destination and turns
// each guest flow into an ordinary host socket.
//
// The forwarders follow gvisor-tap-vsock's shape: a TCP SYN is held until the
// host connection is up, so a refused or unreachable destination becomes an
// RST for the guest instead of a connection that dies after the handshake.
package netstack

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"sync"
	"time"

	gvlog "gvisor.dev/gvisor/pkg/log"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/link/ethernet"
	"gvisor.dev/gvisor/pkg/tcpip/link/sniffer"
	"gvisor.dev/gvisor/pkg/tcpip/network/arp"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv4"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv6"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
	"gvisor.dev/gvisor/pkg/tcpip/transport/icmp"
	"gvisor.dev/gvisor/pkg/tcpip/transport/tcp"
	"gvisor.dev/gvisor/pkg/tcpip/transport/udp"

	"github.com/netns-run/netns-run/netstack/egress"
	"github.com/netns-run/netns-run/tap"
)

const nicID tcpip.NICID = 1

// maxInFlightSYNs bounds connections still being dialed; SYNs beyond it
// are dropped (the guest retries). gvisor-tap-vsock's 10 is far too low for
// a build that opens many connections at once. With the kernel TCP path,
// it and the stack's forwarder share the bound (ktcpMaxConnecting): each
// holding all of it let a SYN flood run twice as many dials.
const maxInFlightSYNs = 4096

// Stack is a running userspace network attached to one TAP device.
type Stack struct {
	cfg    Config
	log    *slog.Logger
	dev    tap.Device
	stack  *stack.Stack
	ctx    context.Context
	cancel context.CancelFunc
	flows  flowGroup
	closed sync.Once
	// firstPackets carries notes on a new flow's first packet from the
	// transport guard to the forwarder.
	firstPackets firstPacketNotes
	counters     counters
	started      time.Time
	ping         *pinger
	dns          *dnsForwarder
	linkDown     chan struct{}
	linkOnce     sync.Once
	hostLocal    hostLocal
	link         *tapLink
	lim          limits
	udpFlows     *flowTable
	tcpBufs      *tcpBuffers
	// udpFast carries established UDP flows past the stack; nil when
	// capturing, since the capture sees only what passes the stack.
	udpFast *udpFastPath
	// ktcp ends guest TCP in the guest's kernel; nil without a listener.
	ktcp   *kernelTCP
	egress *egress.Policy
}

// New starts serving the guest behind dev. The Stack owns dev from now on
// and closes it in Close.
func New(ctx context.Context, cfg Config, dev tap.Device) (*Stack, error) {
	return newStack(ctx, cfg, dev, tap.VnetHdrLen(dev.Queues()[0]))
}

// newStack is New with the size of the virtio-net header on dev's frames
// given (0: none), which lets tests put a socket in place of a TAP with
// offloads.
func newStack(ctx context.Context, cfg Config, dev tap.Device, vnetHdr int) (*Stack, error) {
	if cfg.KernelTCP != nil {
		// The kernel TCP path, if it starts, listens on a duplicate.
		defer cfg.KernelTCP.Close()
	}
	if cfg.KernelTCPNAT != nil {
		defer cfg.KernelTCPNAT.Close() // likewise
	}
	if err := cfg.validate(); err != nil {
		dev.Close()
		return nil, fmt.Errorf("netstack config: %w", err)
	}
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	s := &Stack{cfg: cfg, log: log, dev: dev, started: time.Now(), linkDown: make(chan struct{}), lim: defaultLimits()}
	if cfg.limits != nil {
		s.lim = *cfg.limits
	}
	s.egress = newEgress(cfg)
	s.ctx, s.cancel = context.WithCancel(ctx)
	s.udpFlows = newFlowTable(s.ctx, &s.flows, s.lim.udpFlows, s.lim.udp)
	s.tcpBufs = newTCPBuffers(s.lim.tcpBuffers)
	if err := s.start(vnetHdr); err != nil {
		s.Close()
		return nil, err
	}
	return s, nil
}

func (s *Stack) start(vnetHdr int) error {
	// gVisor logs through its own package-level logger at Info (for
	// example every dropped martian, rate-limited); keep the helper
	// quiet by default: our own logger says what matters.
	gvlog.SetLevel(gvlog.Warning)
	// No duplicate address detection for our own addresses: the guest
	// must be able to use the gateway and DNS addresses at once.
	v6 := ipv6.NewProtocolWithOptions(ipv6.Options{DADConfigs: stack.DADConfigurations{DupAddrDetectTransmits: 0}})
	s.stack = stack.New(stack.Options{
		NetworkProtocols:   []stack.NetworkProtocolFactory{ipv4.NewProtocol, v6, arp.NewProtocol},
		TransportProtocols: []stack.TransportProtocolFactory{tcp.NewProtocol, udp.NewProtocol, icmp.NewProtocol4, icmp.NewProtocol6},
	})
	if err := s.tuneTCP(); err != nil {
		return err
	}
	fds := make([]int, 0, len(s.dev.Queues()))
	for _, q := range s.dev.Queues() {
		fds = append(fds, int(q.Fd()))
	}
	// Reading the TAP fails once its device is gone (deleted inside the
	// namespace): that ends the helper's job.
	tl, err := newTapLink(fds, vnetHdr, s.cfg.MTU, tcpip.LinkAddress(s.cfg.GatewayMAC),
		func(tcpip.Error) { s.linkOnce.Do(func() { close(s.linkDown) }) })
	if err != nil {
		return err
	}
	s.link = tl
	if s.cfg.Capture == nil {
		s.udpFast = newUDPFastPath(tl)
		tl.divert = s.udpFast.divert
		if s.cfg.KernelTCP != nil {
			k, err := newKernelTCP(s, tl, s.cfg.KernelTCP, s.cfg.KernelTCPNAT)
			if err != nil {
				return err
			}
			s.ktcp = k
			udp := s.udpFast.divert
			tl.divert = func(vh []byte, parts [][]byte, n int, scratch *frameScratch) bool {
				return k.divert(vh, parts, n) || udp(vh, parts, n, scratch)
			}
			if err := k.start(); err != nil {
				return err
			}
		}
	}
	// Before the other diverts (and also with a capture, which has
	// none): ARP probes and announcements go unanswered (arpfilter.go).
	var own4 []netip.Addr
	for _, a := range []netip.Addr{s.cfg.Gateway, s.cfg.DNS} {
		if a.Is4() {
			own4 = append(own4, a)
		}
	}
	next := tl.divert
	tl.divert = func(vh []byte, parts [][]byte, n int, scratch *frameScratch) bool {
		return arpUnanswered(parts[0], own4) || next != nil && next(vh, parts, n, scratch)
	}
	var link stack.LinkEndpoint = ethernet.New(tl)
	if s.cfg.Capture != nil {
		// The sniffer also logs every packet to stderr unless told not
		// to, through a package-level switch.
		sniffer.LogPackets.Store(0)
		// Guest frames both ways, as seen on the TAP, in pcap format
		// (LINKTYPE_RAW: the IP packets).
		if link, err = sniffer.NewWithWriter(link, s.cfg.Capture, s.cfg.MTU+header.EthernetMinimumSize); err != nil {
			return fmt.Errorf("packet capture: %w", err)
		}
	}
	// Disabled until every handler is installed: the TAP readers start
	// with the NIC, and gVisor's handler setters must not race packets.
	if terr := s.stack.CreateNICWithOptions(nicID, link, stack.NICOptions{Disabled: true}); terr != nil {
		return fmt.Errorf("create NIC: %s", terr)
	}
	// The gateway and DNS addresses are the stack's own: it answers ARP
	// and ICMP echo for them itself.
	own := []netip.Prefix{
		netip.PrefixFrom(s.cfg.Gateway, s.cfg.Network.Bits()),
		netip.PrefixFrom(s.cfg.DNS, s.cfg.Network.Bits()),
	}
	if s.cfg.IPv6 {
		own = append(own,
			netip.PrefixFrom(linkLocalGateway, 64),
			netip.PrefixFrom(s.cfg.Gateway6, s.cfg.Network6.Bits()),
			netip.PrefixFrom(s.cfg.DNS6, s.cfg.Network6.Bits()))
	}
	for _, p := range own {
		if !p.Addr().IsValid() {
			continue // no DNS address (pasta without --dns-forward)
		}
		proto := ipv4.ProtocolNumber
		if p.Addr().Is6() {
			proto = ipv6.ProtocolNumber
		}
		pa := tcpip.ProtocolAddress{
			Protocol:          proto,
			AddressWithPrefix: tcpip.AddressWithPrefix{Address: tcpipAddr(p.Addr()), PrefixLen: p.Bits()},
		}
		if terr := s.stack.AddProtocolAddress(nicID, pa, stack.AddressProperties{}); terr != nil {
			return fmt.Errorf("add address %s: %s", p, terr)
		}
	}
	// Promiscuous: accept packets for any destination, so every outside
	// address is "local" to the stack. Spoofing: reply from those addresses.
	if terr := s.stack.SetPromiscuousMode(nicID, true); terr != nil {
		return fmt.Errorf("promiscuous mode: %s", terr)
	}
	if terr := s.stack.SetSpoofing(nicID, true); terr != nil {
		return fmt.Errorf("spoofing: %s", terr)
	}
	s.stack.SetRouteTable([]tcpip.Route{
		{Destination: header.IPv4EmptySubnet, NIC: nicID},
		{Destination: header.IPv6EmptySubnet, NIC: nicID},
	})
	fwdInFlight := maxInFlightSYNs
	if s.ktcp != nil {
		fwdInFlight -= ktcpMaxConnecting
	}
	tcpFwd := tcp.NewForwarder(s.stack, 0, fwdInFlight, s.handleTCP)
	s.stack.SetTransportProtocolHandler(tcp.ProtocolNumber, s.guardTransport(tcpFwd.HandlePacket))
	s.ping = newPinger(s)
	s.stack.SetTransportProtocolHandler(icmp.ProtocolNumber4, s.ping.handle)
	s.stack.SetTransportProtocolHandler(icmp.ProtocolNumber6, s.ping.handle)
	udpFwd := udp.NewForwarder(s.stack, s.handleUDP)
	s.stack.SetTransportProtocolHandler(udp.ProtocolNumber, s.dhcpFirst(s.guardTransport(udpFwd.HandlePacket)))
	if !s.cfg.DisableDNS {
		if err := s.startDNS(); err != nil {
			return err
		}
	}
	if terr := s.stack.EnableNIC(nicID); terr != nil {
		return fmt.Errorf("enable NIC: %s", terr)
	}
	if s.cfg.IPv6 {
		if !s.flows.spawn(s.advertiseRouter) {
			return net.ErrClosed
		}
	}
	s.log.Debug("netstack up", "mtu", s.cfg.MTU, "tap_offload", vnetHdr > 0, "gateway", s.cfg.Gateway, "dns", s.cfg.DNS,
		"host_loopback", !s.cfg.DisableHostLoopback, "dns_upstreams", s.cfg.DNSUpstreams)
	return nil
}

// tuneTCP sets the options gVisor leaves conservative by default.
func (s *Stack) tuneTCP() error {
	sack := tcpip.TCPSACKEnabled(true)
	moderate := tcpip.TCPModerateReceiveBufferOption(true)
	// RACK loss detection stalls bulk transfers both ways at once (seen
	// here: a 1 GiB echo at MTU 1500 stopped for good after ~130 MB;
	// Tailscale disables it for spurious retransmissions, tailscale#9707).
	recovery := tcpip.TCPRecovery(0)
	// Reno, not cubic: gvisor#11632, an overflow in cubic's window math.
	reno := tcpip.CongestionControlOption("reno")
	// The stack's side of a flow the host closed first (a published
	// port's client hung up) waits out TIME_WAIT. Its 60 s default
	// only guards against stray segments of an old connection on a real
	// network; on the guest's link (microseconds of delay, and ports we
	// choose) it kept ~2000 endpoints per second of inbound connections
	// alive for a minute. 1 s still held 2000 of them: 37 MB of peak
	// RSS after 2000 sequential inbound connections, 23 MB at 200 ms.
	timeWait := tcpip.TCPTimeWaitTimeoutOption(200 * time.Millisecond)
	opts := []tcpip.SettableTransportProtocolOption{
		&timeWait,
		&sack,
		&moderate,
		&recovery,
		&reno,
		// Grown automatically up to tcpBufferMax, and cut by the
		// budget for all flows (budget.go).
		&tcpip.TCPSendBufferSizeRangeOption{Min: 4 << 10, Default: 1 << 20, Max: tcpBufferMax},
		&tcpip.TCPReceiveBufferSizeRangeOption{Min: 4 << 10, Default: 1 << 20, Max: tcpBufferMax},
	}
	for _, o := range opts {
		if terr := s.stack.SetTransportProtocolOption(tcp.ProtocolNumber, o); terr != nil {
			return fmt.Errorf("tcp option %T: %s", o, terr)
		}
	}
	return nil
}

// LinkDown is closed when the guest's link has gone away (the TAP was
// deleted) or the stack stopped. The open TAP keeps the namespace itself
// alive, so callers watch the namespace's processes as well.
func (s *Stack) LinkDown() <-chan struct{} { return s.linkDown }

// Close stops every flow and the stack, then closes the TAP. It waits for
// all goroutines the Stack started.
func (s *Stack) Close() error {
	s.closed.Do(func() {
		s.cancel()
		// Closing the stack first aborts every gVisor endpoint, which
		// unblocks flows still in a handshake with a silent guest.
		if s.stack != nil {
			s.stack.Close()
		}
		if s.link != nil {
			s.link.shutdown()
		}
		s.flows.closeAndWait()
		if s.stack != nil {
			s.stack.Wait()
		}
		s.dev.Close()
	})
	return nil
}

// flowGroup tracks the goroutines serving flows so Close can wait for them.
type flowGroup struct {
	mu     sync.Mutex
	closed bool
	wg     sync.WaitGroup
}

// enter registers a flow goroutine; it fails once the group is closing.
func (g *flowGroup) enter() bool {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.closed {
		return false
	}
	g.wg.Add(1)
	return true
}

func (g *flowGroup) leave() { g.wg.Done() }

// spawn runs f on a goroutine of the group; it reports false, and f does
// not run, once the group is closing.
func (g *flowGroup) spawn(f func()) bool {
	if !g.enter() {
		return false
	}
	go func() {
		defer g.leave()
		f()
	}()
	return true
}

func (g *flowGroup) closeAndWait() {
	g.mu.Lock()
	g.closed = true
	g.mu.Unlock()
	g.wg.Wait()
}

var (
	errBlocked = errors.New("destination blocked by policy")
	// errSilentDrop: ignore the SYN, as if nothing were there.
	errSilentDrop = errors.New("destination silently dropped")
)
