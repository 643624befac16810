package launcher

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// PortHelper is a process inside a namespace that opens connections there
// on request and hands the connected sockets back: the child half of the
// builtin port driver, as in rootlesskit. The parent then copies between two
// kernel sockets, so published ports run at kernel speed.
type PortHelper struct {
	mu sync.Mutex // one request at a time on the channel
	ch channel
	// target is where the helper runs; it starts with the first request
	// (NewPortHelper) or at once (StartPortHelper).
	target Target
	// state guards started, closed and cmd against Close, which does not
	// wait for a request in flight.
	state   sync.Mutex
	started bool
	closed  bool
	// adopted: not ours to start (AdoptPortHelper); cmd and done are nil.
	adopted bool
	cmd     *exec.Cmd
	done    chan struct{}
}

// dialTimeout bounds one connect inside the namespace (to its loopback or
// own address, so normally instant).
const dialTimeout = 10 * time.Second

// StartPortHelper starts the helper in the target's namespaces; Close
// stops it.
func StartPortHelper(t Target) (*PortHelper, error) {
	h := NewPortHelper(t)
	h.mu.Lock()
	defer h.mu.Unlock()
	if err := h.start(); err != nil {
		h.Close()
		return nil, err
	}
	return h, nil
}

// NewPortHelper returns a helper for the target's namespaces that starts
// with its first request: one a namespace may never need costs nothing.
// t's paths must name the namespaces until then (an OpenTarget's do).
func NewPortHelper(t Target) *PortHelper { return &PortHelper{target: t} }

// StartDetachedPortHelper starts a helper in the target's namespaces for a
// process about to replace itself (usernet entering its sandbox, which
// cannot start one) and returns the connection to it, for
// AdoptPortHelper. The helper exits when the connection's last holder
// closes it.
func StartDetachedPortHelper(t Target) (*os.File, error) {
	cmd, conn, err := startPortServer(t, false)
	if err != nil {
		return nil, err
	}
	defer conn.Close()
	// Not waited for: this image is about to be replaced.
	_ = cmd.Process.Release()
	f, err := conn.File()
	if err != nil {
		return nil, fmt.Errorf("start port helper: %w", err)
	}
	return f, nil
}

// AdoptPortHelper returns the helper at the other end of conn
// (StartDetachedPortHelper), which it owns; the helper is not started
// again if it ends.
func AdoptPortHelper(conn *os.File) (*PortHelper, error) {
	defer conn.Close()
	c, err := net.FileConn(conn)
	if err != nil {
		return nil, fmt.Errorf("adopt port helper: %w", err)
	}
	uc, ok := c.(*net.UnixConn)
	if !ok {
		c.Close()
		return nil, fmt.Errorf("adopt port helper: %T", c)
	}
	return &PortHelper{ch: channel{conn: uc}, started: true, adopted: true}, nil
}

// Start starts the helper now rather than with its first request: before
// a seccomp filter, say, which would refuse that start.
func (h *PortHelper) Start() error {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.start()
}

// start starts the helper unless it runs; h.mu is held.
func (h *PortHelper) start() error {
	h.state.Lock()
	defer h.state.Unlock()
	switch {
	case h.closed:
		return fmt.Errorf("port helper: %w", net.ErrClosed)
	case h.started:
		return nil
	case h.adopted:
		return errors.New("port helper: it ended")
	}
	cmd, conn, err := startPortServer(h.target, true)
	if err != nil {
		return err
	}
	h.ch, h.cmd, h.done, h.started = channel{conn: conn}, cmd, make(chan struct{}), true
	go func() {
		defer close(h.done)
		_ = cmd.Wait()
	}()
	return nil
}

// startPortServer starts a launcher child in t that serves port requests
// (servePorts), with or without a parent-death signal (see startHelperIn).
// On failure the child is killed and reaped.
func startPortServer(t Target, dieWithUs bool) (*exec.Cmd, *net.UnixConn, error) {
	// Not tied to a context: the helper lives until its connection
	// closes, which its owner does after the flows that use it ended.
	cmd, conn, err := startHelperIn(context.Background(), t, dieWithUs)
	if err != nil {
		return nil, nil, fmt.Errorf("start port helper: %w", err)
	}
	if err := (channel{conn: conn}).send(message{Kind: kindConfig, Config: &childConfig{Ports: true}}); err != nil {
		conn.Close()
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
		return nil, nil, fmt.Errorf("start port helper: %w", err)
	}
	return cmd, conn, nil
}

// stopLocked ends a started helper (its Wait reaps it), so that the next
// request starts another; h.state is held. After a failed exchange the
// channel is out of step, or the helper gone.
func (h *PortHelper) stopLocked() {
	if !h.started {
		return
	}
	h.started = false
	h.ch.conn.Close()
	if h.cmd != nil {
		_ = h.cmd.Process.Kill()
	}
}

// broken stops the helper after a failed exchange; h.mu is held.
func (h *PortHelper) broken() {
	h.state.Lock()
	defer h.state.Unlock()
	h.stopLocked()
}

// Dial returns a socket connected to addr ("tcp" or "udp") inside the
// namespace, as a file owned by the caller.
func (h *PortHelper) Dial(network string, addr netip.AddrPort) (*os.File, error) {
	return h.request(dialRequest{Network: network, Addr: addr.String()})
}

// Listen returns a socket bound to addr inside the namespace: a TCP
// listener ("tcp") or a datagram socket ("udp"), as a file owned by the
// caller. It keeps serving that namespace's address from our own.
func (h *PortHelper) Listen(network string, addr netip.AddrPort) (*os.File, error) {
	return h.request(dialRequest{Network: network, Addr: addr.String(), Op: opListen})
}

