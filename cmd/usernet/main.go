// Command usernet is a drop-in replacement for slirp4netns: the same
// command line, output, ready and exit fds and API socket, served by the
// gVisor userspace network stack.
package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"os/signal"
	"runtime"
	"time"

	"golang.org/x/sys/unix"

	"github.com/netns-run/netns-run/cmd/internal/cli"
	"github.com/netns-run/netns-run/launcher"
	"github.com/netns-run/netns-run/launcher/safefs"
	"github.com/netns-run/netns-run/netstack"
	"github.com/netns-run/netns-run/netstack/egress"
	"github.com/netns-run/netns-run/portfwd"
	"github.com/netns-run/netns-run/tap"
)

var version = "dev"

func main() {
	if launcher.IsChild() {
		launcher.RunChild()
	}
	cli.SetProcs()
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

func run(args []string, stdout, stderr io.Writer) int {
	if pasta, rest := pastaMode(args); pasta {
		return runPasta(rest, stdout, stderr)
	}
	parseOut := stdout
	if launcher.IsSandboxedCopy() {
		// The command line was parsed, and its warnings printed, before
		// the re-exec into the sandbox.
		parseOut = io.Discard
	}
	// The sandboxed copy must not look the host's paths up again: they
	// need not exist in the sandbox, and what it needs of them was opened
	// before the re-exec.
	cfg, err := parseArgs(args, parseOut, !launcher.IsSandboxedCopy())
	var ue *usageError
	if errors.As(err, &ue) {
		fmt.Fprintln(stderr, ue.msg)
		if !ue.noUsage {
			fmt.Fprintf(stdout, helpText, os.Args[0])
		}
		return 1
	}
	if err != nil {
		fmt.Fprintln(stderr, err)
		return 1
	}
	if cfg.help {
		fmt.Fprintf(stdout, helpText, os.Args[0])
		return 0
	}
	if cfg.version {
		fmt.Fprintf(stdout, versionText, version, version)
		return 0
	}
	if err := serve(cfg, stdout, stderr); err != nil {
		fmt.Fprintf(stderr, "usernet: %v\n", err)
		return 1
	}
	return 0
}

// addressing derives slirp4netns's fixed offsets from the CIDR.
type addressing struct {
	gateway, dns, guest netip.Addr
}

func addressesOf(p netip.Prefix) addressing {
	base := p.Addr().As4()
	at := func(off byte) netip.Addr {
		b := base
		b[3] += off
		return netip.AddrFrom4(b)
	}
	return addressing{gateway: at(2), dns: at(3), guest: at(100)}
}

// sandboxState is what the sandboxed copy of the process (see
// launcher.ReexecSandboxed) inherits: descriptors by number, plus what it
// can no longer read from the filesystem.
type sandboxState struct {
	TapFDs    []int            `json:"tap_fds"`
	TapName   string           `json:"tap_name"`
	APIFD     int              `json:"api_fd"`
	RemoverFD int              `json:"remover_fd"`
	PcapFD    int              `json:"pcap_fd"`
	Upstreams []netip.AddrPort `json:"dns_upstreams"`
	GuestNS   *portfwd.UserNS  `json:"guest_userns"`
	// The egress policy, with its rules (its --policy file read outside)
	// in a file of their own (egress.RulesFile: thousands do not fit in
	// the environment), and its decision log (-1: none).
	Egress        egress.Config `json:"egress"`
	EgressRulesFD int           `json:"egress_rules_fd"`
	EgressLogFD   int           `json:"egress_log_fd"`
	// TCPListenerFD is the kernel TCP path's listener, TCPNATFD its
	// netlink socket (-1: none).
	TCPListenerFD int `json:"tcp_listener_fd"`
	TCPNATFD      int `json:"tcp_nat_fd"`
	// PortHelperFD connects to the published ports' helper in the
	// guest's namespace (-1: none), which the sandbox cannot start.
	PortHelperFD int `json:"port_helper_fd"`
}

// helper is everything the long-running part needs.
type helper struct {
	cfg    *config
	netCfg netstack.Config
	guest  netip.Addr
	dev    tap.Device
	// tcpListener is the kernel TCP path's listener in the guest's
	// namespace (nil: the stack serves TCP), tcpNAT its netlink socket
	// (nil: no in-kernel translation); the stack takes them.
	tcpListener *os.File
	tcpNAT      *os.File
	// ns holds the target's namespace files from setUp until the TAP is
	// open, and the user namespace on to the re-exec into the sandbox.
	ns   *launcher.OpenTarget
	api  *portfwd.APISocket
	pcap *os.File
	// egressLog is --egress-log's file (nil: none, or stderr).
	egressLog *os.File
	// guestNS is the user namespace whose processes the API refuses
	// (nil: the guest shares ours, so they cannot be told apart), and
	// seesGuests whether we may inspect all of them (see RefuseGuest).
	guestNS    *portfwd.UserNS
	seesGuests bool
	// portHelper serves published ports through the guest's kernel (nil:
	// started with their first connection if h.ns is open, else none).
	portHelper *launcher.PortHelper
}

func serve(cfg *config, stdout, stderr io.Writer) error {
	log := cli.NewLogger(stderr, cfg.debug, cfg.logFormat)
	ctx, cancel := signal.NotifyContext(context.Background(), unix.SIGTERM, unix.SIGINT)
	defer cancel()

	var st sandboxState
	sandboxed, err := launcher.SandboxedState(&st)
	if err != nil {
		return err
	}
	// The runtime's pipes are ours alone: the helpers we start (the port
	// helper lives on in the container's namespaces) must not hold them,
	// or the runtime would wait for those to exit to see our end.
	for _, fd := range []int{cfg.readyFD, cfg.exitFD} {
		if fd >= 0 {
			_, _ = unix.FcntlInt(uintptr(fd), unix.F_SETFD, unix.FD_CLOEXEC)
		}
	}
	h, err := newHelper(cfg, log)
	if err != nil {
		return err
	}
	if sandboxed {
		err = h.adopt(st)
	} else {
		err = h.setUp(ctx, stdout)
	}
	if err != nil {
		return err
	}
	if cfg.sandbox && !sandboxed {
		return h.enterSandbox()
	}
	if h.ns != nil {
		// Kept open for the published ports' helper (run), which
		// starts with their first connection.
		defer h.ns.Close()
	}
	return h.run(ctx, cancel, log, stderr)
}

func newHelper(cfg *config, log *slog.Logger) (*helper, error) {
	addrs := addressesOf(cfg.cidr)
	n := netstack.DefaultConfig()
	n.MTU = uint32(cfg.mtu)
	n.Network = cfg.cidr
	n.Gateway, n.DNS = addrs.gateway, addrs.dns
	gw := addrs.gateway.As4()
	n.GatewayMAC = net.HardwareAddr{0x52, 0x55, gw[0], gw[1], gw[2], gw[3]}
	n.DisableHostLoopback = cfg.disableHostLoopback
	n.DisableDNS = cfg.disableDNS
	n.IPv6 = cfg.enableIPv6
	n.Logger = log
	var err error
	if n.OutboundAddr4, err = outboundAddr(cfg.outbound4, false); err != nil {
		return nil, err
	}
	if n.OutboundAddr6, err = outboundAddr(cfg.outbound6, true); err != nil {
		return nil, err
	}
	return &helper{cfg: cfg, netCfg: n, guest: addrs.guest}, nil
}

// setUp opens the TAP in the target namespace, prints the banner and binds
// the API socket. On failure it leaves nothing open.
func (h *helper) setUp(ctx context.Context, stdout io.Writer) (err error) {
	cfg := h.cfg
	if h.netCfg.DNSUpstreams, err = netstack.DNSUpstreams(cfg.dnsUpstreams, "/etc/resolv.conf"); err != nil {
		return err
	}
	if h.netCfg.Egress, err = cfg.egress.Config(); err != nil {
		return err
	}
	if h.egressLog, _, err = cfg.egress.OpenLog(); err != nil {
		return err
	}
	target := launcher.Target{NetNS: cfg.netnsPath, UserNS: cfg.usernsPath}
	if cfg.pid > 0 {
		t, err := launcher.TargetOfPID(cfg.pid, 10*time.Second)
		if err != nil {
			return err
		}
		target.NetNS = t.NetNS
		if target.UserNS == "" {
			target.UserNS = t.UserNS
		}
	}
	// Opened once: the paths are not looked up again, neither here nor
	// (the user namespace) in the sandbox, where they may not exist.
	if h.ns, err = target.Open(); err != nil {
		return err
	}
	defer func() {
		if err == nil {
			return
		}
		if h.dev != nil {
			h.dev.Close()
		}
		if h.pcap != nil {
			h.pcap.Close()
		}
		h.ns.Close()
	}()
	if err = h.openTap(ctx, h.ns.Target()); err != nil {
		return err
	}
	printBanner(stdout, cfg, addressesOf(cfg.cidr), h.netCfg)
	if cfg.pcap != "" {
		if h.pcap, err = safefs.CreateFile(cfg.pcap); err != nil {
			return fmt.Errorf("packet capture: %w", err)
		}
	}
	if cfg.apiSocket != "" {
		if h.api, err = portfwd.ListenAPISocket(cfg.apiSocket); err != nil {
			return err
		}
	}
	return nil
}

// openTap opens the TAP in target (named by our descriptors) and learns
// the guest's user namespace.
func (h *helper) openTap(ctx context.Context, target launcher.Target) error {
	cfg := h.cfg
	guest := launcher.GuestConfig{
		TapName:    cfg.tapName,
		MTU:        cfg.mtu,
		TxQueueLen: 10000,
		Offload:    true,
		Address:    netip.PrefixFrom(h.guest, cfg.cidr.Bits()),
		Gateway:    h.netCfg.Gateway,
		Nameserver: h.netCfg.DNS,
		MAC:        cfg.macAddress,
		// One queue per P, as netns-run: the guest's kernel spreads its
		// flows over them. A TAP the runtime created without
		// IFF_MULTI_QUEUE gets one.
		Queues: runtime.GOMAXPROCS(0),
		// A capture must see every segment, so the stack keeps them.
		TCPListener: !cfg.userspaceTCP && cfg.pcap == "",
	}
	ns, below, same, err := portfwd.GuestUserNS(target.UserNS, target.NetNS)
	if err != nil {
		return err
	}
	if !same {
		h.guestNS = &ns
		// From inside the sandbox, joined to the guest's namespace
		// without capabilities, we may not inspect all of its processes.
		h.seesGuests = below && !cfg.sandbox
	}
	link, err := launcher.OpenTapIn(ctx, target, guest, cfg.configure)
	if err != nil {
		return err
	}
	h.dev, h.tcpListener, h.tcpNAT = link.Tap, link.TCPListener, link.TCPNAT
	return nil
}

// enterSandbox re-executes into the sandbox, carrying the TAP and the API
// socket over. It returns only on failure.
func (h *helper) enterSandbox() error {
	st := sandboxState{TapName: h.dev.Name(), APIFD: -1, RemoverFD: -1, PcapFD: -1, Upstreams: h.netCfg.DNSUpstreams, GuestNS: h.guestNS,
		Egress: h.netCfg.Egress, EgressRulesFD: -1, EgressLogFD: -1, TCPListenerFD: -1, TCPNATFD: -1, PortHelperFD: -1}
	keep := append([]*os.File(nil), h.dev.Queues()...)
	for _, q := range keep {
		st.TapFDs = append(st.TapFDs, int(q.Fd()))
	}
	if len(st.Egress.Rules) > 0 {
		rules, err := egress.RulesFile(st.Egress.Rules)
		if err != nil {
			return err
		}
		st.Egress.Rules, st.EgressRulesFD = nil, int(rules.Fd())
		keep = append(keep, rules)
	}
	if h.tcpListener != nil {
		st.TCPListenerFD = int(h.tcpListener.Fd())
		keep = append(keep, h.tcpListener)
	}
	if h.tcpNAT != nil && h.tcpListener != nil {
		// Published ports through the guest's kernel (run): their
		// helper starts now, as the sandbox cannot start it later.
		if ph, err := launcher.StartDetachedPortHelper(h.ns.Target()); err == nil {
			st.PortHelperFD = int(ph.Fd())
			keep = append(keep, ph)
		}
	}
	if h.tcpNAT != nil {
		// The sandbox may not change the guest's nftables: a broker
		// outside does it for the sandbox.
		conn, err := launcher.StartNATBroker(h.tcpNAT, portfwd.SocketPort(h.tcpListener))
		h.tcpNAT = nil
		if err == nil {
			st.TCPNATFD = int(conn.Fd())
			keep = append(keep, conn)
		}
	}
	if h.pcap != nil {
		st.PcapFD = int(h.pcap.Fd())
		keep = append(keep, h.pcap)
	}
	if h.egressLog != nil {
		st.EgressLogFD = int(h.egressLog.Fd())
		keep = append(keep, h.egressLog)
	}
	if h.api != nil {
		// The socket file is removed at exit by a process that stays
		// outside the sandbox: no handle on the host's directories may
		// cross into it.
		ln, file, err := h.api.Handoff()
		if err != nil {
			return err
		}
		remover, err := launcher.StartRemover(file)
		if err != nil {
			return err
		}
		st.APIFD, st.RemoverFD = int(ln.Fd()), int(remover.Fd())
		keep = append(keep, ln, remover)
	}
	for _, fd := range []int{h.cfg.readyFD, h.cfg.exitFD} {
		if fd < 0 {
			continue
		}
		// Kept by number, which the sandboxed copy reads from the
		// same flags.
		if _, err := unix.FcntlInt(uintptr(fd), unix.F_GETFD, 0); err == nil {
			keep = append(keep, os.NewFile(uintptr(fd), "runtime-pipe"))
		}
	}
	return launcher.ReexecSandboxed(h.ns.UserNS, st, keep...)
}

// adopt takes over what the pre-sandbox process set up.
func (h *helper) adopt(st sandboxState) error {
	h.netCfg.DNSUpstreams = st.Upstreams
	h.guestNS = st.GuestNS
	if len(st.TapFDs) == 0 {
		return errors.New("sandbox: no TAP queue was handed over")
	}
	queues := make([]*os.File, len(st.TapFDs))
	for i, fd := range st.TapFDs {
		queues[i] = os.NewFile(uintptr(fd), "tap")
	}
	h.dev = tap.FromFiles(st.TapName, queues)
	if st.PcapFD >= 0 {
		h.pcap = os.NewFile(uintptr(st.PcapFD), "pcap")
	}
	if st.TCPListenerFD >= 0 {
		h.tcpListener = os.NewFile(uintptr(st.TCPListenerFD), "tcp-listener")
	}
	if st.TCPNATFD >= 0 {
		h.tcpNAT = os.NewFile(uintptr(st.TCPNATFD), "tcp-nat")
	}
	if st.PortHelperFD >= 0 {
		// Without it, published ports go through the stack.
		if ph, err := launcher.AdoptPortHelper(os.NewFile(uintptr(st.PortHelperFD), "port-helper")); err == nil {
			h.portHelper = ph
		}
	}
	h.netCfg.Egress = st.Egress
	if st.EgressRulesFD >= 0 {
		rules, err := egress.ReadRulesFile(os.NewFile(uintptr(st.EgressRulesFD), "egress-rules"))
		if err != nil {
			return err
		}
		h.netCfg.Egress.Rules = rules
	}
	if st.EgressLogFD >= 0 {
		h.egressLog = os.NewFile(uintptr(st.EgressLogFD), "egress-log")
	}
	if st.APIFD >= 0 {
		var err error
		remover := os.NewFile(uintptr(st.RemoverFD), "remover")
		h.api, err = portfwd.AdoptAPISocket(os.NewFile(uintptr(st.APIFD), "api"), func() error { return launcher.AskRemove(remover) })
		if err != nil {
			remover.Close()
			h.dev.Close()
			return err
		}
	}
	return nil
}

// run serves the network until SIGTERM/SIGINT or the exit fd hangs up.
func (h *helper) run(ctx context.Context, cancel context.CancelFunc, log *slog.Logger, stderr io.Writer) error {
	if h.pcap != nil {
		defer h.pcap.Close()
		h.netCfg.Capture = netstack.NewCaptureWriter(h.pcap, h.cfg.pcapMaxSize, log)
	}
	cli.SetEgressOutput(&h.netCfg.Egress, h.egressLog, h.cfg.egress.Log == "-", stderr)
	if h.egressLog != nil {
		defer h.egressLog.Close()
	}
	h.netCfg.KernelTCP, h.tcpListener = h.tcpListener, nil
	h.netCfg.KernelTCPNAT, h.tcpNAT = h.tcpNAT, nil
	stack, err := netstack.New(ctx, h.netCfg, h.dev)
	if err != nil {
		if h.api != nil {
			h.api.Close()
		}
		return err
	}
	var guest portfwd.Guest = stack
	var kernel *portfwd.KernelPath
	if h.portHelper != nil {
		// Adopted from before the sandbox.
		defer h.portHelper.Close()
	}
	if h.netCfg.KernelTCP != nil && h.netCfg.KernelTCPNAT != nil {
		if h.portHelper == nil && h.ns != nil {
			h.portHelper = launcher.NewPortHelper(h.ns.Target())
			defer h.portHelper.Close()
			if h.cfg.seccomp {
				// The filter (below) refuses what starting it takes.
				if err := h.portHelper.Start(); err != nil {
					log.Debug("published ports go through the stack", "err", err)
				}
			}
		}
		if h.portHelper != nil {
			// The guest's kernel takes published ports' connections too.
			kernel = portfwd.NewKernelPath(ctx, h.portHelper, stack, h.netCfg.ClientSource, log)
			guest = kernel
		}
	}
	ports := portfwd.New(guest, log)
	defer func() {
		// The stack first: closing it ends the flows the port map
		// started, which the port map then waits for.
		stack.Close()
		ports.Close()
	}()
	if h.api != nil {
		api := portfwd.NewAPI(ports, h.guest, log)
		if h.netCfg.IPv6 {
			// An extension: slirp4netns's API is IPv4-only, and its
			// clients never send IPv6 addresses.
			api.AllowIPv6()
		}
		if h.guestNS != nil {
			api.RefuseGuest(*h.guestNS, h.seesGuests)
		}
		api.SetReporter(func() any { return stack.Info() }, cli.StatsWithPublished(func() any { return stack.Stats() }, kernel))
		api.SetEgress(stack)
		done := make(chan struct{})
		go func() {
			defer close(done)
			api.Serve(ctx, h.api.Listener)
		}()
		defer func() {
			cancel()
			<-done
			h.api.Close()
		}()
	}
	// In PID mode the helper ends with its target, as slirp4netns users
	// expect even without an exit fd (the TAP alone keeps the namespace
	// alive, so its link never goes down by itself). Watched before ready
	// is signalled: a runtime may kill the target at once.
	var targetGone <-chan struct{}
	if h.cfg.pid > 0 {
		gone, stop, err := launcher.WatchExit(h.cfg.pid)
		if err != nil {
			log.Warn("cannot watch the target process; relying on the exit fd and signals", "err", err)
		} else {
			defer stop()
			targetGone = gone
		}
	}
	if h.cfg.seccomp {
		// Setup is over: from here on only the steady state's system
		// calls are allowed (ready is signalled after this, as in
		// slirp4netns).
		if err := launcher.LoadSeccomp(h.cfg.debug); err != nil {
			return err
		}
	}
	if h.cfg.readyFD >= 0 {
		if err := launcher.NotifyReady(h.cfg.readyFD); err != nil {
			return err
		}
	}
	if h.cfg.exitFD >= 0 {
		// The watcher may outlive run by a moment; exiting the process
		// ends it.
		go func() {
			if err := launcher.WaitHangup(h.cfg.exitFD); err != nil {
				log.Warn("exit fd", "err", err)
			}
			fmt.Fprintln(stderr, "exitfd event")
			cancel()
		}()
	}
	select {
	case <-ctx.Done():
	case <-targetGone:
		log.Info("the target process exited; exiting")
	case <-stack.LinkDown():
		log.Info("the guest's link went away; exiting")
	}
	if h.netCfg.Egress.Audit {
		policy, err := stack.EgressPolicy()
		cli.PrintSuggestion(stderr, policy, err)
	}
	return nil
}

func printBanner(w io.Writer, cfg *config, a addressing, n netstack.Config) {
	mask := net.IP(net.CIDRMask(cfg.cidr.Bits(), 32)).String()
	base := cfg.cidr.Addr().As4()
	dhcp := func(off byte) string {
		b := base
		b[3] += off
		return netip.AddrFrom4(b).String()
	}
	fmt.Fprintf(w, "Starting slirp\n")
	fmt.Fprintf(w, "* MTU:             %d\n", cfg.mtu)
	fmt.Fprintf(w, "* Network:         %s\n", cfg.cidr.Addr())
	fmt.Fprintf(w, "* Netmask:         %s\n", mask)
	fmt.Fprintf(w, "* Gateway:         %s\n", a.gateway)
	fmt.Fprintf(w, "* DNS:             %s\n", a.dns)
	fmt.Fprintf(w, "* DHCP begin:      %s\n", dhcp(15))
	fmt.Fprintf(w, "* DHCP end:        %s\n", dhcp(30))
	fmt.Fprintf(w, "* Recommended IP:  %s\n", a.guest)
	if cfg.apiSocket != "" {
		fmt.Fprintf(w, "* API Socket:      %s\n", cfg.apiSocket)
	}
	if n.OutboundAddr4.IsValid() {
		fmt.Fprintf(w, "* Outbound IPv4:    %s\n", n.OutboundAddr4)
	}
	if n.OutboundAddr6.IsValid() {
		fmt.Fprintf(w, "* Outbound IPv6:    %s\n", n.OutboundAddr6)
	}
	if cfg.macAddress != "" {
		fmt.Fprintf(w, "* MAC address:     %s\n", cfg.macAddress)
	}
	if !cfg.disableHostLoopback {
		fmt.Fprintf(w, "WARNING: 127.0.0.1:* on the host is accessible as %s (set --disable-host-loopback to prohibit connecting to 127.0.0.1:*)\n", a.gateway)
	}
}

// outboundAddr accepts an address of the wanted family or the name of an
// interface that has one.
func outboundAddr(s string, v6 bool) (netip.Addr, error) {
	if s == "" {
		return netip.Addr{}, nil
	}
	flag := "--outbound-addr"
	if v6 {
		flag = "--outbound-addr6"
	}
	if a, err := netip.ParseAddr(s); err == nil {
		if a.Is6() != v6 {
			return netip.Addr{}, fmt.Errorf("%s %s: wrong address family", flag, s)
		}
		return a, nil
	}
	ifi, err := net.InterfaceByName(s)
	if err != nil {
		return netip.Addr{}, fmt.Errorf("%s %s: neither an address nor an interface: %w", flag, s, err)
	}
	addrs, err := ifi.Addrs()
	if err != nil {
		return netip.Addr{}, fmt.Errorf("%s %s: %w", flag, s, err)
	}
	for _, ad := range addrs {
		ipn, ok := ad.(*net.IPNet)
		if !ok {
			continue
		}
		a, ok := netip.AddrFromSlice(ipn.IP)
		if !ok {
			continue
		}
		a = a.Unmap()
		if a.Is6() == v6 && !a.IsLinkLocalUnicast() {
			return a, nil
		}
	}
	return netip.Addr{}, fmt.Errorf("%s %s: interface has no usable address of that family", flag, s)
}
