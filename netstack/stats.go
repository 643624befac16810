package netstack

import (
	"os"
	"runtime"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"github.com/netns-run/netns-run/netstack/egress"
)

// counters are the Stack's own statistics; gVisor keeps the packet ones.
type counters struct {
	tcpOpen, udpOpen, icmpOpen atomic.Int64
	// tcpInboundOpen counts the published ports' connections through
	// the stack, which have their own bound (Stack.ForwardTCP).
	tcpInboundOpen                atomic.Int64
	tcpTotal, udpTotal, icmpTotal atomic.Uint64
	tcpKernelTotal                atomic.Uint64
	tcpKernelNATTotal             atomic.Uint64
	bytesFromGuest, bytesToGuest  atomic.Uint64

	dropBlocked         atomic.Uint64
	dropICMPUnavailable atomic.Uint64
	dropFlowLimit       atomic.Uint64
	// dropFastPath counts datagrams the UDP fast path dropped because a
	// host socket or the TAP queue was full.
	dropFastPath    atomic.Uint64
	dropDNSOverload atomic.Uint64
	dropPingFull    atomic.Uint64
	dnsTimeouts     atomic.Uint64
}

// AddPublished counts published-port connections that bypassed the stack
// (see TCPPublishedKernelTotal) into st.
func (st *Stats) AddPublished(open int64, total, fromGuest, toGuest uint64) {
	st.Flows.TCPOpen += open
	st.Flows.TCPTotal += total
	st.Flows.TCPPublishedKernelTotal += total
	st.Bytes.FromGuest += fromGuest
	st.Bytes.ToGuest += toGuest
}

// Stats is a snapshot of what the stack has done, for the API's get_stats.
type Stats struct {
	UptimeSeconds float64 `json:"uptime_seconds"`
	Flows         struct {
		TCPOpen   int64  `json:"tcp_open"`
		UDPOpen   int64  `json:"udp_open"`
		ICMPOpen  int64  `json:"icmp_open"`
		TCPTotal  uint64 `json:"tcp_total"`
		UDPTotal  uint64 `json:"udp_total"`
		ICMPTotal uint64 `json:"icmp_total"`
		// TCPKernelTotal counts the TCP flows (of TCPTotal) that ended
		// in the guest's own kernel (the kernel TCP path).
		TCPKernelTotal uint64 `json:"tcp_kernel_total"`
		// TCPKernelNATTotal counts those (of TCPKernelTotal) whose
		// addresses the guest's kernel translated (package ktcpnat):
		// their segments never crossed the TAP.
		TCPKernelNATTotal uint64 `json:"tcp_kernel_nat_total"`
		// TCPPublishedKernelTotal counts the published ports' TCP
		// connections (of TCPTotal) that the guest's kernel took
		// (portfwd.KernelPath), outside the stack.
		TCPPublishedKernelTotal uint64 `json:"tcp_published_kernel_total"`
		// DNSPending counts queries waiting for an upstream.
		DNSPending int64 `json:"dns_pending"`
	} `json:"flows"`
	// Bytes relayed by the forwarders (payload, both ends of all flows).
	Bytes struct {
		FromGuest uint64 `json:"from_guest"`
		ToGuest   uint64 `json:"to_guest"`
	} `json:"bytes"`
	// Frames on the guest's link.
	Link struct {
		RxPackets uint64 `json:"rx_packets"`
		RxBytes   uint64 `json:"rx_bytes"`
		TxPackets uint64 `json:"tx_packets"`
		TxBytes   uint64 `json:"tx_bytes"`
	} `json:"link"`
	// Process is the helper's own footprint (soak tests watch it).
	Process struct {
		Goroutines int    `json:"goroutines"`
		FDs        int    `json:"fds"`
		RSSKiB     uint64 `json:"rss_kib"`
	} `json:"process"`
	Drops struct {
		QueueFull       uint64 `json:"queue_full"`
		BlockedLoopback uint64 `json:"blocked_loopback"`
		ICMPUnavailable uint64 `json:"icmp_unavailable"`
		FlowLimit       uint64 `json:"flow_limit"`
		Malformed       uint64 `json:"malformed"`
		// DNSOverload counts queries answered SERVFAIL because too
		// many were waiting; DNSTimeout those no upstream answered.
		DNSOverload uint64 `json:"dns_overload"`
		DNSTimeout  uint64 `json:"dns_timeout"`
		// PingQueueFull counts echo requests dropped because the
		// host's ICMP socket was full.
		PingQueueFull uint64 `json:"ping_queue_full"`
	} `json:"drops"`
	// Egress counts the egress policy's decisions.
	Egress egress.Stats `json:"egress"`
}

