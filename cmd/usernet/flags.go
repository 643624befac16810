package main

import (
	"errors"
	"fmt"
	"io"
	"net/netip"
	"os"
	"regexp"
	"strconv"

	"github.com/spf13/pflag"

	"github.com/netns-run/netns-run/cmd/internal/cli"
)

// helpText is slirp4netns 1.2.0's --help, byte for byte (including the
// TABs after "--netns-type=TYPE " and "--userns-path=PATH"): runtimes probe
// it with substring and grep -w checks. Our own options follow.
const helpText = "Usage: %s [OPTION]... PID|PATH [TAPNAME]\n" +
	"User-mode networking for unprivileged network namespaces.\n" +
	"\n" +
	"-c, --configure          bring up the interface\n" +
	"-e, --exit-fd=FD         specify the FD for terminating slirp4netns\n" +
	"-r, --ready-fd=FD        specify the FD to write to when the network is configured\n" +
	"-m, --mtu=MTU            specify MTU (default=1500, max=65521)\n" +
	"-6, --enable-ipv6        enable IPv6 (experimental)\n" +
	"-a, --api-socket=PATH    specify API socket path\n" +
	"--cidr=CIDR              specify network address CIDR (default=10.0.2.0/24)\n" +
	"--disable-host-loopback  prohibit connecting to 127.0.0.1:* on the host namespace\n" +
	"--netns-type=TYPE \t specify network namespace type ([path|pid], default=pid)\n" +
	"--userns-path=PATH\t specify user namespace path\n" +
	"--enable-sandbox         create a new mount namespace (and drop all caps except CAP_NET_BIND_SERVICE if running as the root)\n" +
	"--enable-seccomp         enable seccomp to limit syscalls (experimental)\n" +
	"--outbound-addr=IPv4     sets outbound ipv4 address to bound to (experimental)\n" +
	"--outbound-addr6=IPv6    sets outbound ipv6 address to bound to (experimental)\n" +
	"--disable-dns            disables 10.0.2.3 (or configured internal ip) to host dns redirect (experimental)\n" +
	"--macaddress=MAC         specify the MAC address of the TAP (only valid with -c)\n" +
	"--target-type=TYPE       specify the target type ([netns|bess], default=netns)\n" +
	"-h, --help               show this help and exit\n" +
	"-v, --version            show version and exit\n" +
	"\n" +
	"usernet options (not in slirp4netns):\n" +
	"--dns-upstream=ADDR[:PORT]  DNS server the forwarder asks (repeatable; default: /etc/resolv.conf)\n" +
	"--debug                  log every flow and API request to stderr\n" +
	"--log-format=FORMAT      text (default) or json\n" +
	"--pcap=FILE              capture the guest's frames to FILE (pcap)\n" +
	"--pcap-max-size=BYTES    stop capturing at BYTES (default 1073741824, 0: no limit)\n" +
	"--userspace-tcp          end the guest's TCP connections in the userspace stack, not in\n" +
	"                         the namespace's own kernel (always so without -c or with --pcap)\n" +
	cli.EgressHelp +
	"\n" +
	"usernet is a slirp4netns-compatible helper built on the gVisor userspace network\n" +
	"stack; install it as \"slirp4netns\" or point runtimes at it (rootlesskit\n" +
	"--slirp4netns-binary, podman helper_binaries_dir). See the README's\n" +
	"Troubleshooting section for /dev/net/tun permissions and ping_group_range.\n"

// versionText keeps slirp4netns's machine-parsable shape; tools read the
// first line and the SLIRP_CONFIG_VERSION_MAX line.
const versionText = "slirp4netns version 1.2.0\n" +
	"commit: %s\n" +
	"libslirp: 4.7.0\n" +
	"SLIRP_CONFIG_VERSION_MAX: 4\n" +
	"libseccomp: 2.5.4\n" +
	"usernet: %s (gVisor netstack, slirp4netns-compatible)\n"

// config is the parsed command line.
type config struct {
	configure           bool
	userspaceTCP        bool
	exitFD, readyFD     int
	mtu                 int
	enableIPv6          bool
	apiSocket           string
	cidr                netip.Prefix
	disableHostLoopback bool
	netnsType           string
	usernsPath          string
	sandbox, seccomp    bool
	outbound4           string
	outbound6           string
	disableDNS          bool
	macAddress          string
	pid                 int
	netnsPath           string
	tapName             string
	dnsUpstreams        []string
	debug               bool
	logFormat           string
	pcap                string
	pcapMaxSize         int64
	egress              cli.EgressFlags
	help, version       bool
}

