package engine

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"

	"github.com/netns-run/netns-run/launcher"
	"github.com/netns-run/netns-run/netstack"
	"github.com/netns-run/netns-run/netstack/egress"
	"github.com/netns-run/netns-run/portfwd"
	"github.com/netns-run/netns-run/tap"
)

const (
	// startTimeout bounds the engine's setup (normally milliseconds).
	startTimeout = 30 * time.Second
	// requestTimeout bounds an info or stats request.
	requestTimeout = 5 * time.Second
)

// Client is the parent's handle on a running engine: the Guest that
// published ports forward into, and the source of the API's info and
// stats. Its methods are safe for concurrent use.
type Client struct {
	conn *net.UnixConn
	proc *launcher.EngineProcess
	log  *slog.Logger

	mu      sync.Mutex
	nextID  uint64
	pending map[uint64]chan message
	gone    bool

	started   atomic.Bool // Attach succeeded: the reader runs
	closing   atomic.Bool
	closeOnce sync.Once
	closeErr  error
	failed    chan error    // one error if the engine ends on its own
	done      chan struct{} // closed when the reader has ended
}

var _ portfwd.Guest = (*Client)(nil)

// Start starts the engine process; Attach gives it the TAP. Starting it
// first lets its exec and runtime start-up overlap the namespace's set-up.
// pcap (nil: no capture) and egressLog (nil: none) go to the engine; the
// caller keeps its copies.
func Start(spec Spec, pcap, egressLog *os.File, log *slog.Logger) (*Client, error) {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	pair, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_SEQPACKET|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("start network engine: socketpair: %w", err)
	}
	theirs := os.NewFile(uintptr(pair[1]), "engine-control")
	defer theirs.Close()
	conn, err := tap.UnixConn(os.NewFile(uintptr(pair[0]), "engine-control"))
	if err != nil {
		return nil, fmt.Errorf("start network engine: %w", err)
	}
	files := []*os.File{theirs}
	if spec.Pcap = pcap != nil; spec.Pcap {
		files = append(files, pcap)
	}
	if spec.EgressLog = egressLog != nil; spec.EgressLog {
		files = append(files, egressLog)
	}
	if spec.EgressRules = len(spec.Net.Egress.Rules) > 0; spec.EgressRules {
		rules, err := egress.RulesFile(spec.Net.Egress.Rules)
		if err != nil {
			conn.Close()
			return nil, fmt.Errorf("start network engine: %w", err)
		}
		defer rules.Close()
		spec.Net.Egress.Rules = nil
		files = append(files, rules)
	}
	proc, err := launcher.StartEngine(spec, files...)
	if err != nil {
		conn.Close()
		return nil, err
	}
	return &Client{conn: conn, proc: proc, log: log, pending: map[uint64]chan message{},
		failed: make(chan error, 1), done: make(chan struct{})}, nil
}

// Attach hands dev over to the engine and returns once the engine serves
// it. dev is closed here: only the engine holds the TAP from now on.
func (c *Client) Attach(dev tap.Device, tcpListener, tcpNAT *os.File) error {
	defer dev.Close()
	fds := make([]int, 0, len(dev.Queues())+2)
	for _, q := range dev.Queues() {
		fds = append(fds, int(q.Fd()))
	}
	m := message{Op: opTap, Name: dev.Name()}
	if tcpNAT != nil {
		defer tcpNAT.Close()
	}
	if tcpListener != nil {
		defer tcpListener.Close()
		m.Listener = true
		fds = append(fds, int(tcpListener.Fd()))
		if tcpNAT != nil {
			m.NAT = true
			fds = append(fds, int(tcpNAT.Fd()))
		}
	}
	if err := send(c.conn, m, fds...); err != nil {
		return fmt.Errorf("network engine: %w", c.exitReason(err))
	}
	if err := c.awaitReady(); err != nil {
		return err
	}
	c.started.Store(true)
	go c.read()
	return nil
}