// Stats returns the current statistics.
func (s *Stack) Stats() Stats {
	var st Stats
	st.UptimeSeconds = time.Since(s.started).Seconds()
	c := &s.counters
	st.Flows.TCPOpen, st.Flows.UDPOpen, st.Flows.ICMPOpen = c.tcpOpen.Load()+c.tcpInboundOpen.Load(), c.udpOpen.Load(), c.icmpOpen.Load()
	st.Flows.TCPTotal, st.Flows.UDPTotal, st.Flows.ICMPTotal = c.tcpTotal.Load(), c.udpTotal.Load(), c.icmpTotal.Load()
	st.Flows.TCPKernelTotal = c.tcpKernelTotal.Load()
	st.Flows.TCPKernelNATTotal = c.tcpKernelNATTotal.Load()
	st.Bytes.FromGuest, st.Bytes.ToGuest = c.bytesFromGuest.Load(), c.bytesToGuest.Load()
	st.Drops.BlockedLoopback = c.dropBlocked.Load()
	st.Drops.ICMPUnavailable = c.dropICMPUnavailable.Load()
	st.Drops.FlowLimit = c.dropFlowLimit.Load() + s.stack.Stats().TCP.ForwardMaxInFlightDrop.Value() +
		s.udpFlows.evictions.Load() + s.ping.table.evictions.Load()
	st.Drops.DNSOverload, st.Drops.DNSTimeout = c.dropDNSOverload.Load(), c.dnsTimeouts.Load()
	st.Drops.PingQueueFull = c.dropPingFull.Load()
	st.Egress = s.egress.Stats()
	if s.dns != nil {
		st.Flows.DNSPending = int64(s.dns.pending())
	}
	st.Process.Goroutines = runtime.NumGoroutine()
	st.Process.FDs, st.Process.RSSKiB = Footprint("self")
	if info, ok := s.stack.NICInfo()[nicID]; ok {
		n := info.Stats
		st.Link.RxPackets, st.Link.RxBytes = n.Rx.Packets.Value(), n.Rx.Bytes.Value()
		st.Link.TxPackets, st.Link.TxBytes = n.Tx.Packets.Value(), n.Tx.Bytes.Value()
		st.Drops.QueueFull = n.TxPacketsDroppedNoBufferSpace.Value()
		st.Drops.Malformed = n.MalformedL4RcvdPackets.Value()
	}
	st.Drops.QueueFull += c.dropFastPath.Load()
	if f := s.udpFast; f != nil {
		st.Link.RxPackets += f.counters.rxPackets.Load()
		st.Link.RxBytes += f.counters.rxBytes.Load()
		st.Link.TxPackets += f.counters.txPackets.Load()
		st.Link.TxBytes += f.counters.txBytes.Load()
	}
	if k := s.ktcp; k != nil {
		st.Link.RxPackets += k.counters.rxPackets.Load()
		st.Link.RxBytes += k.counters.rxBytes.Load()
		st.Link.TxPackets += k.counters.txPackets.Load()
		st.Link.TxBytes += k.counters.txBytes.Load()
	}
	return st
}

// Footprint counts the open descriptors and reads the resident set size of
// process pid ("self" or a number) from /proc; zeros where /proc cannot
// tell (a sandboxed engine has no /proc: its parent asks for it).
func Footprint(pid string) (fds int, rssKiB uint64) {
	if ents, err := os.ReadDir("/proc/" + pid + "/fd"); err == nil {
		fds = len(ents)
	}
	b, err := os.ReadFile("/proc/" + pid + "/statm")
	if err != nil {
		return fds, 0
	}
	f := strings.Fields(string(b))
	if len(f) < 2 {
		return fds, 0
	}
	pages, _ := strconv.ParseUint(f[1], 10, 64)
	return fds, pages * uint64(os.Getpagesize()) / 1024
}

// reserve takes one of max slots in open, atomically; false when full.
func reserve(open *atomic.Int64, max int64) bool {
	if open.Add(1) > max {
		open.Add(-1)
		return false
	}
	return true
}

// flowStarted keeps the open and total counts of one protocol.
func flowStarted(open *atomic.Int64, total *atomic.Uint64) {
	open.Add(1)
	total.Add(1)
}

// Info is the configuration in force, for the API's get_info.
type Info struct {
	MTU           uint32   `json:"mtu"`
	Network       string   `json:"network"`
	Gateway       string   `json:"gateway"`
	DNS           string   `json:"dns"`
	IPv6          bool     `json:"ipv6"`
	Network6      string   `json:"network6,omitempty"`
	Gateway6      string   `json:"gateway6,omitempty"`
	DNS6          string   `json:"dns6,omitempty"`
	HostLoopback  bool     `json:"host_loopback"`
	DNSForwarder  bool     `json:"dns_forwarder"`
	DNSUpstreams  []string `json:"dns_upstreams"`
	Restricted    bool     `json:"restricted"`
	ICMPEcho4     string   `json:"icmp_echo_ipv4"`
	ICMPEcho6     string   `json:"icmp_echo_ipv6,omitempty"`
	UptimeSeconds float64  `json:"uptime_seconds"`
	PacketCapture bool     `json:"packet_capture"`
	OutboundAddr4 string   `json:"outbound_addr,omitempty"`
	OutboundAddr6 string   `json:"outbound_addr6,omitempty"`
}

// Info describes the configuration in force.
func (s *Stack) Info() Info {
	c := s.cfg
	in := Info{
		MTU: c.MTU, Network: c.Network.String(), Gateway: c.Gateway.String(), DNS: c.DNS.String(),
		IPv6: c.IPv6, HostLoopback: !c.DisableHostLoopback, DNSForwarder: !c.DisableDNS,
		DNSUpstreams: []string{}, Restricted: c.Restrict, ICMPEcho4: s.ping.mode4.String(),
		UptimeSeconds: time.Since(s.started).Seconds(), PacketCapture: c.Capture != nil,
	}
	if c.IPv6 {
		in.Network6, in.Gateway6, in.DNS6 = c.Network6.String(), c.Gateway6.String(), c.DNS6.String()
		in.ICMPEcho6 = s.ping.mode6.String()
	}
	for _, u := range c.DNSUpstreams {
		in.DNSUpstreams = append(in.DNSUpstreams, u.String())
	}
	if c.OutboundAddr4.IsValid() {
		in.OutboundAddr4 = c.OutboundAddr4.String()
	}
	if c.OutboundAddr6.IsValid() {
		in.OutboundAddr6 = c.OutboundAddr6.String()
	}
	return in
}
