package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/netip"
	"slices"

	"github.com/netns-run/netns-run/cmd/internal/cli"
	"github.com/netns-run/netns-run/launcher"
	"github.com/netns-run/netns-run/netstack"
	"github.com/netns-run/netns-run/netstack/engine"
	"github.com/netns-run/netns-run/netstack/ktcpnat"
	"github.com/netns-run/netns-run/portfwd"
)

// Port drivers of -p.
const (
	driverBuiltin  = "builtin"
	driverNetstack = "netstack"
)

// hostSide is everything netns-run runs for one namespace: the packet
// engine, the published ports and the API socket.
type hostSide struct {
	cancel context.CancelFunc
	engine packetEngine
	// stopAuto ends --publish auto's followers.
	stopAuto func()
	helper   *launcher.PortHelper
	// kernel takes published ports' connections through the guest's
	// kernel (nil: not used).
	kernel *portfwd.KernelPath
	ports  *portfwd.PortMap
	api    *portfwd.APISocket
	apiEnd chan struct{}
	// suggestTo, in egress audit mode, gets the suggested allow list
	// when the namespace ends.
	suggestTo io.Writer
}

// packetEngine is the userspace stack: in its own sandboxed process
// (engine.Client), or with --no-sandbox in this one (localEngine).
type packetEngine interface {
	portfwd.Guest
	portfwd.Egress
	Info() any
	Stats() any
	Failed() <-chan error
	Close() error
}

// localEngine is the stack in netns-run's own process.
type localEngine struct{ *netstack.Stack }

func (l localEngine) Info() any            { return l.Stack.Info() }
func (l localEngine) Stats() any           { return l.Stack.Stats() }
func (l localEngine) Failed() <-chan error { return nil }

// startEngine starts the stack on ns's TAP: in eng, the sandboxed engine
// started earlier, or (nil: --no-sandbox) in this process.
func startEngine(ctx context.Context, ns launcher.Namespace, netCfg netstack.Config, eng *engine.Client) (packetEngine, error) {
	if eng == nil {
		netCfg.KernelTCP, netCfg.KernelTCPNAT = ns.TCPListener, ns.TCPNAT
		s, err := netstack.New(ctx, netCfg, ns.Tap)
		if err != nil {
			return nil, err
		}
		return localEngine{s}, nil
	}
	// The engine's sandbox may not change the guest's nftables: this
	// process does it for the engine.
	nat := ns.TCPNAT
	if nat != nil {
		var err error
		if nat, err = ktcpnat.ServeInBackground(nat, portfwd.SocketPort(ns.TCPListener)); err != nil {
			nat = nil
		}
	}
	if err := eng.Attach(ns.Tap, ns.TCPListener, nat); err != nil {
		return nil, err
	}
	return eng, nil
}

// startHostSide is netns-run's launcher.NetworkFunc.
func startHostSide(ctx context.Context, ns launcher.Namespace, netCfg netstack.Config, eng *engine.Client, opts options, rules []portfwd.Rule, log *slog.Logger) (*hostSide, error) {
	ctx, cancel := context.WithCancel(ctx)
	h := &hostSide{cancel: cancel}
	var err error
	// The kernel TCP path's listener is ours, not a port to publish.
	ownPort := portfwd.SocketPort(ns.TCPListener)
	// With the kernel TCP path's rules in the guest, published ports can
	// take it too (portfwd.KernelPath).
	kernelInbound := ns.TCPListener != nil && ns.TCPNAT != nil
	if h.engine, err = startEngine(ctx, ns, netCfg, eng); err != nil {
		cancel()
		return nil, err
	}
	var guest portfwd.Guest = h.engine
	guestAddr := netstack.DefaultGuestAddr
	// The stack keeps client addresses: IPv6 clients go to the guest's
	// IPv6 address, where it can see them as they are.
	var guestAddr6 netip.Addr
	if netCfg.IPv6 {
		guestAddr6 = netstack.DefaultGuestAddr6
	}
	auto := slices.Contains(opts.publish, publishAuto)
	if auto || opts.portDriver == driverBuiltin && (len(rules) > 0 || opts.apiSocket != "") {
		if h.helper, err = launcher.StartPortHelper(ns.Target()); err != nil {
			h.Close()
			return nil, err
		}
	}
	if h.helper != nil && opts.portDriver == driverBuiltin {
		guest = portfwd.NewBuiltin(ctx, h.helper)
		// The helper dials from inside the namespace: its loopback
		// reaches servers bound to 127.0.0.1 as well as to any address.
		guestAddr, guestAddr6 = netip.MustParseAddr("127.0.0.1"), netip.Addr{}
	}
	if opts.portDriver == driverNetstack && kernelInbound {
		if h.helper == nil {
			h.helper = launcher.NewPortHelper(ns.Target())
		}
		h.kernel = portfwd.NewKernelPath(ctx, h.helper, h.engine, netCfg.ClientSource, log)
		guest = h.kernel
	}
	h.ports = portfwd.New(guest, log)
	for _, r := range rules {
		r.GuestAddr, r.GuestAddr6 = guestAddr, guestAddr6
		if _, err := h.ports.Add(r); err != nil {
			h.Close()
			return nil, err
		}
	}
	if auto {
		if h.stopAuto, err = followListeners(ctx, h.helper, h.ports, guestAddr, ownPort, log); err != nil {
			h.Close()
			return nil, err
		}
	}
	if opts.apiSocket != "" {
		if h.api, err = portfwd.ListenAPISocket(opts.apiSocket); err != nil {
			h.Close()
			return nil, err
		}
		guestNS, _, _, err := portfwd.GuestUserNS(ns.Target().UserNS, "")
		if err != nil {
			h.Close()
			return nil, err
		}
		api := portfwd.NewAPI(h.ports, guestAddr, log)
		api.SetDefaultGuest6(guestAddr6)
		// We made the guest's user namespace: every process in it is
		// one we may inspect.
		api.RefuseGuest(guestNS, true)
		api.AllowIPv6()
		api.SetReporter(h.engine.Info, cli.StatsWithPublished(h.engine.Stats, h.kernel))
		api.SetEgress(h.engine)
		h.apiEnd = make(chan struct{})
		go func() {
			defer close(h.apiEnd)
			api.Serve(ctx, h.api.Listener)
		}()
	}
	return h, nil
}

