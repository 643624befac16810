package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/netip"
	"os"
	"os/signal"
	"path/filepath"
	"time"

	"golang.org/x/sys/unix"

	"github.com/netns-run/netns-run/cmd/internal/cli"
	"github.com/netns-run/netns-run/launcher"
	"github.com/netns-run/netns-run/launcher/safefs"
	"github.com/netns-run/netns-run/netstack"
	"github.com/netns-run/netns-run/portfwd"
)

// pastaMode reports whether we were started to speak pasta's command line:
// under the name pasta, or as usernet --pasta-compat. It returns pasta's
// arguments.
func pastaMode(args []string) (bool, []string) {
	if filepath.Base(os.Args[0]) == "pasta" {
		return true, args
	}
	if len(args) > 0 && args[0] == "--pasta-compat" {
		return true, args[1:]
	}
	return false, nil
}

// runPasta is usernet in pasta's clothes. Unless -f, the process that the
// caller started exits once a background copy of itself (the daemon) has
// everything set up.
func runPasta(args []string, stdout, stderr io.Writer) int {
	report := launcher.DaemonCopy()
	c, outcome, err := parsePastaArgs(args)
	var ge *getoptError
	switch {
	case errors.As(err, &ge):
		fmt.Fprintf(stderr, "%s: %s\n", os.Args[0], ge.msg)
		fmt.Fprintf(stderr, "Try '%s --help' for more information.\n", os.Args[0])
		return 1
	case err != nil:
		fmt.Fprintf(stderr, "%s: %v\n", os.Args[0], err)
		return 1
	case outcome == pastaHelp:
		fmt.Fprint(stdout, pastaHelpText)
		return 0
	case outcome == pastaVersion:
		fmt.Fprintf(stdout, pastaVersionText, version)
		return 0
	}
	if !c.foreground && report == nil {
		if err := launcher.StartDaemon(os.Args[1:]); err != nil {
			fmt.Fprintf(stderr, "%s: %v\n", os.Args[0], err)
			return 1
		}
		return 0
	}
	if err := servePasta(c, report, stderr); err != nil {
		if report != nil {
			report.Fail(err)
		}
		fmt.Fprintf(stderr, "%s: %v\n", os.Args[0], err)
		return 1
	}
	return 0
}

// pastaHelper is everything the pasta mode runs.
type pastaHelper struct {
	c      *pastaConfig
	log    *slog.Logger
	target launcher.Target
	net    pastaNet
	stack  *netstack.Stack
	ports  *launcher.PortHelper
	// ownTCPPort is the kernel TCP path's listener in the namespace
	// (0: none), which -t auto must not publish.
	ownTCPPort uint16
	// kernelInbound: the guest's kernel can take published ports'
	// connections (portfwd.KernelPath), with a port helper started in
	// inboundTarget, whose files stay open.
	kernelInbound bool
	inboundTarget launcher.Target
	fwd           *portfwd.PortMap // host -> namespace (-t, -u)
	rev           *portfwd.PortMap // namespace loopback -> host loopback (-T, -U)
	api           *portfwd.APISocket
	pcap          *os.File
	logf          *os.File
	logTo         io.Writer
	// closers run in reverse order on the way out.
	closers []func()
}

// servePasta sets up, reports ready and serves until SIGTERM, the
// namespace's removal, or the guest's link going away.
func servePasta(c *pastaConfig, report *launcher.DaemonReport, stderr io.Writer) error {
	ctx, cancel := signal.NotifyContext(context.Background(), unix.SIGTERM, unix.SIGINT)
	defer cancel()
	h := &pastaHelper{c: c}
	defer h.close()
	logTo := stderr
	if c.logFile != "" {
		f, err := safefs.CreateFile(c.logFile)
		if err != nil {
			return fmt.Errorf("log file: %w", err)
		}
		h.logf = f
		logTo = f
	}
	h.log = cli.NewLogger(logTo, c.debug, "text")
	h.logTo = logTo
	if err := h.setUp(ctx); err != nil {
		return err
	}
	// Nil channels (not watched) never fire.
	var nsGone, targetExited <-chan struct{}
	if !c.noNetnsQuit {
		var err error
		if nsGone, err = launcher.WatchRemoval(ctx, h.target.NetNS); err != nil {
			return err
		}
		if c.pid > 0 {
			if exited, stop, err := launcher.WatchExit(c.pid); err == nil {
				h.closers = append(h.closers, stop)
				targetExited = exited
			}
		}
	}
	if c.pidFile != "" {
		if err := launcher.WritePIDFile(c.pidFile); err != nil {
			return err
		}
	}
	if report != nil {
		if err := report.Ready(); err != nil {
			return err
		}
	}
	h.log.Debug("pasta mode: serving", "netns", h.target.NetNS, "interface", h.net.guest.TapName)
	select {
	case <-ctx.Done():
	case <-nsGone:
		h.log.Info("the network namespace is gone; exiting")
	case <-targetExited:
		h.log.Info("the target process exited; exiting")
	case <-h.stack.LinkDown():
		h.log.Info("the guest's link went away; exiting")
	}
	if c.egress.Audit {
		policy, err := h.stack.EgressPolicy()
		cli.PrintSuggestion(logTo, policy, err)
	}
	return nil
}

