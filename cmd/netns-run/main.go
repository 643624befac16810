// Command netns-run runs a command in new user and network namespaces with
// userspace networking: the unprivileged way to get a networked sandbox.
package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"runtime"

	"github.com/spf13/pflag"

	"github.com/netns-run/netns-run/cmd/internal/cli"
	"github.com/netns-run/netns-run/launcher"
	"github.com/netns-run/netns-run/launcher/safefs"
	"github.com/netns-run/netns-run/netstack"
	"github.com/netns-run/netns-run/netstack/engine"
)

// version is set at build time with -ldflags "-X main.version=...".
var version = "dev"

// Exit codes for failures of netns-run itself, as env(1) and chroot(1) use.
const exitSetupFailed = 125

const usageText = `Usage: netns-run [OPTION]... -- COMMAND [ARG]...
       netns-run --detach --state-dir DIR [OPTION]... [-- COMMAND [ARG]...]
       netns-run --join DIR -- COMMAND [ARG]...
       netns-run --stop DIR
       netns-run stats [--json] SOCKET|DIR
Run COMMAND in new user, network, mount and UTS namespaces with userspace
networking, without root.

Inside, COMMAND is root (mapped to your own uid) and sees tap0 with
10.0.2.100/24 and fd00::100/64, gateway 10.0.2.2 / fd00::2 (the host's
127.0.0.1 / ::1 unless --disable-host-loopback) and DNS at 10.0.2.3 /
fd00::3 (forwarded to the host's resolvers). /etc/resolv.conf is replaced
inside only. Ports can be published from the host with -p.

Options:
`

const usageTail = `
Exit status:
  COMMAND's own status, or 128+N if a signal N killed it
  125  netns-run itself failed (the message names the cause and the fix)
  126  COMMAND was found but could not be executed
  127  COMMAND was not found

Signals: SIGINT, SIGTERM and SIGHUP are forwarded to COMMAND. On a terminal
COMMAND runs in the foreground process group (job control works).

Environment:
  TMPDIR  where the namespace's resolv.conf is staged before it is mounted
  PATH    searched for COMMAND inside the namespace

Examples:
  netns-run -- ip addr
  netns-run --mtu 1500 -- curl http://10.0.2.2:8080/
  netns-run --disable-host-loopback -- sh
  netns-run -p 8080:80 -p 127.0.0.1:5353:53/udp -- ./server
  netns-run -p 8080:80 --port-driver=netstack -- nginx   # nginx logs real client IPs
  netns-run --api-socket /tmp/nr.sock --pcap /tmp/guest.pcap -- ./app
  netns-run --allow github.com:443 --allow '**.pypi.org:443' \
            --allow files.pythonhosted.org:443 -- pip install requests
  netns-run --egress-audit -- make test      # then: --policy with what it printed
  netns-run stats /tmp/nr.sock

Troubleshooting (/dev/net/tun permissions, user namespaces, ping,
subordinate ids): see the README's "Troubleshooting" section.
`

type options struct {
	detach              bool
	stateDir            string
	join                string
	stop                string
	netnsPath           string
	mapAuto             bool
	mapUser, mapGroup   int
	pid                 bool
	hostname            string
	copyUp              []string
	publish             []string
	portDriver          string
	apiSocket           string
	mtu                 int
	disableHostLoopback bool
	disableIPv6         bool
	dnsUpstreams        []string
	debug               bool
	logFormat           string
	pcap                string
	pcapMaxSize         int64
	noSandbox           bool
	userspaceTCP        bool
	egress              cli.EgressFlags
	version             bool
	help                bool
}