// usageError is a command-line error: slirp4netns prints the message to
// stderr and (for most errors) the usage to stdout, then exits 1.
type usageError struct {
	msg     string
	noUsage bool
}

func (e *usageError) Error() string { return e.msg }

func usagef(format string, a ...any) error {
	return &usageError{msg: fmt.Sprintf(format, a...)}
}

var cidrPattern = regexp.MustCompile(`^(([0-9]{1,3}\.){3}[0-9]{1,3})/([0-9]{1,2})$`)

// parseArgs parses and checks slirp4netns's command line. hostPaths: check
// that the namespace paths exist (not in the sandboxed copy, which no longer
// sees them).
func parseArgs(args []string, stdout io.Writer, hostPaths bool) (*config, error) {
	c := &config{exitFD: -1, readyFD: -1}
	fs := pflag.NewFlagSet("usernet", pflag.ContinueOnError)
	fs.SetOutput(io.Discard)
	fs.Usage = func() {}
	var exitFD, readyFD, mtu, cidr, targetType string
	var noHostLoopback, createSandbox bool
	fs.BoolVarP(&c.configure, "configure", "c", false, "")
	fs.StringVarP(&exitFD, "exit-fd", "e", "", "")
	fs.StringVarP(&readyFD, "ready-fd", "r", "", "")
	fs.StringVarP(&mtu, "mtu", "m", "1500", "")
	fs.BoolVarP(&c.enableIPv6, "enable-ipv6", "6", false, "")
	fs.StringVarP(&c.apiSocket, "api-socket", "a", "", "")
	fs.StringVar(&cidr, "cidr", "10.0.2.0/24", "")
	fs.BoolVar(&c.disableHostLoopback, "disable-host-loopback", false, "")
	fs.BoolVar(&noHostLoopback, "no-host-loopback", false, "")
	fs.StringVar(&c.netnsType, "netns-type", "pid", "")
	fs.StringVar(&c.usernsPath, "userns-path", "", "")
	fs.BoolVar(&c.sandbox, "enable-sandbox", false, "")
	fs.BoolVar(&createSandbox, "create-sandbox", false, "")
	fs.BoolVar(&c.seccomp, "enable-seccomp", false, "")
	fs.StringVar(&c.outbound4, "outbound-addr", "", "")
	fs.StringVar(&c.outbound6, "outbound-addr6", "", "")
	fs.BoolVar(&c.disableDNS, "disable-dns", false, "")
	fs.StringVar(&c.macAddress, "macaddress", "", "")
	fs.StringVar(&targetType, "target-type", "netns", "")
	fs.StringArrayVar(&c.dnsUpstreams, "dns-upstream", nil, "")
	fs.BoolVar(&c.debug, "debug", false, "")
	fs.StringVar(&c.logFormat, "log-format", "text", "")
	fs.StringVar(&c.pcap, "pcap", "", "")
	fs.BoolVar(&c.userspaceTCP, "userspace-tcp", false, "")
	fs.Int64Var(&c.pcapMaxSize, "pcap-max-size", 1<<30, "")
	fs.StringArrayVar(&c.egress.Allow, "allow", nil, "")
	fs.StringArrayVar(&c.egress.Deny, "deny", nil, "")
	fs.StringVar(&c.egress.Policy, "policy", "", "")
	fs.BoolVar(&c.egress.Audit, "egress-audit", false, "")
	fs.StringVar(&c.egress.Log, "egress-log", "", "")
	fs.BoolVarP(&c.help, "help", "h", false, "")
	fs.BoolVarP(&c.version, "version", "v", false, "")
	if err := fs.Parse(args); err != nil {
		return nil, usagef("%v", err)
	}
	if c.help || c.version {
		return c, nil
	}
	if c.logFormat != "text" && c.logFormat != "json" {
		return nil, usagef("--log-format must be text or json")
	}
	if c.pcapMaxSize < 0 {
		return nil, usagef("--pcap-max-size must not be negative")
	}
	// The rules' syntax is checked here; --policy's file is read once,
	// before the sandbox (setUp).
	if _, err := (cli.EgressFlags{Allow: c.egress.Allow, Deny: c.egress.Deny}).Config(); err != nil {
		return nil, &usageError{msg: err.Error(), noUsage: true}
	}
	if noHostLoopback {
		fmt.Fprintln(stdout, "WARNING: --no-host-loopback is deprecated, please use --disable-host-loopback instead.")
		c.disableHostLoopback = true
	}
	if createSandbox {
		fmt.Fprintln(stdout, "WARNING: --create-sandbox is deprecated, please use --enable-sandbox instead.")
		c.sandbox = true
	}
	var err error
	if exitFD != "" {
		if c.exitFD, err = nonNegative(exitFD); err != nil {
			return nil, usagef("exit-fd must be a non-negative integer")
		}
	}
	if readyFD != "" {
		if c.readyFD, err = nonNegative(readyFD); err != nil {
			return nil, usagef("ready-fd must be a non-negative integer")
		}
	}
	if c.mtu, err = strconv.Atoi(mtu); err != nil || c.mtu <= 0 || c.mtu > 65521 {
		return nil, usagef("MTU must be a positive integer (< 65522)")
	}
	if c.cidr, err = parseCIDR(cidr); err != nil {
		return nil, err
	}
	if targetType != "netns" && targetType != "bess" {
		return nil, usagef(`--target-type must be either "netns" or "bess"`)
	}
	if targetType == "bess" {
		return nil, usagef("--target-type=bess is not supported by usernet")
	}
	if c.macAddress != "" && !c.configure {
		return nil, usagef("--macaddr cannot be specified when --configure or -c is not specified")
	}
	if c.enableIPv6 {
		fmt.Fprintln(stdout, "WARNING: Support for IPv6 is experimental")
	}
	if c.seccomp {
		fmt.Fprintln(stdout, "WARNING: Support for seccomp is experimental")
	}
	if c.outbound4 != "" {
		fmt.Fprintln(stdout, "WARNING: Support for --outbound-addr is experimental")
	}
	if c.outbound6 != "" {
		fmt.Fprintln(stdout, "WARNING: Support for --outbound-addr6 is experimental")
	}
	return c, c.positional(fs.Args(), stdout, hostPaths)
}

