package launcher

import (
	"errors"
	"fmt"
	"io/fs"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"runtime"
	"slices"
	"strings"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/netns-run/netns-run/launcher/nsenter"
	"github.com/netns-run/netns-run/launcher/safefs"
	"github.com/netns-run/netns-run/netstack/ktcpnat"
	"github.com/netns-run/netns-run/tap"
)

// childFD is where the parent puts its end of the handshake socket
// (the first of exec.Cmd's ExtraFiles).
const childFD = 3

// IsChild reports whether this process is the re-executed namespace child.
// Binaries that use Run must check it first thing in main and call RunChild.
func IsChild() bool {
	v := os.Getenv(childEnv)
	return v == "1" || v == joinEnvValue || v == initEnvValue || v == removerEnvValue || v == natBrokerEnvValue
}

// initEnvValue of childEnv marks the namespace child re-executed as the
// PID namespace's init (see execInit).
const initEnvValue = "init"

// RunChild sets up the namespace, then execs the command. It never returns:
// on failure it reports to the parent and exits.
func RunChild() {
	switch os.Getenv(childEnv) {
	case joinEnvValue:
		os.Exit(runJoined())
	case initEnvValue:
		os.Unsetenv(childEnv)
		os.Exit(runInit(os.Args[1:]))
	case removerEnvValue:
		os.Exit(runRemover())
	case natBrokerEnvValue:
		os.Exit(runNATBroker())
	}
	if os.Getenv(waitMapsEnv) == "1" {
		awaitIDMaps()
	}
	os.Unsetenv(childEnv)
	if os.Getenv(detachedEnv) == "" {
		dieWithParent()
	}
	os.Unsetenv(detachedEnv)
	f := os.NewFile(childFD, "launcher-child")
	c, err := net.FileConn(f)
	f.Close()
	if err != nil {
		fmt.Fprintf(os.Stderr, "netns-run: namespace child: handshake socket: %v\n", err)
		os.Exit(125)
	}
	conn := c.(*net.UnixConn)
	ch := channel{conn: conn}

	cfg, err := setUpChild(ch)
	if err != nil {
		var fail *childFailure
		if !errors.As(err, &fail) {
			fail = &childFailure{Step: "handshake", Message: err.Error()}
		}
		_ = ch.send(message{Kind: kindFailure, Failure: fail})
		os.Exit(125)
	}
	if cfg == nil {
		conn.Close()
		os.Exit(0)
	}
	cannotRun := message{Kind: kindFailure, Failure: &childFailure{Step: "exec", Message: "cannot run " + cfg.Args[0]}}
	if cfg.PID {
		// Looked up here, where a failure can still be told: init
		// runs what is found.
		if _, code := lookCommand(cfg.Args[0]); code != 0 {
			_ = ch.send(cannotRun)
			os.Exit(code)
		}
		os.Exit(execInit(cfg.Args, conn))
	}
	// The channel stays open through the exec, which closes it (it is
	// close-on-exec): the parent learns that the command runs.
	code := execCommand(cfg.Args)
	_ = ch.send(cannotRun)
	os.Exit(code)
}

// waitMapsEnv tells the child its id maps are written by the parent (with
// newuidmap) after it started.
const waitMapsEnv = "_NETNS_RUN_WAIT_MAPS"

// detachedEnv marks a child that outlives its starter's threads (a port
// helper started before the exec into usernet's sandbox): it ends when its
// channel closes, not with the thread that started it.
const detachedEnv = "_NETNS_RUN_DETACHED"

// awaitIDMaps waits for the parent's word that the id maps are written,
// then executes the binary again. The first exec happened while our uid was
// still unmapped, which cost us every capability in the new user namespace;
// exec'ing as the now-mapped root gives them back. It does not return.
func awaitIDMaps() {
	os.Unsetenv(waitMapsEnv)
	buf := make([]byte, 64)
	if _, err := unix.Read(childFD, buf); err != nil {
		fmt.Fprintf(os.Stderr, "netns-run: namespace child: waiting for id maps: %v\n", err)
		os.Exit(125)
	}
	err := unix.Exec("/proc/self/exe", os.Args, os.Environ())
	fmt.Fprintf(os.Stderr, "netns-run: namespace child: re-exec: %v\n", err)
	os.Exit(125)
}

func failed(step string, err error) error {
	return &childFailure{Step: step, Message: err.Error()}
}

