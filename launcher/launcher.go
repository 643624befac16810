// Package launcher starts a command in fresh user, network, mount and UTS
// namespaces with a TAP device for userspace networking.
//
// It follows rootlesskit's parent/child split. The parent (the process the
// user ran, still in the host namespaces) re-executes its own binary with
// CLONE_NEWUSER|CLONE_NEWNET|CLONE_NEWNS|CLONE_NEWUTS. The child, root in its
// new user namespace, configures loopback and the TAP with netlink, replaces
// /etc/resolv.conf in its private mount namespace, passes the TAP queues back
// over a socketpair with SCM_RIGHTS and, once the parent has the network up,
// execs the command. The parent serves the TAP until the command exits.
//
// Because the namespaces are created by clone itself, no thread of the child
// ever runs outside them. Joining existing namespaces (usernet's PID mode,
// the port helper, --join) re-executes the binary with package nsenter's
// constructor doing the setns calls before the Go runtime starts threads.
package launcher

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"os/signal"
	"runtime"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/netns-run/netns-run/tap"
)

// childEnv marks the re-executed process as the namespace child.
const childEnv = "_NETNS_RUN_LAUNCHER_CHILD"

// handshakeTimeout bounds how long the parent waits for the child to set up
// the namespace; it only matters when something is badly wrong.
const handshakeTimeout = 30 * time.Second

// GuestConfig describes the network the command sees inside the namespace.
type GuestConfig struct {
	TapName    string       `json:"tap_name"`
	MTU        int          `json:"mtu"`
	TxQueueLen int          `json:"tx_queue_len"`
	Address    netip.Prefix `json:"address"`
	Gateway    netip.Addr   `json:"gateway"`
	Nameserver netip.Addr   `json:"nameserver"`
	// MAC of the TAP; empty keeps the kernel's random one.
	MAC string `json:"mac,omitempty"`
	// Address6 and Gateway6, if valid, configure IPv6 directly (no
	// router advertisement, no duplicate address detection, so the first
	// connection does not wait), and Nameserver6 joins resolv.conf.
	Address6    netip.Prefix `json:"address6,omitzero"`
	Gateway6    netip.Addr   `json:"gateway6,omitzero"`
	Nameserver6 netip.Addr   `json:"nameserver6,omitzero"`
	// Offload opens the TAP with a virtio-net header and checksum and
	// TCP segmentation offload (see tap.Options).
	Offload bool `json:"offload,omitempty"`
	// Queues is the number of TAP queues (IFF_MULTI_QUEUE above one):
	// the guest's kernel spreads its flows over them, and the helper
	// reads each on its own.
	Queues int `json:"queues,omitempty"`
	// ExtraAddresses are added besides Address and Address6 (pasta copies
	// every address of the host's interface). Address may then be left
	// out (IPv6 only). IPv6 ones get no prefix route: Routes must reach
	// the gateway.
	ExtraAddresses []netip.Prefix `json:"extra_addresses,omitempty"`
	// Routes, if set, replace the default routes via Gateway and
	// Gateway6 (pasta copies the host interface's routes).
	Routes []GuestRoute `json:"routes,omitempty"`
	// TCPListener asks for a TCP listener inside the namespace, on all
	// addresses of both families (on Address alone without IPv6),
	// handed back with the TAP: the end of the stack's kernel
	// TCP path (netstack.Config.KernelTCP). Only with Configure and an
	// IPv4 Address.
	TCPListener bool `json:"tcp_listener,omitempty"`
}

// Namespace is the set-up namespace as the network sees it.
type Namespace struct {
	// PID is a process in the namespaces (the command, before exec).
	PID int
	// Tap is the guest's TAP, owned by the network from now on.
	Tap tap.Device
	// MAC is the guest side's Ethernet address.
	MAC net.HardwareAddr
	// TCPListener is the listener GuestConfig.TCPListener asked for (nil
	// if not asked, or if it could not be opened), owned by the network
	// from now on.
	TCPListener *os.File
	// TCPNAT, with TCPListener, is the netlink socket of the listener's
	// in-kernel address translation (netstack.Config.KernelTCPNAT; nil
	// where nftables is unusable), owned by the network from now on.
	TCPNAT *os.File
}

// Target names the namespace's user and network namespaces, for helpers
// that join them (see StartPortHelper).
func (n Namespace) Target() Target {
	dir := fmt.Sprintf("/proc/%d/ns/", n.PID)
	return Target{NetNS: dir + "net", UserNS: dir + "user"}
}

// NetworkFunc starts the host side of the network for the namespace the
// child set up. Run closes the returned Network after the command and
// everything it left in the namespace are gone.
type NetworkFunc func(ctx context.Context, ns Namespace) (Network, error)

