package launcher

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"os/signal"
	"runtime"
	"strconv"
	"time"

	"golang.org/x/sys/unix"

	"github.com/netns-run/netns-run/launcher/nsenter"
	"github.com/netns-run/netns-run/tap"
)

// Target names existing namespaces to attach a TAP to.
type Target struct {
	// NetNS is a network namespace path (/proc/PID/ns/net or a bind mount).
	NetNS string
	// UserNS is the user namespace owning it; empty to stay in our own
	// (when we are root, or already inside it).
	UserNS string
}

// TargetOfPID returns the namespaces of process pid. A process that has
// just unshared may not be in its new namespace yet, so this waits (up to
// timeout) until its network namespace differs from ours.
func TargetOfPID(pid int, timeout time.Duration) (Target, error) {
	if pid <= 0 {
		return Target{}, fmt.Errorf("PID must be a positive integer")
	}
	dir := "/proc/" + strconv.Itoa(pid) + "/ns/"
	var own unix.Stat_t
	if err := unix.Stat("/proc/self/ns/net", &own); err != nil {
		return Target{}, fmt.Errorf("stat own network namespace: %w", err)
	}
	deadline := time.Now().Add(timeout)
	for {
		var st unix.Stat_t
		if err := unix.Stat(dir+"net", &st); err != nil {
			return Target{}, fmt.Errorf("network namespace of PID %d: %w", pid, err)
		}
		if st.Ino != own.Ino || st.Dev != own.Dev {
			break
		}
		if time.Now().After(deadline) {
			return Target{}, fmt.Errorf("PID %d is still in our network namespace after %v", pid, timeout)
		}
		time.Sleep(5 * time.Millisecond)
	}
	return Target{NetNS: dir + "net", UserNS: dir + "user"}, nil
}

// OpenTarget is a Target whose namespace files are open.
type OpenTarget struct {
	// NetNS and UserNS are the namespace files; UserNS is nil when the
	// Target named none.
	NetNS, UserNS *os.File
}

// Open opens t's namespace files. Later uses should go through them (see
// OpenTarget.Target) rather than through t's paths, which may stop
// resolving or come to name another namespace: a /proc/PID path once that
// process exits, any path of the host's once this process is in a sandbox.
func (t Target) Open() (*OpenTarget, error) {
	netns, err := os.Open(t.NetNS)
	if err != nil {
		return nil, fmt.Errorf("network namespace: %w", err)
	}
	o := &OpenTarget{NetNS: netns}
	if t.UserNS != "" {
		if o.UserNS, err = os.Open(t.UserNS); err != nil {
			netns.Close()
			return nil, fmt.Errorf("user namespace: %w", err)
		}
	}
	return o, nil
}

// Target names the open files through this process's descriptors
// (/proc/self/fd/N), for what takes paths (OpenTapIn).
func (o *OpenTarget) Target() Target {
	t := Target{NetNS: fdPath(o.NetNS)}
	if o.UserNS != nil {
		t.UserNS = fdPath(o.UserNS)
	}
	return t
}

// Close closes the files.
func (o *OpenTarget) Close() {
	o.NetNS.Close()
	if o.UserNS != nil {
		o.UserNS.Close()
	}
}

func fdPath(f *os.File) string { return "/proc/self/fd/" + strconv.Itoa(int(f.Fd())) }

// OpenTapIn creates or attaches to the TAP g.TapName inside the target's
// network namespace and returns it for use from our own namespaces, with the
// TAP's MAC address. With configure, lo is brought up and the TAP gets g's
// address, MAC, MTU and default route.
//
// A helper process (our own binary, re-executed) joins the namespaces
// before its Go runtime starts (see package nsenter), opens the TAP and
// passes it back over SCM_RIGHTS.
func OpenTapIn(ctx context.Context, t Target, g GuestConfig, configure bool) (*GuestLink, error) {
	if _, err := os.Stat(t.NetNS); err != nil {
		return nil, fmt.Errorf("network namespace: %w", err)
	}
	cmd, conn, err := startHelperIn(ctx, t, true)
	if err != nil {
		return nil, fmt.Errorf("start tap helper: %w", err)
	}
	dev, mac, tcp, err := tapHandshake(channel{conn: conn}, childConfig{Guest: g, Configure: configure})
	// The helper is done, or, after a failed handshake, told so by the
	// closed channel; one stuck in the namespace is killed.
	conn.Close()
	werr := reap(cmd, helperExitGrace)
	if err != nil {
		if werr != nil && !errors.Is(err, errPeerGone) {
			return nil, err
		}
		return nil, errors.Join(err, werr)
	}
	return &GuestLink{Tap: dev, MAC: mac, TCPListener: tcp.listener, TCPNAT: tcp.nat}, nil
}