func setUpChild(ch channel) (*childConfig, error) {
	m, _, err := ch.recv(kindConfig)
	if err != nil {
		return nil, err
	}
	if m.Config == nil {
		return nil, errors.New("config message without body")
	}
	cfg := m.Config
	if err := nsenter.Err(); err != nil {
		return nil, failed("join namespaces", err)
	}
	if cfg.Ports {
		return nil, servePorts(ch)
	}
	if cfg.Exec && !cfg.Configure {
		return nil, errors.New("exec without configure")
	}
	if cfg.Exec {
		if err := unix.Mount("", "/", "", unix.MS_REC|unix.MS_PRIVATE, ""); err != nil {
			return nil, failed("make mounts private", err)
		}
		for _, dir := range cfg.CopyUp {
			if err := copyUp(dir); err != nil {
				return nil, failed("copy-up", err)
			}
		}
		if err := replaceResolvConf(cfg.Guest); err != nil {
			// Networking still works without it; only name lookups
			// through the host's file may not. Say so and go on.
			fmt.Fprintf(os.Stderr, "netns-run: warning: %v; DNS inside the namespace uses the host's resolv.conf\n", err)
		}
	}
	nat := startTCPNAT(cfg)
	dev, mac, err := openTap(cfg)
	if err != nil {
		nat.discard()
		return nil, err
	}
	ready := tapReady{Name: dev.Name(), MAC: mac.String(), Queues: len(dev.Queues())}
	files := dev.Queues()
	natFile := nat.wait(dev.Name())
	if natFile != nil {
		defer natFile.Close()
	}
	if ln := tcpListener(cfg); ln != nil {
		ready.Listener = true
		files = append(files[:len(files):len(files)], ln)
		defer ln.Close()
		if natFile != nil {
			ready.NAT = true
			files = append(files, natFile)
		}
	}
	err = ch.send(message{Kind: kindTap, Tap: &ready}, files...)
	// The parent has its own copies now; ours must not leak into the command.
	dev.Close()
	if err != nil {
		return nil, err
	}
	if !cfg.Exec {
		return nil, nil
	}
	if cfg.Hostname != "" {
		if err := unix.Sethostname([]byte(cfg.Hostname)); err != nil {
			return nil, failed("set hostname", err)
		}
	}
	if cfg.PID {
		// A /proc of the new PID namespace; the mount namespace is
		// private already (replaceResolvConf).
		if err := unix.Mount("proc", "/proc", "proc", unix.MS_NOSUID|unix.MS_NODEV|unix.MS_NOEXEC, ""); err != nil {
			return nil, failed("mount /proc", err)
		}
	}
	if _, _, err := ch.recv(kindProceed); err != nil {
		return nil, err
	}
	return cfg, nil
}

// tcpListener opens the listener GuestConfig.TCPListener asks for, or
// returns nil: without it the stack serves guest TCP itself, so a failure
// is no reason to fail the namespace. It listens on all addresses, both
// families (Go asks for a dual-stack socket explicitly, so the namespace's
// bindv6only does not matter): IPv6 addresses may come later (SLAAC, or
// usernet -6). Without IPv6 in the namespace, on the IPv4 address.
func tcpListener(cfg *childConfig) *os.File {
	g := cfg.Guest
	if !g.TCPListener || !cfg.Configure {
		return nil
	}
	var ln *net.TCPListener
	var err error
	if g.Address.Addr().Is4() {
		ln, err = net.ListenTCP("tcp", &net.TCPAddr{})
	}
	if ln == nil && g.Address.Addr().Is4() {
		ln, err = net.ListenTCP("tcp4", net.TCPAddrFromAddrPort(netip.AddrPortFrom(g.Address.Addr(), 0)))
	}
	if ln == nil || err != nil {
		return nil
	}
	defer ln.Close()
	f, err := ln.File()
	if err != nil {
		return nil
	}
	return f
}

// tcpNATSetup is the in-kernel translation of the kernel TCP path (package
// ktcpnat) being set up: its tables cost a few milliseconds of commits,
// which run while the TAP is created and configured when its name is known
// beforehand.
type tcpNATSetup struct {
	want bool
	// done delivers Install's socket (nil: failed) if it was started.
	done chan *os.File
}

func startTCPNAT(cfg *childConfig) tcpNATSetup {
	g := cfg.Guest
	n := tcpNATSetup{want: g.TCPListener && cfg.Configure && g.Address.Addr().Is4()}
	if n.want && g.TapName != "" && !strings.Contains(g.TapName, "%") {
		n.done = make(chan *os.File, 1)
		go func() { n.done <- installTCPNAT(g.TapName) }()
	}
	return n
}