func (h *pastaHelper) close() {
	for i := len(h.closers) - 1; i >= 0; i-- {
		h.closers[i]()
	}
	if h.logf != nil {
		h.logf.Close()
	}
}

// setUp joins the namespace, configures it, starts the stack and binds the
// forwarded ports: when it returns, the namespace is ready for use.
func (h *pastaHelper) setUp(ctx context.Context) error {
	c := h.c
	var err error
	if h.net, err = pastaAddressing(c); err != nil {
		return err
	}
	n := &h.net.stack
	n.Logger = h.log
	if !c.dnsNone {
		var flags []string
		for _, a := range c.dns {
			flags = append(flags, a.String())
		}
		if n.DNSUpstreams, err = netstack.DNSUpstreams(flags, "/etc/resolv.conf"); err != nil {
			return err
		}
	}
	if n.Egress, err = c.egress.Config(); err != nil {
		return err
	}
	egressLog, toStderr, err := c.egress.OpenLog()
	if err != nil {
		return err
	}
	if egressLog != nil {
		h.closers = append(h.closers, func() { egressLog.Close() })
	}
	cli.SetEgressOutput(&n.Egress, egressLog, toStderr, h.logTo)
	h.target = launcher.Target{NetNS: c.netns, UserNS: c.userns}
	if c.pid > 0 {
		t, err := launcher.TargetOfPID(c.pid, 10*time.Second)
		if err != nil {
			return err
		}
		h.target.NetNS = t.NetNS
		if h.target.UserNS == "" && !c.netnsOnly {
			h.target.UserNS = t.UserNS
		}
	}
	guest := h.net.guest
	// A capture must see every segment, so the stack keeps them.
	guest.TCPListener = c.pcap == ""
	link, err := launcher.OpenTapIn(ctx, h.target, guest, true)
	if err != nil {
		return err
	}
	dev := link.Tap
	n.KernelTCP, n.KernelTCPNAT = link.TCPListener, link.TCPNAT
	h.ownTCPPort = portfwd.SocketPort(link.TCPListener)
	if link.TCPListener != nil && link.TCPNAT != nil {
		// The published ports' helper starts with their first
		// connection: from the namespaces as they are now, not from
		// paths that may name others by then.
		if open, err := h.target.Open(); err == nil {
			h.closers = append(h.closers, open.Close)
			h.inboundTarget, h.kernelInbound = open.Target(), true
		}
	}
	if c.pcap != "" {
		if h.pcap, err = safefs.CreateFile(c.pcap); err != nil {
			dev.Close()
			return fmt.Errorf("packet capture: %w", err)
		}
		h.closers = append(h.closers, func() { h.pcap.Close() })
		n.Capture = netstack.NewCaptureWriter(h.pcap, defaultPcapMaxSize, h.log)
	}
	stackCtx, stopStack := context.WithCancel(context.Background())
	if h.stack, err = netstack.New(stackCtx, *n, dev); err != nil {
		stopStack()
		return err
	}
	h.closers = append(h.closers, func() {
		stopStack()
		h.stack.Close()
	})
	if err := h.startPorts(stackCtx); err != nil {
		return err
	}
	return h.startAPI(stackCtx)
}

// startAPI serves usernet's JSON API (stats, info, ports) if asked.
func (h *pastaHelper) startAPI(ctx context.Context) error {
	if h.c.apiSocket == "" {
		return nil
	}
	ns, below, same, err := portfwd.GuestUserNS(h.target.UserNS, h.target.NetNS)
	if err != nil {
		return err
	}
	if h.api, err = portfwd.ListenAPISocket(h.c.apiSocket); err != nil {
		return err
	}
	api := portfwd.NewAPI(h.fwd, h.net.guestAddr(), h.log)
	if !same {
		api.RefuseGuest(ns, below)
	}
	api.AllowIPv6()
	api.SetReporter(func() any { return h.stack.Info() }, func() any { return h.stack.Stats() })
	api.SetEgress(h.stack)
	apiCtx, stop := context.WithCancel(ctx)
	done := make(chan struct{})
	go func() {
		defer close(done)
		api.Serve(apiCtx, h.api.Listener)
	}()
	h.closers = append(h.closers, func() {
		stop()
		<-done
		h.api.Close()
	})
	return nil
}

// guestAddr is where forwarded ports deliver: the guest's IPv4 address, or
// its IPv6 one.
func (p pastaNet) guestAddr() netip.Addr {
	if p.addr4.IsValid() {
		return p.addr4
	}
	return p.addr6
}