// helperExitGrace is how long a helper has to exit once its work is over.
const helperExitGrace = 5 * time.Second

// reap waits for cmd, killing it if it has not exited within grace.
func reap(cmd *exec.Cmd, grace time.Duration) error {
	kill := time.AfterFunc(grace, func() { _ = cmd.Process.Kill() })
	defer kill.Stop()
	return cmd.Wait()
}

// GuestLink is what OpenTapIn set up in the target.
type GuestLink struct {
	Tap tap.Device
	MAC net.HardwareAddr
	// TCPListener: see GuestConfig.TCPListener; nil if not asked for or
	// not opened. TCPNAT: see Namespace.TCPNAT. The caller owns them.
	TCPListener *os.File
	TCPNAT      *os.File
}

// startHelperIn re-executes our binary as a launcher child that joins t
// (see package nsenter) and returns it with our end of its handshake
// socket. The namespace files are opened here, before returning, and handed
// down as descriptors: a helper opening /proc/PID/ns/* itself races with
// that process's exec (the kernel then answers ENOENT for a moment).
// Without dieWithUs the helper gets no parent-death signal (the kernel
// sends it when the thread that started it ends, which an exec of another
// thread does).
func startHelperIn(ctx context.Context, t Target, dieWithUs bool) (*exec.Cmd, *net.UnixConn, error) {
	conn, childEnd, err := socketPair()
	if err != nil {
		return nil, nil, err
	}
	defer childEnd.Close()
	cmd := exec.CommandContext(ctx, "/proc/self/exe")
	cmd.Args = []string{os.Args[0]}
	cmd.Env = append(os.Environ(), childEnv+"=1")
	cmd.ExtraFiles = []*os.File{childEnd}
	closeNS, err := passNamespaces(cmd, []nsFile{{t.NetNS, nsenter.EnvNetNS}, {t.UserNS, nsenter.EnvUserNS}})
	if err != nil {
		conn.Close()
		return nil, nil, err
	}
	defer closeNS()
	cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
	if dieWithUs {
		cmd.SysProcAttr = &unix.SysProcAttr{Pdeathsig: unix.SIGKILL}
	} else {
		// RunChild would tie it to the thread that started it, which
		// the exec into the sandbox ends when it is not the one that
		// execs: the helper died in about one start of twenty.
		cmd.Env = append(cmd.Env, detachedEnv+"=1")
	}
	if err := cmd.Start(); err != nil {
		conn.Close()
		return nil, nil, err
	}
	return cmd, conn, nil
}

// nsFile is a namespace for a re-executed child to join: its path, and the
// variable that tells package nsenter about it.
type nsFile struct{ path, env string }

// passNamespaces opens each namespace file (empty paths are skipped) and
// hands it to cmd as an inherited descriptor that the variable names as
// /proc/self/fd/N. Opening here, not in the child, pins the namespaces
// before the child starts: a /proc/PID/ns path races with that process's
// exec and exit (the kernel answers ENOENT for a moment), and one opened
// after the child joined a mount namespace would resolve in the target's
// /proc. The returned function closes our copies once cmd has started.
func passNamespaces(cmd *exec.Cmd, nss []nsFile) (func(), error) {
	var opened []*os.File
	closeAll := func() {
		for _, f := range opened {
			f.Close()
		}
		opened = nil
	}
	for _, ns := range nss {
		if ns.path == "" {
			continue
		}
		f, err := os.Open(ns.path)
		if err != nil {
			closeAll()
			return nil, fmt.Errorf("open %s: %w", ns.path, err)
		}
		opened = append(opened, f)
		cmd.ExtraFiles = append(cmd.ExtraFiles, f)
		// ExtraFiles[i] is descriptor 3+i in the child.
		cmd.Env = append(cmd.Env, fmt.Sprintf("%s=/proc/self/fd/%d", ns.env, 2+len(cmd.ExtraFiles)))
	}
	return closeAll, nil
}

