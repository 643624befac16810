package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/netip"

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
	stack  *netstack.Stack
	helper *launcher.PortHelper
	ports  *portfwd.PortMap
	api    *portfwd.APISocket
	apiEnd chan struct{}
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
	// The stack keeps client addresses: IPv6 clients go to the guest's
	// IPv6 address, where it can see them as they are.
	var guestAddr6 netip.Addr
	if netCfg.IPv6 {
		guestAddr6 = netstack.DefaultGuestAddr6
	}
	if opts.portDriver == driverBuiltin && (len(rules) > 0 || opts.apiSocket != "") {
		if h.helper, err = launcher.StartPortHelper(ns.Target()); err != nil {
			h.Close()
			return nil, err
		}
		guest = portfwd.NewBuiltin(ctx, h.helper)
		// The helper dials from inside the namespace: its loopback
		// reaches servers bound to 127.0.0.1 as well as to any address.
		guestAddr, guestAddr6 = netip.MustParseAddr("127.0.0.1"), netip.Addr{}
	}
	h.ports = portfwd.New(guest, log)
	for _, r := range rules {
		r.GuestAddr, r.GuestAddr6 = guestAddr, guestAddr6
		if _, err := h.ports.Add(r); err != nil {
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

// parsePublish turns the -p specs into rules.
func parsePublish(specs []string) ([]portfwd.Rule, error) {
	var rules []portfwd.Rule
	for _, s := range specs {
		r, err := portfwd.ParseSpec(s)
		if err != nil {
			return nil, fmt.Errorf("-p: %w", err)
		}
		rules = append(rules, r...)
	}
	return rules, nil
}