func (c *config) positional(rest []string, stdout io.Writer, hostPaths bool) error {
	if len(rest) < 2 {
		return usagef("missing PID|PATH or TAPNAME")
	}
	if len(rest) > 2 {
		fmt.Fprintln(stdout, "WARNING: too many arguments")
	}
	c.tapName = rest[1]
	if len(c.tapName) >= 16 {
		return usagef("TAPNAME %q: interface names are at most 15 bytes", c.tapName)
	}
	if c.usernsPath != "" && hostPaths {
		if _, err := os.Stat(c.usernsPath); err != nil {
			return usagef("userns path doesn't exist: %s", c.usernsPath)
		}
	}
	// Like slirp4netns, any type other than "pid" means a path.
	if c.netnsType == "pid" {
		pid, err := strconv.Atoi(rest[0])
		if err != nil || pid <= 0 {
			return usagef("PID must be a positive integer")
		}
		c.pid = pid
		return nil
	}
	if hostPaths {
		if _, err := os.Stat(rest[0]); err != nil {
			return usagef("existing path expected when --netns-type=path: %v", errors.Unwrap(err))
		}
	}
	c.netnsPath = rest[0]
	return nil
}

func nonNegative(s string) (int, error) {
	n, err := strconv.Atoi(s)
	if err == nil && n < 0 {
		err = errors.New("negative")
	}
	return n, err
}

// parseCIDR applies slirp4netns's checks and messages (which come without
// the usage text).
func parseCIDR(s string) (netip.Prefix, error) {
	p, err := checkCIDR(s)
	var ue *usageError
	if errors.As(err, &ue) {
		ue.noUsage = true
	}
	return p, err
}

func checkCIDR(s string) (netip.Prefix, error) {
	m := cidrPattern.FindStringSubmatch(s)
	if m == nil {
		return netip.Prefix{}, usagef("invalid CIDR: %s", s)
	}
	bits, _ := strconv.Atoi(m[3])
	if bits < 1 || bits > 25 {
		return netip.Prefix{}, usagef("prefix length needs to be 1-25")
	}
	p, err := netip.ParsePrefix(s)
	if err != nil {
		return netip.Prefix{}, usagef("invalid CIDR: %s", s)
	}
	if p.Masked() != p {
		return netip.Prefix{}, usagef("CIDR needs to be a network address like 10.0.2.0/24, not like 10.0.2.100/24")
	}
	return p, nil
}
