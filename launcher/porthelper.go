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
)

// PortHelper is a process inside a namespace that opens connections there
// on request and hands the connected sockets back: the child half of the
// builtin port driver, as in rootlesskit. The parent then copies between two
// kernel sockets, so published ports run at kernel speed.
type PortHelper struct {
	mu   sync.Mutex // one request at a time on the channel
	ch   channel
	cmd  *exec.Cmd
	done chan struct{}
}

// dialTimeout bounds one connect inside the namespace (to its loopback or
// own address, so normally instant).
const dialTimeout = 10 * time.Second

// StartPortHelper starts the helper in the target's namespaces; Close
// stops it.
func StartPortHelper(t Target) (*PortHelper, error) {
	// Not tied to ctx: the helper lives until Close, which the caller
	// does after the flows that use it have ended.
	cmd, conn, err := startHelperIn(context.Background(), t)
	if err != nil {
		return nil, fmt.Errorf("start port helper: %w", err)
	}
	h := &PortHelper{ch: channel{conn: conn}, cmd: cmd, done: make(chan struct{})}
	go func() {
		defer close(h.done)
		_ = cmd.Wait()
	}()
	if err := h.ch.send(message{Kind: kindConfig, Config: &childConfig{Ports: true}}); err != nil {
		h.Close()
		return nil, fmt.Errorf("start port helper: %w", err)
	}
	return h, nil
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
	opListen = "listen"
	opProc   = "proc"
)

func (h *PortHelper) request(req dialRequest) (*os.File, error) {
	network, addr := req.Network, req.Addr
	h.mu.Lock()
	defer h.mu.Unlock()
	if err := h.ch.conn.SetDeadline(time.Now().Add(dialTimeout + time.Second)); err != nil {
		return nil, err
	}
	if err := h.ch.send(message{Kind: kindDial, Dial: &req}); err != nil {
		return nil, fmt.Errorf("port helper: %w", err)
	}
	m, files, err := h.ch.recv(kindDialed)
	if err != nil {
		return nil, fmt.Errorf("port helper: %w", err)
	}
	if m.Dialed == nil || m.Dialed.Error != "" || len(files) != 1 {
		for _, f := range files {
			f.Close()
		}
		reason := "no socket"
		if m.Dialed != nil && m.Dialed.Error != "" {
			reason = m.Dialed.Error
		}
		return nil, fmt.Errorf("%s %s %s in the namespace: %s", opName(req.Op), network, addr, reason)
	}
	return files[0], nil
}

// Close stops the helper and waits for it.
func (h *PortHelper) Close() error {
	h.ch.conn.Close()
	select {
	case <-h.done:
	case <-time.After(time.Second):
		_ = h.cmd.Process.Kill()
		<-h.done
	}
	return nil
}

// servePorts is the helper's side: dial what is asked, send the socket,
// until the parent hangs up.
func servePorts(ch channel) error {
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
		f, derr := serveRequest(*m.Dial)
		if derr != nil {
			if err := ch.send(message{Kind: kindDialed, Dialed: &dialResult{Error: derr.Error()}}); err != nil {
				return err
			}
			continue
		}
		err = ch.send(message{Kind: kindDialed, Dialed: &dialResult{}}, f)
		f.Close()
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

func serveRequest(r dialRequest) (*os.File, error) {
	switch r.Op {
	case "":
		return dialFile(r.Network, r.Addr)
	case opListen:
		return listenFile(r.Network, r.Addr)
	case opProc:
		if !procNetFiles[r.Network] {
			return nil, fmt.Errorf("proc file %q", r.Network)
		}
		return os.Open("/proc/self/net/" + r.Network)
	}
	return nil, fmt.Errorf("operation %q", r.Op)
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