func (c *Client) awaitReady() error {
	if err := c.conn.SetReadDeadline(time.Now().Add(startTimeout)); err != nil {
		return err
	}
	m, f, err := recv(c.conn)
	if f != nil {
		f.Close()
	}
	if err != nil {
		return fmt.Errorf("network engine: %w", c.exitReason(err))
	}
	switch m.Op {
	case opReady:
		return c.conn.SetReadDeadline(time.Time{})
	case opFailed:
		return fmt.Errorf("network engine: %s", m.Error)
	}
	return fmt.Errorf("network engine: unexpected %q message", m.Op)
}

// exitReason says why the engine went away: its exit status if it exited
// (waiting a moment for it), else err.
func (c *Client) exitReason(err error) error {
	select {
	case <-c.proc.Done():
		if perr := c.proc.Err(); perr != nil {
			return fmt.Errorf("exited: %w", perr)
		}
		return errors.New("exited")
	case <-time.After(time.Second):
		return err
	}
}

// read delivers replies until the engine hangs up.
func (c *Client) read() {
	defer close(c.done)
	var err error
	for {
		var m message
		var f *os.File
		m, f, err = recv(c.conn)
		if f != nil && m.Large && err == nil {
			m.file = f
		} else if f != nil {
			f.Close()
		}
		if err != nil {
			break
		}
		c.mu.Lock()
		ch, ok := c.pending[m.ID]
		delete(c.pending, m.ID)
		c.mu.Unlock()
		if ok {
			ch <- m
		} else if m.file != nil {
			m.file.Close()
		}
	}
	c.mu.Lock()
	c.gone = true
	for id, ch := range c.pending {
		close(ch)
		delete(c.pending, id)
	}
	c.mu.Unlock()
	if !c.closing.Load() {
		c.failed <- fmt.Errorf("network engine (PID %d): %w", c.proc.Pid(), c.exitReason(err))
	}
}

// Failed delivers an error if the engine ends without being closed (it
// crashed or was killed); the network is gone then.
func (c *Client) Failed() <-chan error { return c.failed }

// Close stops the engine (it closes the stack, ending every flow) and waits
// for it. Closing again does nothing.
func (c *Client) Close() error {
	c.closeOnce.Do(func() {
		c.closing.Store(true)
		c.conn.Close()
		if err := c.proc.Stop(); err != nil {
			c.closeErr = fmt.Errorf("network engine: %w", err)
		}
		if c.started.Load() {
			<-c.done
		}
	})
	return c.closeErr
}

// ForwardTCP implements portfwd.Guest: the engine takes the connection
// over and relays it into the guest.
func (c *Client) ForwardTCP(conn *net.TCPConn, guest netip.AddrPort) error {
	defer conn.Close()
	if err := sendConn(c.conn, message{Op: opTCP, Guest: guest}, conn); err != nil {
		_ = conn.SetLinger(0)
		return fmt.Errorf("network engine: %w", err)
	}
	return nil
}

// DialGuestUDP implements portfwd.Guest: the flow's datagrams go through a
// socketpair whose other end the engine relays to guest.
func (c *Client) DialGuestUDP(client, guest netip.AddrPort) (net.Conn, error) {
	pair, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_SEQPACKET|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("network engine: socketpair: %w", err)
	}
	theirs := os.NewFile(uintptr(pair[1]), "udp-flow")
	ours, err := tap.UnixConn(os.NewFile(uintptr(pair[0]), "udp-flow"))
	if err != nil {
		theirs.Close()
		return nil, fmt.Errorf("network engine: %w", err)
	}
	err = send(c.conn, message{Op: opUDP, Client: client, Guest: guest}, pair[1])
	theirs.Close()
	if err != nil {
		ours.Close()
		return nil, fmt.Errorf("network engine: %w", err)
	}
	return newDatagramConn(ours)
}