func main() {
	if launcher.IsChild() {
		launcher.RunChild()
	}
	cli.SetProcs()
	if launcher.IsEngine() {
		var spec engine.Spec
		files, err := launcher.EngineSetup(&spec)
		os.Exit(engine.Main(files, spec, err, cli.NewLogger(os.Stderr, spec.Debug, spec.LogFormat)))
	}
	if len(os.Args) > 1 && os.Args[1] == "stats" {
		os.Exit(runStats(os.Args[2:], os.Stdout, os.Stderr))
	}
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

func run(args []string, stdout, stderr io.Writer) int {
	opts, cmdArgs, err := parseFlags(args, stdout)
	if errors.Is(err, pflag.ErrHelp) {
		return 0
	}
	if err != nil {
		fmt.Fprintf(stderr, "netns-run: %v\nTry 'netns-run --help' for more information.\n", err)
		return exitSetupFailed
	}
	if opts.version {
		fmt.Fprintf(stdout, "netns-run version %s\n", version)
		return 0
	}
	switch {
	case opts.stop != "":
		return stopState(opts.stop, stderr)
	case opts.join != "":
		return joinState(opts.join, cmdArgs, opts, stderr)
	case opts.detach && os.Getenv(daemonEnv) == "":
		return startDaemon(opts.stateDir, stderr)
	}
	var ready *daemonReady
	var stateDir *safefs.Dir
	if opts.detach {
		// The daemon: what it starts is not a daemon (a nested --detach
		// must start its own).
		os.Unsetenv(daemonEnv)
		ready = newDaemonReady()
		defer ready.report("exited before its command ran")
		if stateDir, err = safefs.OpenDir(opts.stateDir, false); err != nil {
			ready.report(err.Error())
			return exitSetupFailed
		}
		defer stateDir.Close()
		// Held until exit: a second daemon started on the same
		// directory at the same moment stops here, before it could
		// overwrite or remove this one's records.
		if err := stateDir.TryLock(); err != nil {
			ready.report(err.Error() + ": another netns-run is starting or serving there")
			return exitSetupFailed
		}
		defer removeState(stateDir, false)
		if opts.apiSocket == "" {
			opts.apiSocket = filepath.Join(opts.stateDir, "api.sock")
		}
	}
	var netnsLink *safefs.Created
	defer func() {
		if err := netnsLink.Remove(); err != nil {
			fmt.Fprintf(stderr, "netns-run: --netns: %v\n", err)
		}
	}()
	log := newLoggerFor(opts, stderr)

	netCfg := netstack.DefaultConfig()
	netCfg.MTU = uint32(opts.mtu)
	netCfg.DisableHostLoopback = opts.disableHostLoopback
	netCfg.Logger = log
	netCfg.DNSUpstreams, err = netstack.DNSUpstreams(opts.dnsUpstreams, "/etc/resolv.conf")
	if err != nil {
		fmt.Fprintf(stderr, "netns-run: %v\n", err)
		return exitSetupFailed
	}
	var pcap *os.File
	if opts.pcap != "" {
		capture, f, err := netstack.OpenCapture(opts.pcap, opts.pcapMaxSize, log)
		if err != nil {
			fmt.Fprintf(stderr, "netns-run: %v\n", err)
			return exitSetupFailed
		}
		defer f.Close()
		netCfg.Capture, pcap = capture, f
	}
	rules, err := parsePublish(opts.publish)
	if err != nil {
		fmt.Fprintf(stderr, "netns-run: %v\n", err)
		return exitSetupFailed
	}
	egressLog, err := setEgress(&netCfg, opts.egress, stderr)
	if err != nil {
		fmt.Fprintf(stderr, "netns-run: %v\n", err)
		return exitSetupFailed
	}
	if egressLog != nil {
		defer egressLog.Close()
	}
	if len(netCfg.DNSUpstreams) == 0 {
		log.Warn("no nameserver found in /etc/resolv.conf; DNS inside will not resolve (use --dns-upstream)")
	}

	guest := launcher.GuestConfig{
		TapName:    "tap0",
		MTU:        opts.mtu,
		TxQueueLen: 10000,
		Offload:    true,
		// One queue per P: each has its own reader.
		Queues:     runtime.GOMAXPROCS(0),
		Address:    netip.PrefixFrom(netstack.DefaultGuestAddr, netCfg.Network.Bits()),
		Gateway:    netCfg.Gateway,
		Nameserver: netCfg.DNS,
		// A capture must see every segment, so the stack keeps them.
		TCPListener: !opts.userspaceTCP && opts.pcap == "",
	}
	if !opts.disableIPv6 && hostHasIPv6() {
		netCfg.IPv6 = true
		guest.Address6 = netip.PrefixFrom(netstack.DefaultGuestAddr6, netCfg.Network6.Bits())
		guest.Gateway6 = netCfg.Gateway6
		guest.Nameserver6 = netCfg.DNS6
	}
	var eng *engine.Client
	if !opts.noSandbox {
		// Started now, it gets going while the namespace is set up. Its
		// death signal follows this thread, which must not end first.
		runtime.LockOSThread()
		spec := engine.Spec{Net: netCfg, PcapMaxSize: opts.pcapMaxSize, Debug: opts.debug, LogFormat: opts.logFormat}
		spec.EgressLogStderr = opts.egress.Log == "-"
		if eng, err = engine.Start(spec, pcap, egressLog, log); err != nil {
			fmt.Fprintf(stderr, "netns-run: %v\n", err)
			return exitSetupFailed
		}
		defer eng.Close()
	}
	code, err := launcher.Run(context.Background(), launcher.Options{
		Args:     cmdArgs,
		Guest:    guest,
		Logger:   log,
		SubIDs:   opts.mapAuto,
		MapUser:  opts.mapUser,
		MapGroup: opts.mapGroup,
		PID:      opts.pid,
		Hostname: opts.hostname,
		CopyUp:   opts.copyUp,
		// A detached namespace is up once its command runs: --detach
		// -- nosuchcmd fails, instead of returning 0.
		Started: func() { ready.report("ok") },
		Network: func(ctx context.Context, ns launcher.Namespace) (launcher.Network, error) {
			host, err := startHostSide(ctx, ns, netCfg, eng, opts, rules, log)
			if err != nil {
				return nil, err
			}
			if opts.egress.Audit {
				host.suggestTo = stderr
			}
			if opts.netnsPath != "" {
				// A symlink: unprivileged users cannot bind-mount into
				// the host's mount namespace.
				if netnsLink, err = safefs.Symlink(ns.Target().NetNS, opts.netnsPath); err != nil {
					host.Close()
					return nil, fmt.Errorf("--netns: %w", err)
				}
			}
			if ready != nil {
				if err = writeState(stateDir, ns); err != nil {
					host.Close()
					return nil, err
				}
			}
			return host, nil
		},
	})
	if err != nil {
		fmt.Fprintf(stderr, "netns-run: %v\n", err)
		ready.report(err.Error())
		return exitSetupFailed
	}
	return code
}

// setEgress puts the egress policy of the flags into netCfg and returns
// the decision log file to hand to the engine (nil: none, or stderr).
func setEgress(netCfg *netstack.Config, flags cli.EgressFlags, stderr io.Writer) (*os.File, error) {
	cfg, err := flags.Config()
	if err != nil {
		return nil, err
	}
	f, toStderr, err := flags.OpenLog()
	if err != nil {
		return nil, err
	}
	// With --no-sandbox the stack runs here and uses these writers; the
	// engine sets its own from the descriptor.
	cli.SetEgressOutput(&cfg, f, toStderr, stderr)
	netCfg.Egress = cfg
	return f, nil
}

func newLoggerFor(opts options, w io.Writer) *slog.Logger {
	return cli.NewLogger(w, opts.debug, opts.logFormat)
}

// hostHasIPv6 reports whether the host (our network namespace) has IPv6
// at all; without it, offering IPv6 inside would only make programs try
// addresses that cannot work.
func hostHasIPv6() bool {
	b, err := os.ReadFile("/proc/net/if_inet6")
	return err == nil && len(b) > 0
}

func parseFlags(args []string, stdout io.Writer) (options, []string, error) {
	var o options
	fs := pflag.NewFlagSet("netns-run", pflag.ContinueOnError)
	// Errors are reported once, by run; help is printed on request only.
	fs.SetOutput(io.Discard)
	fs.Usage = func() {}
	// Everything from the first non-flag word on belongs to COMMAND.
	fs.SetInterspersed(false)
	fs.BoolVar(&o.detach, "detach", false, "start the namespace (running COMMAND, or nothing) in the background and return once it is up; needs --state-dir")
	fs.StringVar(&o.stateDir, "state-dir", "", "with --detach: directory for the namespace's state (pid, netns, api.sock, log)")
	fs.StringVar(&o.join, "join", "", "run COMMAND inside the detached namespace whose state directory is DIR")
	fs.StringVar(&o.netnsPath, "netns", "", "make PATH a symlink to the namespace's network namespace while it runs (for tools that take a netns path, e.g. usernet --netns-type=path)")
	fs.StringVar(&o.stop, "stop", "", "stop the detached namespace whose state directory is DIR")
	fs.BoolVar(&o.mapAuto, "map-auto", false, "also map your subordinate ids from /etc/subuid and /etc/subgid (with newuidmap/newgidmap), so apt and chown work inside")
	fs.BoolVar(&o.mapAuto, "subids", false, "same as --map-auto")
	fs.IntVar(&o.mapUser, "map-user", 0, "the uid you have inside")
	fs.IntVar(&o.mapGroup, "map-group", 0, "the gid you have inside")
	fs.BoolVar(&o.pid, "pid", false, "new PID namespace: a small init is PID 1 (reaps, forwards signals), /proc is remounted")
	fs.BoolVar(&o.pid, "mount-proc", false, "same as --pid (a fresh /proc needs its own PID namespace)")
	fs.StringVar(&o.hostname, "hostname", "", "hostname inside (UTS namespace)")
	fs.StringArrayVar(&o.copyUp, "copy-up", nil, "make DIR writable inside with a tmpfs copy (repeatable; e.g. /etc), leaving the host's untouched")
	fs.StringArrayVarP(&o.publish, "publish", "p", nil, "publish a port: [HOSTIP:]HOSTPORT[-END]:GUESTPORT[-END][/tcp|/udp] (repeatable; IPv6 HOSTIP in brackets; default: all addresses), or auto: every port the command listens on")
	fs.StringVar(&o.portDriver, "port-driver", driverBuiltin, "how published ports reach the guest: builtin (kernel sockets, fastest; the guest sees connections from 127.0.0.1) or netstack (the guest sees the real client address; through the guest's kernel when its rules could be installed, else through the userspace stack)")
	fs.StringVar(&o.apiSocket, "api-socket", "", "serve slirp4netns's JSON API (add_hostfwd, list_hostfwd, remove_hostfwd) on this Unix socket")
	fs.IntVar(&o.mtu, "mtu", netstack.DefaultMTU, "MTU of the namespace's tap0 (68-65521)")
	fs.BoolVar(&o.disableHostLoopback, "disable-host-loopback", false, "block the host's loopback: 10.0.2.2, fd00::2, 127.0.0.0/8 and ::1 answer network unreachable")
	fs.BoolVar(&o.disableIPv6, "disable-ipv6", false, "no IPv6 inside (default: fd00::100/64, gateway fd00::2, DNS fd00::3 when the host has IPv6)")
	fs.StringArrayVar(&o.dnsUpstreams, "dns-upstream", nil, "DNS server ADDR[:PORT] the forwarder at 10.0.2.3 asks (repeatable; default: nameservers in /etc/resolv.conf)")
	fs.BoolVar(&o.debug, "debug", false, "log setup steps and every flow (4-tuple, duration, bytes) to stderr")
	fs.StringVar(&o.logFormat, "log-format", "text", "log format: text or json")
	fs.StringVar(&o.pcap, "pcap", "", "capture the guest's frames to this pcap file (tcpdump -r / tshark -r)")
	fs.Int64Var(&o.pcapMaxSize, "pcap-max-size", 1<<30, "stop capturing once the file reaches this many bytes (0: no limit)")
	fs.StringArrayVar(&o.egress.Allow, "allow", nil, "allow egress to RULE: HOST[:PORTS][/tcp|/udp|/icmp]; HOST is a name, *.name (names below it), **.name (it and below), an address or CIDR ([IPv6] in brackets); PORTS 443, 80,443 or 8000-8099. Once one rule allows, everything else is denied (repeatable)")
	fs.StringArrayVar(&o.egress.Deny, "deny", nil, "deny egress to RULE (same syntax; a matching deny wins over every allow; repeatable)")
	fs.StringVar(&o.egress.Policy, "policy", "", "read egress rules from FILE: one \"allow RULE\" or \"deny RULE\" per line, # comments")
	fs.BoolVar(&o.egress.Audit, "egress-audit", false, "apply the egress rules without blocking: report what would be denied, and print a suggested allow list at exit")
	fs.StringVar(&o.egress.Log, "egress-log", "", "write one JSON line per egress decision to FILE (- for stderr); without it, denials are summarized on stderr")
	fs.BoolVar(&o.userspaceTCP, "userspace-tcp", false, "end the command's outbound TCP connections in the userspace stack instead of the namespace's own kernel (always so with --pcap)")
	fs.BoolVar(&o.noSandbox, "no-sandbox", false, "run the packet engine in netns-run's own process, unconfined, instead of its sandbox (for debugging)")
	fs.BoolVarP(&o.help, "help", "h", false, "show this help and exit")
	fs.BoolVar(&o.version, "version", false, "print the version and exit")
	if err := fs.Parse(args); err != nil {
		return o, nil, err
	}
	if o.help {
		fmt.Fprint(stdout, usageText+fs.FlagUsages()+usageTail)
		return o, nil, pflag.ErrHelp
	}
	if o.version {
		return o, nil, nil
	}
	if o.mapUser < 0 || o.mapGroup < 0 {
		return o, nil, errors.New("--map-user and --map-group must not be negative")
	}
	if len(o.hostname) > 64 {
		return o, nil, fmt.Errorf("--hostname %q: longer than 64 bytes", o.hostname)
	}
	if o.logFormat != "text" && o.logFormat != "json" {
		return o, nil, fmt.Errorf("--log-format %q: must be text or json", o.logFormat)
	}
	if o.pcapMaxSize < 0 {
		return o, nil, fmt.Errorf("--pcap-max-size %d: must not be negative", o.pcapMaxSize)
	}
	if o.portDriver != driverBuiltin && o.portDriver != driverNetstack {
		return o, nil, fmt.Errorf("--port-driver %q: must be builtin or netstack", o.portDriver)
	}
	if o.mtu < 68 || o.mtu > 65521 {
		return o, nil, fmt.Errorf("--mtu %d: must be between 68 and 65521", o.mtu)
	}
	rest := fs.Args()
	if o.detach && o.stateDir == "" {
		return o, nil, errors.New("--detach needs --state-dir DIR")
	}
	if o.stop != "" {
		return o, nil, nil
	}
	if o.detach && len(rest) == 0 {
		// Nothing to run: hold the namespace open until --stop.
		rest = []string{"sleep", "infinity"}
	}
	if len(rest) == 0 {
		return o, nil, errors.New("missing COMMAND (usage: netns-run [OPTION]... -- COMMAND [ARG]...)")
	}
	return o, rest, nil
}