func tapHandshake(ch channel, cfg childConfig) (*tap.TapDevice, net.HardwareAddr, kernelTCPFiles, error) {
	var none kernelTCPFiles
	if err := ch.conn.SetDeadline(time.Now().Add(handshakeTimeout)); err != nil {
		return nil, nil, none, fmt.Errorf("handshake: %w", err)
	}
	if err := ch.send(message{Kind: kindConfig, Config: &cfg}); err != nil {
		return nil, nil, none, fmt.Errorf("handshake: %w: %w", errPeerGone, err)
	}
	m, files, err := ch.recv(kindTap)
	if err != nil {
		return nil, nil, none, handshakeError(err)
	}
	return tapFromMessage(m.Tap, files)
}

// joinEnvValue of childEnv marks a process re-executed to run a command in
// namespaces it joined before its runtime started.
const joinEnvValue = "join"

// Join runs args inside the user, mount, UTS, network and (if it has its
// own) PID namespaces of the target process (a running netns-run
// namespace's first process) and returns the command's exit status as Run
// does; ErrGone if the target has exited. The command runs as root of that
// user namespace, in the caller's directory when it exists there.
func Join(ctx context.Context, target ProcessID, args []string, log *slog.Logger) (int, error) {
	if len(args) == 0 {
		return 0, errors.New("no command given")
	}
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	proc, err := target.Open()
	if err != nil {
		return 0, err
	}
	defer proc.Close()
	runtime.LockOSThread() // for Pdeathsig, as in Run
	defer runtime.UnlockOSThread()
	sigs := make(chan os.Signal, 8)
	signal.Notify(sigs, unix.SIGINT, unix.SIGTERM, unix.SIGHUP)
	defer signal.Stop(sigs)

	term := foregroundTerminal()
	cmd := exec.CommandContext(ctx, "/proc/self/exe")
	cmd.Args = append([]string{os.Args[0]}, args...)
	cmd.Env = append(os.Environ(), childEnv+"="+joinEnvValue)
	dir := fmt.Sprintf("/proc/%d/ns/", target.PID)
	nss := []nsFile{{dir + "user", nsenter.EnvUserNS}, {dir + "mnt", nsenter.EnvMntNS}, {dir + "uts", nsenter.EnvUTSNS}, {dir + "net", nsenter.EnvNetNS}}
	if ownPIDNamespace(target.PID) {
		nss = append(nss, nsFile{dir + "pid", nsenter.EnvPIDNS})
	}
	closeNS, err := passNamespaces(cmd, nss)
	if err != nil {
		return 0, fmt.Errorf("join namespace of PID %d: %w", target.PID, err)
	}
	defer closeNS()
	if !proc.Alive() {
		// The files may be of a newer process that took its PID.
		return 0, ErrGone
	}
	cmd.Stdin, cmd.Stdout, cmd.Stderr = os.Stdin, os.Stdout, os.Stderr
	cmd.SysProcAttr = &unix.SysProcAttr{Pdeathsig: unix.SIGKILL}
	if term != nil {
		cmd.SysProcAttr.Foreground, cmd.SysProcAttr.Ctty = true, 0
	}
	if err := cmd.Start(); err != nil {
		return 0, fmt.Errorf("join namespace of PID %d: %w", target.PID, err)
	}
	closeNS()
	child := &childProcess{pid: cmd.Process.Pid, term: term}
	code, _ := child.supervise(sigs, nil, log)
	return code, nil
}

// ownPIDNamespace reports whether process pid is in a PID namespace other
// than ours (a --pid namespace).
func ownPIDNamespace(pid int) bool {
	var own, its unix.Stat_t
	if unix.Stat("/proc/self/ns/pid", &own) != nil || unix.Stat(fmt.Sprintf("/proc/%d/ns/pid", pid), &its) != nil {
		return false
	}
	return own.Dev != its.Dev || own.Ino != its.Ino
}

// runJoined is the re-executed side of Join: the constructor has joined
// the namespaces; run the command.
func runJoined() int {
	for _, k := range []string{childEnv, nsenter.EnvUserNS, nsenter.EnvMntNS, nsenter.EnvUTSNS, nsenter.EnvNetNS, nsenter.EnvPIDNS} {
		os.Unsetenv(k)
	}
	if err := nsenter.Err(); err != nil {
		fmt.Fprintf(os.Stderr, "netns-run: join: %v\n", err)
		return 125
	}
	if err := nsenter.UserNSErr(); err != nil {
		fmt.Fprintf(os.Stderr, "netns-run: join: %v\n", err)
		return 125
	}
	return execCommand(os.Args[1:])
}