// EgressPolicy implements portfwd.Egress.
func (c *Client) EgressPolicy() (any, error) {
	raw, err := c.request(message{Op: opEgressGet})
	return raw, err
}

// AddEgressRule implements portfwd.Egress.
func (c *Client) AddEgressRule(verdict, rule string) (int, error) {
	raw, err := c.request(message{Op: opEgressAdd, Verdict: verdict, Rule: rule})
	if err != nil {
		return 0, err
	}
	var r struct {
		ID int `json:"id"`
	}
	if err := json.Unmarshal(raw, &r); err != nil {
		return 0, fmt.Errorf("network engine: %w", err)
	}
	return r.ID, nil
}

// RemoveEgressRule implements portfwd.Egress.
func (c *Client) RemoveEgressRule(id int) error {
	_, err := c.request(message{Op: opEgressRemove, RuleID: id})
	return err
}

// Info is get_info's network part, as the engine reports it.
func (c *Client) Info() any {
	raw, err := c.request(message{Op: opInfo})
	if err != nil {
		return map[string]string{"error": err.Error()}
	}
	return raw
}

// Stats is get_stats, with the engine's descriptors and memory read from
// its /proc entry here (the engine has no /proc).
func (c *Client) Stats() any {
	raw, err := c.request(message{Op: opStats})
	if err != nil {
		return map[string]string{"error": err.Error()}
	}
	var st netstack.Stats
	if err := json.Unmarshal(raw, &st); err != nil {
		return map[string]string{"error": err.Error()}
	}
	st.Process.FDs, st.Process.RSSKiB = netstack.Footprint(strconv.Itoa(c.proc.Pid()))
	return st
}

// request sends m (its ID set here) and waits for the engine's result.
func (c *Client) request(m message) (json.RawMessage, error) {
	ch := make(chan message, 1)
	c.mu.Lock()
	if c.gone {
		c.mu.Unlock()
		return nil, errors.New("network engine: not running")
	}
	c.nextID++
	id := c.nextID
	c.pending[id] = ch
	c.mu.Unlock()
	forget := func() {
		c.mu.Lock()
		delete(c.pending, id)
		c.mu.Unlock()
	}
	m.ID = id
	if err := send(c.conn, m); err != nil {
		forget()
		return nil, fmt.Errorf("network engine: %w", err)
	}
	select {
	case r, ok := <-ch:
		if !ok {
			return nil, errors.New("network engine: not running")
		}
		if r.Error != "" {
			return nil, errors.New(r.Error)
		}
		if r.Large {
			return readLarge(r.file)
		}
		return r.Result, nil
	case <-time.After(requestTimeout):
		forget()
		return nil, fmt.Errorf("network engine: no answer to %s within %v", m.Op, requestTimeout)
	}
}

// readLarge reads a result the engine sent through a pipe (message.Large),
// and closes f.
func readLarge(f *os.File) (json.RawMessage, error) {
	if f == nil {
		return nil, errors.New("network engine: a large result without its pipe")
	}
	// A pollable copy, for the deadline: a descriptor that came over a
	// socket is blocking, and an engine stuck before its end of the
	// pipe closed would hold this caller for good.
	fd, err := unix.FcntlInt(f.Fd(), unix.F_DUPFD_CLOEXEC, 0)
	f.Close()
	if err != nil {
		return nil, fmt.Errorf("network engine: a large result: %w", err)
	}
	if err := unix.SetNonblock(fd, true); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("network engine: a large result: %w", err)
	}
	p := os.NewFile(uintptr(fd), "engine-result")
	defer p.Close()
	_ = p.SetReadDeadline(time.Now().Add(requestTimeout))
	b, err := io.ReadAll(io.LimitReader(p, maxLarge+1))
	switch {
	case err != nil:
		return nil, fmt.Errorf("network engine: reading a large result: %w", err)
	case len(b) > maxLarge:
		return nil, fmt.Errorf("network engine: a result over %d bytes", maxLarge)
	}
	return b, nil
}