// wait returns the netlink socket, or nil: without it the helper
// translates each segment itself, so a failure (no nf_tables in this
// kernel, or it refuses this namespace) is no reason to fail the namespace.
func (n tcpNATSetup) wait(tapName string) *os.File {
	switch {
	case n.done != nil:
		return <-n.done
	case n.want:
		return installTCPNAT(tapName)
	}
	return nil
}

// discard waits for a started set-up and closes what it made.
func (n tcpNATSetup) discard() {
	if n.done != nil {
		if f := <-n.done; f != nil {
			f.Close()
		}
	}
}

func installTCPNAT(tapName string) *os.File {
	f, err := ktcpnat.Install(tapName)
	if err != nil {
		return nil
	}
	return f
}

// openTap creates the TAP (or attaches to an existing one of that name)
// and, if asked, brings up lo and gives the TAP the guest address, MTU and
// default route.
func openTap(cfg *childConfig) (*tap.TapDevice, net.HardwareAddr, error) {
	g := cfg.Guest
	if cfg.Configure {
		lo, err := netlink.LinkByName("lo")
		if err != nil {
			return nil, nil, failed("find lo", err)
		}
		if err := netlink.LinkSetUp(lo); err != nil {
			return nil, nil, failed("bring up lo", err)
		}
	}
	dev, err := tap.Create(g.TapName, tap.Options{Offload: g.Offload, Queues: g.Queues})
	if err != nil {
		return nil, nil, failed("create tap", err)
	}
	link, err := netlink.LinkByName(dev.Name())
	if err != nil {
		dev.Close()
		return nil, nil, failed("find "+dev.Name(), err)
	}
	if cfg.Configure {
		if link, err = configureTap(link, g); err != nil {
			dev.Close()
			return nil, nil, err
		}
	}
	return dev, link.Attrs().HardwareAddr, nil
}

func configureTap(link netlink.Link, g GuestConfig) (netlink.Link, error) {
	name := link.Attrs().Name
	if g.MAC != "" {
		mac, err := net.ParseMAC(g.MAC)
		if err != nil {
			return nil, failed("parse MAC", err)
		}
		if err := netlink.LinkSetHardwareAddr(link, mac); err != nil {
			return nil, failed("set MAC on "+name, err)
		}
	}
	if err := netlink.LinkSetMTU(link, g.MTU); err != nil {
		return nil, failed(fmt.Sprintf("set mtu %d on %s", g.MTU, name), err)
	}
	if g.TxQueueLen > 0 {
		// The kernel default of 1000 frames overflows silently when the
		// stack's receive window is larger than that at small MTUs.
		if err := netlink.LinkSetTxQLen(link, g.TxQueueLen); err != nil {
			return nil, failed("set txqueuelen on "+name, err)
		}
	}
	for _, p := range append([]netip.Prefix{g.Address}, g.ExtraAddresses...) {
		if !p.IsValid() {
			continue
		}
		addr := &netlink.Addr{IPNet: &net.IPNet{IP: p.Addr().AsSlice(), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())}}
		if p.Addr().Is6() {
			// No prefix route: the userspace stack answers neighbour
			// solicitations only for its own addresses, so the rest of
			// the prefix goes through the gateway (Routes name it).
			addr.Flags = unix.IFA_F_NODAD | unix.IFA_F_NOPREFIXROUTE
		}
		if err := netlink.AddrAdd(link, addr); err != nil {
			return nil, failed(fmt.Sprintf("add address %s to %s", p, name), err)
		}
	}
	if g.Address6.IsValid() || slices.ContainsFunc(g.ExtraAddresses, func(p netip.Prefix) bool { return p.Addr().Is6() }) {
		// Before the link comes up, or its link-local address goes
		// through DAD and autoconfiguration starts.
		for key, val := range map[string]string{"accept_ra": "0", "accept_dad": "0"} {
			path := fmt.Sprintf("/proc/sys/net/ipv6/conf/%s/%s", name, key)
			if err := os.WriteFile(path, []byte(val), 0o644); err != nil {
				return nil, failed("set "+path, err)
			}
		}
	}
	if err := netlink.LinkSetUp(link); err != nil {
		return nil, failed("bring up "+name, err)
	}
	if len(g.Routes) > 0 {
		if err := addRoutes(link, g.Routes); err != nil {
			return nil, err
		}
	} else if g.Gateway.IsValid() {
		route := &netlink.Route{LinkIndex: link.Attrs().Index, Gw: g.Gateway.AsSlice()}
		if err := netlink.RouteAdd(route); err != nil {
			return nil, failed("add default route via "+g.Gateway.String(), err)
		}
	}
	if g.Address6.IsValid() {
		if err := configureIPv6(link, g); err != nil {
			return nil, err
		}
	}
	// Read back: the MAC may have changed.
	link, err := netlink.LinkByIndex(link.Attrs().Index)
	if err != nil {
		return nil, failed("find "+name, err)
	}
	return link, nil
}