// OpenProcNet opens /proc/net/NAME (tcp, tcp6, udp or udp6) of the
// namespace. Reading the file again from its start lists the namespace's
// sockets as they are then.
func (h *PortHelper) OpenProcNet(name string) (*os.File, error) {
	return h.request(dialRequest{Network: name, Op: opProc})
}

const (
	opListen  = "listen"
	opProc    = "proc"
	opSockets = "sockets"
)

func (h *PortHelper) request(req dialRequest) (*os.File, error) {
	files, err := h.exchange(req, 1)
	if err != nil {
		return nil, err
	}
	return files[0], nil
}

// exchange sends req and returns the nfiles sockets of its answer.
func (h *PortHelper) exchange(req dialRequest, nfiles int) ([]*os.File, error) {
	network, addr := req.Network, req.Addr
	h.mu.Lock()
	defer h.mu.Unlock()
	if err := h.start(); err != nil {
		return nil, err
	}
	if err := h.ch.conn.SetDeadline(time.Now().Add(dialTimeout + time.Second)); err != nil {
		return nil, err
	}
	if err := h.ch.send(message{Kind: kindDial, Dial: &req}); err != nil {
		h.broken()
		return nil, fmt.Errorf("port helper: %w", err)
	}
	m, files, err := h.ch.recv(kindDialed)
	if err != nil {
		h.broken()
		return nil, fmt.Errorf("port helper: %w", err)
	}
	if m.Dialed == nil || m.Dialed.Error != "" || len(files) != nfiles {
		for _, f := range files {
			f.Close()
		}
		reason := errors.New("no socket")
		if m.Dialed != nil && m.Dialed.Error != "" {
			reason = helperError{m.Dialed.Error, unix.Errno(m.Dialed.Errno)}
		}
		return nil, fmt.Errorf("%s %s %s in the namespace: %w", opName(req.Op), network, addr, reason)
	}
	return files, nil
}

// helperError is the helper's error as it said it, with its system call's
// errno (0: none) for errors.Is.
type helperError struct {
	msg   string
	errno unix.Errno
}

func (e helperError) Error() string { return e.msg }

func (e helperError) Unwrap() error {
	if e.errno == 0 {
		return nil
	}
	return e.errno
}

// Close stops the helper and waits for it.
func (h *PortHelper) Close() error {
	h.state.Lock()
	started, closed := h.started, h.closed
	conn, cmd, done := h.ch.conn, h.cmd, h.done
	h.closed = true
	h.state.Unlock()
	if !started || closed {
		return nil
	}
	conn.Close()
	if done == nil {
		// Adopted: it exits once it sees the connection end.
		return nil
	}
	select {
	case <-done:
	case <-time.After(time.Second):
		_ = cmd.Process.Kill()
		<-done
	}
	return nil
}

// servePorts is the helper's side: dial what is asked, send the socket,
// until the parent hangs up.
func servePorts(ch channel) error {
	var in inboundServer
	for {
		m, _, err := ch.recv(kindDial)
		if errors.Is(err, io.EOF) || errors.Is(err, errChannelClosed) {
			return nil
		}
		if err != nil {
			return err
		}
		if m.Dial == nil {
			return errors.New("dial message without body")
		}
		files, derr := serveRequest(*m.Dial, &in)
		if derr != nil {
			res := &dialResult{Error: derr.Error()}
			var errno unix.Errno
			if errors.As(derr, &errno) {
				res.Errno = int(errno)
			}
			if err := ch.send(message{Kind: kindDialed, Dialed: res}); err != nil {
				return err
			}
			continue
		}
		err = ch.send(message{Kind: kindDialed, Dialed: &dialResult{}}, files...)
		for _, f := range files {
			f.Close()
		}
		if err != nil {
			return err
		}
	}
}

func opName(op string) string {
	if op == "" {
		return "dial"
	}
	return op
}

// procNetFiles are the files OpenProcNet may open.
var procNetFiles = map[string]bool{"tcp": true, "tcp6": true, "udp": true, "udp6": true}

func serveRequest(r dialRequest, in *inboundServer) ([]*os.File, error) {
	var f *os.File
	var err error
	switch r.Op {
	case opSockets:
		return in.sockets(r)
	case "":
		f, err = dialFile(r.Network, r.Addr)
	case opListen:
		f, err = listenFile(r.Network, r.Addr)
	case opProc:
		if !procNetFiles[r.Network] {
			return nil, fmt.Errorf("proc file %q", r.Network)
		}
		f, err = os.Open("/proc/self/net/" + r.Network)
	default:
		return nil, fmt.Errorf("operation %q", r.Op)
	}
	if err != nil {
		return nil, err
	}
	return []*os.File{f}, nil
}

func listenFile(network, addr string) (*os.File, error) {
	switch network {
	case "tcp", "tcp4", "tcp6":
		ln, err := net.Listen(network, addr)
		if err != nil {
			return nil, err
		}
		defer ln.Close()
		return ln.(*net.TCPListener).File()
	case "udp", "udp4", "udp6":
		pc, err := net.ListenPacket(network, addr)
		if err != nil {
			return nil, err
		}
		defer pc.Close()
		return pc.(*net.UDPConn).File()
	}
	return nil, fmt.Errorf("network %q", network)
}

func dialFile(network, addr string) (*os.File, error) {
	if network != "tcp" && network != "udp" {
		return nil, fmt.Errorf("network %q", network)
	}
	c, err := net.DialTimeout(network, addr, dialTimeout)
	if err != nil {
		return nil, err
	}
	defer c.Close()
	switch c := c.(type) {
	case *net.TCPConn:
		return c.File()
	case *net.UDPConn:
		return c.File()
	}
	return nil, fmt.Errorf("unexpected connection %T", c)
}