// Network is the running host side of the network.
type Network interface {
	io.Closer
	// Failed delivers an error if the network stops by itself (its
	// engine crashed); Run then kills the command and returns the error.
	// A nil channel: it cannot fail.
	Failed() <-chan error
}

// Options configure Run.
type Options struct {
	Args    []string
	Guest   GuestConfig
	Network NetworkFunc
	Logger  *slog.Logger
	// SubIDs maps the caller's subordinate uid and gid ranges
	// (/etc/subuid, /etc/subgid) with newuidmap/newgidmap, besides the
	// caller's own ids; otherwise only the caller's own ids are mapped.
	SubIDs bool
	// MapUser and MapGroup are the ids the caller has inside (0: root).
	MapUser, MapGroup int
	// PID gives the command a new PID namespace with a fresh /proc; a
	// small init runs as PID 1, reaps orphans and forwards signals.
	PID bool
	// Hostname, if set, is the hostname in the new UTS namespace.
	Hostname string
	// CopyUp lists directories made writable inside (tmpfs copies), so
	// files such as /etc/hosts can be replaced without touching the host.
	CopyUp []string
	// Started, if set, is called once the command runs (it was found and
	// executed); not if it could not be.
	Started func()
}

// Run starts opts.Args in new namespaces, serves its network and returns its
// exit status: the command's own code, or 128+N when a signal N killed it.
// An error means the namespace could not be set up, and the command did not
// run, or that the network failed while it ran, and the command was killed.
func Run(ctx context.Context, opts Options) (int, error) {
	if len(opts.Args) == 0 {
		return 0, errors.New("no command given")
	}
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	// Pdeathsig fires when the thread that started the child exits, so
	// that thread must live as long as the child does.
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()

	// Catch the forwarded signals before the child exists so none is lost.
	sigs := make(chan os.Signal, 8)
	signal.Notify(sigs, unix.SIGINT, unix.SIGTERM, unix.SIGHUP)
	defer signal.Stop(sigs)

	conn, childEnd, err := socketPair()
	if err != nil {
		return 0, err
	}
	defer conn.Close()
	ch := channel{conn: conn}

	term := foregroundTerminal()
	cmd := exec.Command("/proc/self/exe")
	cmd.Args = []string{os.Args[0]}
	cmd.Env = append(os.Environ(), childEnv+"=1")
	if opts.SubIDs {
		cmd.Env = append(cmd.Env, waitMapsEnv+"=1")
	}
	cmd.Stdin, cmd.Stdout, cmd.Stderr = os.Stdin, os.Stdout, os.Stderr
	cmd.ExtraFiles = []*os.File{childEnd}
	cmd.SysProcAttr = &syscall.SysProcAttr{
		Cloneflags: unix.CLONE_NEWUSER | unix.CLONE_NEWNET | unix.CLONE_NEWNS | unix.CLONE_NEWUTS,
		Pdeathsig:  unix.SIGKILL,
	}
	if opts.PID {
		cmd.SysProcAttr.Cloneflags |= unix.CLONE_NEWPID
	}
	if opts.MapUser != 0 || opts.MapGroup != 0 {
		// Not root inside: exec would drop the capabilities the child
		// needs to set the namespace up, unless they are ambient. The
		// child clears them before it runs the command.
		cmd.SysProcAttr.AmbientCaps = []uintptr{unix.CAP_NET_ADMIN, unix.CAP_SYS_ADMIN}
	}
	if !opts.SubIDs {
		// A single mapping the kernel lets us write ourselves; setgroups
		// must then be denied.
		cmd.SysProcAttr.UidMappings = []syscall.SysProcIDMap{{ContainerID: opts.MapUser, HostID: os.Getuid(), Size: 1}}
		cmd.SysProcAttr.GidMappings = []syscall.SysProcIDMap{{ContainerID: opts.MapGroup, HostID: os.Getgid(), Size: 1}}
		cmd.SysProcAttr.GidMappingsEnableSetgroups = false
	}
	if term != nil {
		// The command gets its own process group in the terminal's
		// foreground, so Ctrl-C and job control reach it and not us.
		cmd.SysProcAttr.Foreground = true
		cmd.SysProcAttr.Ctty = 0
	}
	err = cmd.Start()
	childEnd.Close()
	if err != nil {
		return 0, explainStartError(err)
	}
	child := &childProcess{pid: cmd.Process.Pid, term: term}
	log.Debug("namespace child started", "pid", child.pid)
	if opts.SubIDs {
		// The child waits for its config message, sent only after this.
		if err := writeIDMaps(child.pid, opts.MapUser, opts.MapGroup); err != nil {
			_, _ = child.killAndWait()
			return 0, err
		}
		if _, err := conn.Write([]byte("maps")); err != nil {
			_, _ = child.killAndWait()
			return 0, fmt.Errorf("handshake: %w", err)
		}
	}

	network, err := setUp(ctx, ch, opts, child.pid)
	if err != nil {
		code, _ := child.killAndWait()
		if code != 0 && errors.Is(err, errPeerGone) {
			return 0, fmt.Errorf("namespace child exited with status %d before it was ready: %w", code, err)
		}
		return 0, err
	}
	if err := awaitStarted(ch, opts.PID); err != nil {
		// supervise collects its exit status.
		log.Debug("the command did not start", "err", err)
	} else if opts.Started != nil {
		opts.Started()
	}
	if opts.PID {
		// Init's channel for the command's stops; closed with Run.
		child.stops = commandStops(conn)
	} else {
		conn.Close()
	}

	code, netErr := child.supervise(sigs, network.Failed(), log)
	child.killLeftovers(log)
	if err := network.Close(); err != nil && netErr == nil {
		log.Warn("stopping the network", "err", err)
	}
	if netErr != nil {
		return 0, netErr
	}
	return code, nil
}