// configureIPv6 gives the TAP its IPv6 address (without duplicate address
// detection, so the first connection does not wait) and default route.
func configureIPv6(link netlink.Link, g GuestConfig) error {
	name := link.Attrs().Name
	addr := &netlink.Addr{
		IPNet: &net.IPNet{IP: g.Address6.Addr().AsSlice(), Mask: net.CIDRMask(g.Address6.Bits(), 128)},
		Flags: unix.IFA_F_NODAD,
	}
	if err := netlink.AddrAdd(link, addr); err != nil {
		return failed(fmt.Sprintf("add address %s to %s", g.Address6, name), err)
	}
	if len(g.Routes) > 0 {
		return nil
	}
	route := &netlink.Route{LinkIndex: link.Attrs().Index, Gw: g.Gateway6.AsSlice()}
	if err := netlink.RouteAdd(route); err != nil {
		return failed("add default route via "+g.Gateway6.String(), err)
	}
	return nil
}

// addRoutes adds routes through the TAP: those to a prefix first, so that
// a gateway behind one of them is reachable when the default route needs it.
func addRoutes(link netlink.Link, routes []GuestRoute) error {
	for _, pass := range []bool{false, true} {
		for _, r := range routes {
			if r.Dst.IsValid() == pass {
				continue
			}
			route := &netlink.Route{LinkIndex: link.Attrs().Index}
			if r.Gw.IsValid() {
				route.Gw = r.Gw.AsSlice()
			}
			what := "default route"
			if r.Dst.IsValid() {
				route.Dst = &net.IPNet{IP: r.Dst.Addr().AsSlice(), Mask: net.CIDRMask(r.Dst.Bits(), r.Dst.Addr().BitLen())}
				what = "route to " + r.Dst.String()
			} else if !r.Gw.IsValid() {
				continue
			} else if r.Gw.Is6() {
				route.Dst = &net.IPNet{IP: net.IPv6zero, Mask: net.CIDRMask(0, 128)}
			}
			if r.Gw.IsValid() {
				what += " via " + r.Gw.String()
			}
			if err := netlink.RouteAdd(route); err != nil && !errors.Is(err, unix.EEXIST) {
				return failed("add "+what, err)
			}
		}
	}
	return nil
}

const resolvConfPath = "/etc/resolv.conf"

// replaceResolvConf bind-mounts a generated resolv.conf over the host's in
// the child's private mount namespace. The source is a temporary file that is
// removed right after mounting: the mount keeps the inode alive, so nothing
// is left on disk. (A memfd would be neater, but the kernel refuses to
// bind-mount from its internal mount.) The file is changed and mounted
// through its descriptor, and removed only if its name still means it:
// TMPDIR may be a directory where others can swap names.
func replaceResolvConf(g GuestConfig) error {
	f, err := os.CreateTemp("", "netns-run-resolv-*.conf")
	if err != nil {
		return fmt.Errorf("create resolv.conf: %w", err)
	}
	defer f.Close()
	created, err := safefs.Track(f, f.Name())
	if err != nil {
		return fmt.Errorf("create resolv.conf: %w", err)
	}
	defer func() { _ = created.Remove() }()
	conf := fmt.Sprintf("nameserver %s\n", g.Nameserver)
	if g.Nameserver6.IsValid() {
		conf += fmt.Sprintf("nameserver %s\n", g.Nameserver6)
	}
	if _, err := f.WriteString(conf); err != nil {
		return fmt.Errorf("write resolv.conf: %w", err)
	}
	if err := f.Chmod(0o644); err != nil {
		return fmt.Errorf("write resolv.conf: %w", err)
	}
	src := fmt.Sprintf("/proc/self/fd/%d", f.Fd())
	if err := unix.Mount(src, resolvConfPath, "", unix.MS_BIND, ""); err != nil {
		return fmt.Errorf("bind-mount over %s: %w", resolvConfPath, err)
	}
	return nil
}

