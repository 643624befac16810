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
	"time"

	"golang.org/x/sys/unix"

	"github.com/netns-run/netns-run/launcher"
	"github.com/netns-run/netns-run/netstack"
	"github.com/netns-run/netns-run/portfwd"
)

var version = "dev"

func main() {
	if launcher.IsChild() {
		launcher.RunChild()
	}
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

func run(args []string, stdout, stderr io.Writer) int {
	cfg, err := parseArgs(args, stdout)
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

func serve(cfg *config, stdout, stderr io.Writer) error {
	level := slog.LevelWarn
	if cfg.debug {
		level = slog.LevelDebug
	}
	log := slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: level}))
	ctx, cancel := signal.NotifyContext(context.Background(), unix.SIGTERM, unix.SIGINT)
	defer cancel()

	addrs := addressesOf(cfg.cidr)
	netCfg := netstack.DefaultConfig()
	netCfg.MTU = uint32(cfg.mtu)
	netCfg.Network = cfg.cidr
	netCfg.Gateway, netCfg.DNS = addrs.gateway, addrs.dns
	netCfg.GatewayMAC = net.HardwareAddr{0x52, 0x55, addrs.gateway.As4()[0], addrs.gateway.As4()[1], addrs.gateway.As4()[2], addrs.gateway.As4()[3]}
	netCfg.DisableHostLoopback = cfg.disableHostLoopback
	netCfg.DisableDNS = cfg.disableDNS
	netCfg.Logger = log
	var err error
	if netCfg.OutboundAddr4, err = outboundAddr(cfg.outbound4, false); err != nil {
		return err
	}
	if netCfg.OutboundAddr6, err = outboundAddr(cfg.outbound6, true); err != nil {
		return err
	}
	if netCfg.DNSUpstreams, err = netstack.DNSUpstreams(cfg.dnsUpstreams, "/etc/resolv.conf"); err != nil {
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
	guest := launcher.GuestConfig{
		TapName:    cfg.tapName,
		MTU:        cfg.mtu,
		TxQueueLen: 10000,
		Address:    netip.PrefixFrom(addrs.guest, cfg.cidr.Bits()),
		Gateway:    addrs.gateway,
		Nameserver: addrs.dns,
		MAC:        cfg.macAddress,
	}
	dev, _, err := launcher.OpenTapIn(ctx, target, guest, cfg.configure)
	if err != nil {
		return err
	}
	printBanner(stdout, cfg, addrs, netCfg)

	stack, err := netstack.New(ctx, netCfg, dev)
	if err != nil {
		return err
	}
	ports := portfwd.New(stack, log)
	defer func() {
		// The stack first: closing it ends the flows the port map
		// started, which the port map then waits for.
		stack.Close()
		ports.Close()
	}()

	if cfg.apiSocket != "" {
		ln, err := portfwd.ListenUnix(cfg.apiSocket)
		if err != nil {
			return err
		}
		defer os.Remove(cfg.apiSocket)
		api := portfwd.NewAPI(ports, addrs.guest, log)
		done := make(chan struct{})
		go func() {
			defer close(done)
			api.Serve(ctx, ln)
		}()
		defer func() { cancel(); <-done }()
	}
	if cfg.readyFD >= 0 {
		if err := launcher.NotifyReady(cfg.readyFD); err != nil {
			return err
		}
	}
	if cfg.exitFD >= 0 {
		// The watcher may outlive serve by a moment; exiting the
		// process ends it.
		go func() {
			if err := launcher.WaitHangup(cfg.exitFD); err != nil {
				log.Warn("exit fd", "err", err)
			}
			fmt.Fprintln(stderr, "exitfd event")
			cancel()
		}()
	}
	<-ctx.Done()
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
