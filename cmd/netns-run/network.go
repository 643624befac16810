package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/netip"
	"slices"

	"github.com/netns-run/netns-run/launcher"
	"github.com/netns-run/netns-run/netstack"
	"github.com/netns-run/netns-run/portfwd"
)

// Port drivers of -p.
const (
	driverBuiltin  = "builtin"
	driverNetstack = "netstack"
)

// hostSide is everything netns-run runs for one namespace: the stack, the
// published ports and the API socket.
type hostSide struct {
	cancel context.CancelFunc
	// stopAuto ends --publish auto's followers.
	stopAuto func()
	stack    *netstack.Stack
	helper   *launcher.PortHelper
	ports    *portfwd.PortMap
	api      *portfwd.APISocket
	apiEnd   chan struct{}
}

// startHostSide is netns-run's launcher.NetworkFunc.
func startHostSide(ctx context.Context, ns launcher.Namespace, netCfg netstack.Config, opts options, rules []portfwd.Rule, log *slog.Logger) (io.Closer, error) {
	ctx, cancel := context.WithCancel(ctx)
	h := &hostSide{cancel: cancel}
	var err error
	if h.stack, err = netstack.New(ctx, netCfg, ns.Tap); err != nil {
		cancel()
		return nil, err
	}
	var guest portfwd.Guest = h.stack
	guestAddr := netstack.DefaultGuestAddr
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
		guestAddr = netip.MustParseAddr("127.0.0.1")
	}
	h.ports = portfwd.New(guest, log)
	for _, r := range rules {
		r.GuestAddr = guestAddr
		if _, err := h.ports.Add(r); err != nil {
			h.Close()
			return nil, err
		}
	}
	if auto {
		if h.stopAuto, err = followListeners(ctx, h.helper, h.ports, guestAddr, log); err != nil {
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
		// We made the guest's user namespace: every process in it is
		// one we may inspect.
		api.RefuseGuest(guestNS, true)
		api.AllowIPv6()
		api.SetReporter(func() any { return h.stack.Info() }, func() any { return h.stack.Stats() })
		h.apiEnd = make(chan struct{})
		go func() {
			defer close(h.apiEnd)
			api.Serve(ctx, h.api.Listener)
		}()
	}
	return h, nil
}

// Close stops the API, the flows, the stack and the port helper.
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
	if h.stack != nil {
		errs = append(errs, h.stack.Close())
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
func followListeners(ctx context.Context, h *launcher.PortHelper, ports *portfwd.PortMap, guestAddr netip.Addr, log *slog.Logger) (stop func(), err error) {
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