// execInit replaces the child, which holds the setup's capabilities in
// every thread, with a fresh copy of the binary that runs init (runInit)
// with only the capabilities the command itself gets (see dropCapabilities):
// capset changes the calling thread alone, and the Go runtime has others
// (nor can it change them all: that needs a binary without cgo). Only an
// exec makes the whole process take one thread's credentials.
//
// The handshake socket stays open for init, which tells the parent through
// it when the command stops (see initStops).
func execInit(args []string, conn *net.UnixConn) int {
	if err := dropCapabilities(); err != nil {
		fmt.Fprintf(os.Stderr, "netns-run: %v\n", err)
		return 125
	}
	f, err := conn.File()
	conn.Close()
	if err == nil {
		_, err = unix.FcntlInt(f.Fd(), unix.F_SETFD, 0)
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "netns-run: start init: keep the handshake socket: %v\n", err)
		return 125
	}
	env := append(os.Environ(), childEnv+"="+initEnvValue, fmt.Sprintf("%s=%d", initStopsEnv, f.Fd()))
	err = unix.Exec("/proc/self/exe", append([]string{os.Args[0]}, args...), env)
	runtime.KeepAlive(f)
	fmt.Fprintf(os.Stderr, "netns-run: start init: %v\n", err)
	return 125
}

// execCommand replaces the child with the command. It returns only on
// failure, with the exit code a shell would use (127 not found, 126 not
// executable).
func execCommand(args []string) int {
	path, code := lookCommand(args[0])
	if code != 0 {
		return code
	}
	dieWithParent()
	if err := dropCapabilities(); err != nil {
		fmt.Fprintf(os.Stderr, "netns-run: %v\n", err)
		return 125
	}
	err := unix.Exec(path, args, os.Environ())
	fmt.Fprintf(os.Stderr, "netns-run: exec %s: %v\n", path, err)
	if errors.Is(err, unix.ENOENT) {
		return 127
	}
	return 126
}

// dieWithParent asks for SIGKILL when netns-run dies, so that a netns-run
// killed outright (SIGKILL, OOM) takes its init or command along instead of
// leaving it running without a network. The signal set at clone does not
// last: the kernel clears it when the child's credentials change, which the
// exec as root in the new user namespace does (the command saw 0). It
// belongs to the calling thread and survives exec only from that thread,
// so the thread stays locked to the goroutine that will exec or run init.
func dieWithParent() {
	runtime.LockOSThread()
	_ = unix.Prctl(unix.PR_SET_PDEATHSIG, uintptr(unix.SIGKILL), 0, 0, 0)
}

// dropCapabilities keeps the setup's capabilities (see Run's --map-user
// handling: CAP_NET_ADMIN and CAP_SYS_ADMIN, ambient and inheritable) from
// reaching the command, which then has what it would have under unshare
// --map-user: nothing when it is not root inside, root's full set when it
// is. It empties the calling thread's ambient and inheritable sets, and for
// a non-root uid its permitted and effective sets too. Root keeps those:
// its exec gets the full set back anyway, and an exec that gains
// capabilities would also reset the parent-death signal (dieWithParent).
// The caller must exec or start the command from this same thread.
func dropCapabilities() error {
	if err := unix.Prctl(unix.PR_CAP_AMBIENT, unix.PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0); err != nil {
		return fmt.Errorf("clear ambient capabilities: %w", err)
	}
	hdr := unix.CapUserHeader{Version: unix.LINUX_CAPABILITY_VERSION_3}
	var data [2]unix.CapUserData
	if os.Geteuid() == 0 {
		if err := unix.Capget(&hdr, &data[0]); err != nil {
			return fmt.Errorf("read capabilities: %w", err)
		}
	}
	for i := range data {
		data[i].Inheritable = 0
	}
	if err := unix.Capset(&hdr, &data[0]); err != nil {
		return fmt.Errorf("drop capabilities: %w", err)
	}
	return nil
}

// lookCommand finds the command name, or says why not and returns the exit
// code a shell would use (127 not found, 126 not executable).
func lookCommand(name string) (string, int) {
	path, err := exec.LookPath(name)
	if err == nil {
		return path, 0
	}
	fmt.Fprintf(os.Stderr, "netns-run: %s: %v\n", name, lookPathReason(err))
	if errors.Is(err, exec.ErrNotFound) || errors.Is(err, fs.ErrNotExist) {
		return "", 127
	}
	return "", 126
}

func lookPathReason(err error) string {
	var e *exec.Error
	if errors.As(err, &e) {
		return strings.TrimPrefix(e.Err.Error(), "exec: ")
	}
	return err.Error()
}