var errPeerGone = errors.New("namespace child went away")

// setUp runs the parent's half of the handshake and starts the network.
func setUp(ctx context.Context, ch channel, opts Options, pid int) (Network, error) {
	cfg := childConfig{Guest: opts.Guest, Configure: true, Exec: true, Args: opts.Args, PID: opts.PID, Hostname: opts.Hostname, CopyUp: opts.CopyUp}
	dev, mac, tcp, err := tapHandshake(ch, cfg)
	if err != nil {
		return nil, err
	}
	network, err := opts.Network(ctx, Namespace{PID: pid, Tap: dev, MAC: mac, TCPListener: tcp.listener, TCPNAT: tcp.nat})
	if err != nil {
		dev.Close()
		tcp.close()
		return nil, fmt.Errorf("start network: %w", err)
	}
	if err := ch.send(message{Kind: kindProceed}); err != nil {
		network.Close()
		return nil, fmt.Errorf("handshake: %w: %w", errPeerGone, err)
	}
	return network, nil
}

// handshakeError tells a setup failure the child reported from the child
// dying or the channel breaking.
func handshakeError(err error) error {
	var fail *childFailure
	if errors.As(err, &fail) {
		return fmt.Errorf("set up namespace: %w", err)
	}
	return fmt.Errorf("handshake: %w: %w", errPeerGone, err)
}

// kernelTCPFiles are the kernel TCP path's descriptors from the child;
// either may be nil.
type kernelTCPFiles struct {
	listener, nat *os.File
}

func (k kernelTCPFiles) close() {
	for _, f := range []*os.File{k.listener, k.nat} {
		if f != nil {
			f.Close()
		}
	}
}

// tapFromMessage takes the TAP queues, and the kernel TCP path's
// descriptors after them if the child announced them.
func tapFromMessage(t *tapReady, files []*os.File) (*tap.TapDevice, net.HardwareAddr, kernelTCPFiles, error) {
	var tcp kernelTCPFiles
	if t == nil || t.Queues < 1 || (t.NAT && !t.Listener) || len(files) != t.Queues+btoi(t.Listener)+btoi(t.NAT) {
		for _, f := range files {
			f.Close()
		}
		return nil, nil, tcp, fmt.Errorf("handshake: child sent %d descriptors, announced %v", len(files), t)
	}
	if t.Listener {
		tcp.listener = files[t.Queues]
	}
	if t.NAT {
		tcp.nat = files[t.Queues+1]
	}
	files = files[:t.Queues]
	dev := tap.FromFiles(t.Name, files)
	mac, err := net.ParseMAC(t.MAC)
	if err != nil {
		dev.Close()
		tcp.close()
		return nil, nil, kernelTCPFiles{}, fmt.Errorf("handshake: guest MAC %q: %w", t.MAC, err)
	}
	return dev, mac, tcp, nil
}

func btoi(b bool) int {
	if b {
		return 1
	}
	return 0
}

// socketPair returns the parent's end as a connection and the child's end
// as a file to pass in ExtraFiles.
func socketPair() (*net.UnixConn, *os.File, error) {
	pair, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_SEQPACKET|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, nil, fmt.Errorf("socketpair: %w", err)
	}
	childEnd := os.NewFile(uintptr(pair[1]), "launcher-child")
	conn, err := unixConn(pair[0])
	if err != nil {
		childEnd.Close()
		return nil, nil, err
	}
	return conn, childEnd, nil
}

func unixConn(fd int) (*net.UnixConn, error) {
	c, err := tap.UnixConn(os.NewFile(uintptr(fd), "launcher-parent"))
	if err != nil {
		return nil, fmt.Errorf("socketpair: %w", err)
	}
	return c, nil
}