// Failed implements launcher.Network.
func (h *hostSide) Failed() <-chan error { return h.engine.Failed() }

// Close stops the API, the flows, the engine and the port helper.
func (h *hostSide) Close() error {
	h.cancel()
	var errs []error
	if h.apiEnd != nil {
		<-h.apiEnd
	}
	if h.stopAuto != nil {
		h.stopAuto()
	}
	if h.api != nil {
		errs = append(errs, h.api.Close())
	}
	if h.engine != nil && h.suggestTo != nil {
		policy, err := h.engine.EgressPolicy()
		cli.PrintSuggestion(h.suggestTo, policy, err)
	}
	if h.engine != nil {
		errs = append(errs, h.engine.Close())
	}
	if h.ports != nil {
		errs = append(errs, h.ports.Close())
	}
	if h.helper != nil {
		errs = append(errs, h.helper.Close())
	}
	return errors.Join(errs...)
}

// publishAuto is -p's value that follows the guest's listening sockets.
const publishAuto = "auto"

// followListeners publishes every TCP and UDP port the guest listens on,
// on all of the host's addresses, while it listens (checked every second,
// as pasta's -t auto does). stop ends it.
func followListeners(ctx context.Context, h *launcher.PortHelper, ports *portfwd.PortMap, guestAddr netip.Addr, ownPort uint16, log *slog.Logger) (stop func(), err error) {
	var followers []*portfwd.Follower
	var scans []portfwd.ProcNet
	closeScans := func() {
		for _, s := range scans {
			s.Close()
		}
	}
	for _, proto := range []string{"tcp", "udp"} {
		scan, err := portfwd.OpenProcNet(h.OpenProcNet, proto)
		if err != nil {
			closeScans()
			return nil, err
		}
		scan.Own = ownPort
		scans = append(scans, scan)
		followers = append(followers, &portfwd.Follower{Map: ports, Proto: proto, Scan: scan.Scan, Log: log,
			Rules: func(port uint16) []portfwd.Rule {
				return []portfwd.Rule{{Proto: proto, HostPort: port, GuestAddr: guestAddr, GuestPort: port}}
			}})
	}
	stopFollowers, err := portfwd.RunFollowers(ctx, followers)
	if err != nil {
		closeScans()
		return nil, err
	}
	return func() {
		stopFollowers()
		closeScans()
	}, nil
}

// parsePublish turns the -p specs into rules (auto is followListeners').
func parsePublish(specs []string) ([]portfwd.Rule, error) {
	var rules []portfwd.Rule
	for _, s := range specs {
		if s == publishAuto {
			continue
		}
		r, err := portfwd.ParseSpec(s)
		if err != nil {
			return nil, fmt.Errorf("-p: %w", err)
		}
		rules = append(rules, r...)
	}
	return rules, nil
}
