package engine

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/signal"
	"sync"

	"golang.org/x/sys/unix"

	"github.com/netns-run/netns-run/launcher"
	"github.com/netns-run/netns-run/netstack"
	"github.com/netns-run/netns-run/netstack/egress"
	"github.com/netns-run/netns-run/tap"
)

// Main is the engine process: files and spec are what launcher.EngineSetup
// returned (setupErr its error), log its logger. It waits for the TAP, sets
// the stack up on it, confines itself to the steady state's system calls,
// reports ready and serves the parent until the parent hangs up. It
// returns the exit code.
func Main(files []*os.File, spec Spec, setupErr error, log *slog.Logger) int {
	// It ends when its parent says so or dies, not on signals meant for
	// the parent's process group; and a write to a terminal it does not
	// own must not stop it.
	signal.Ignore(unix.SIGINT, unix.SIGTERM, unix.SIGHUP, unix.SIGQUIT, unix.SIGTSTP, unix.SIGTTIN, unix.SIGTTOU)
	if len(files) == 0 {
		fmt.Fprintln(os.Stderr, "network engine: no control socket")
		return 1
	}
	ctrl, err := tap.UnixConn(files[0])
	if err != nil {
		fmt.Fprintf(os.Stderr, "network engine: control socket: %v\n", err)
		return 1
	}
	defer ctrl.Close()
	fail := func(err error) int {
		_ = send(ctrl, message{Op: opFailed, Error: err.Error()})
		return 1
	}
	for _, f := range files[1:] {
		defer f.Close()
	}
	if setupErr != nil {
		return fail(setupErr)
	}
	if want := 1 + btoi(spec.Pcap) + btoi(spec.EgressLog) + btoi(spec.EgressRules); len(files) != want {
		return fail(fmt.Errorf("network engine: got %d descriptors, want %d", len(files), want))
	}
	var pcap, egressLog *os.File
	next := files[1:]
	if spec.Pcap {
		pcap, next = next[0], next[1:]
	}
	if spec.EgressLog {
		egressLog, next = next[0], next[1:]
	}
	if spec.EgressRules {
		rules, err := egress.ReadRulesFile(next[0])
		if err != nil {
			return fail(fmt.Errorf("network engine: %w", err))
		}
		spec.Net.Egress.Rules = rules
	}
	dev, tcpListener, tcpNAT, err := awaitTap(ctrl)
	if errors.Is(err, errHangup) {
		return 0 // the namespace never came up; the parent says why
	}
	if err != nil {
		return fail(err)
	}
	cfg := spec.Net
	cfg.Logger = log
	cfg.KernelTCP, cfg.KernelTCPNAT = tcpListener, tcpNAT
	if pcap != nil {
		cfg.Capture = netstack.NewCaptureWriter(pcap, spec.PcapMaxSize, log)
	}
	// The engine's stderr is its parent's.
	cfg.Egress.Log, cfg.Egress.Notices = nil, nil
	switch {
	case egressLog != nil:
		cfg.Egress.Log = egressLog
	case spec.EgressLogStderr:
		cfg.Egress.Log = os.Stderr
	default:
		cfg.Egress.Notices = os.Stderr
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	stack, err := netstack.New(ctx, cfg, dev)
	if err != nil {
		return fail(err)
	}
	e := &server{ctx: ctx, stack: stack, ctrl: ctrl, log: log}
	defer func() {
		// The stack first: it ends the flows, which the group waits for.
		cancel()
		stack.Close()
		e.flows.Wait()
	}()
	// Setup is over: from here on only the steady state's system calls.
	if err := launcher.LoadSeccomp(spec.Debug); err != nil {
		return fail(err)
	}
	if err := send(ctrl, message{Op: opReady}); err != nil {
		return 1
	}
	if err := e.serve(); !errors.Is(err, errHangup) {
		log.Warn("network engine: control connection", "err", err)
	}
	return 0
}

// awaitTap waits for the parent to hand over the TAP queues, and the
// kernel TCP path's descriptors after them if the message says so.
func awaitTap(ctrl *net.UnixConn) (dev tap.Device, ln, nat *os.File, err error) {
	m, files, err := recvFiles(ctrl)
	if err != nil {
		return nil, nil, nil, err
	}
	if m.Op != opTap || (m.NAT && !m.Listener) || len(files) < 1+btoi(m.Listener)+btoi(m.NAT) {
		for _, f := range files {
			f.Close()
		}
		return nil, nil, nil, fmt.Errorf("network engine: got %q with %d descriptors, want the TAP", m.Op, len(files))
	}
	if m.NAT {
		nat, files = files[len(files)-1], files[:len(files)-1]
	}
	if m.Listener {
		ln, files = files[len(files)-1], files[:len(files)-1]
	}
	return tap.FromFiles(m.Name, files), ln, nat, nil
}

func btoi(b bool) int {
	if b {
		return 1
	}
	return 0
}

// server is the engine's side of the control connection.
type server struct {
	ctx   context.Context
	stack *netstack.Stack
	ctrl  *net.UnixConn
	log   *slog.Logger
	flows sync.WaitGroup
}

// serve answers the parent until it hangs up (errHangup) or breaks the
// protocol.
func (e *server) serve() error {
	for {
		m, f, err := recv(e.ctrl)
		if err != nil {
			return err
		}
		switch m.Op {
		case opTCP:
			e.forwardTCP(m, f)
		case opUDP:
			e.forwardUDP(m, f)
		case opInfo, opStats, opEgressGet, opEgressAdd, opEgressRemove:
			if f != nil {
				f.Close()
			}
			if err := e.report(m); err != nil {
				return err
			}
		default:
			if f != nil {
				f.Close()
			}
			return fmt.Errorf("unknown request %q", m.Op)
		}
	}
}

func (e *server) report(m message) error {
	var v any
	var err error
	switch m.Op {
	case opInfo:
		v = e.stack.Info()
	case opStats:
		v = e.stack.Stats()
	case opEgressGet:
		v, err = e.stack.EgressPolicy()
	case opEgressAdd:
		var id int
		id, err = e.stack.AddEgressRule(m.Verdict, m.Rule)
		v = map[string]int{"id": id}
	case opEgressRemove:
		err = e.stack.RemoveEgressRule(m.RuleID)
		v = struct{}{}
	}
	reply := message{Op: opResult, ID: m.ID}
	var b []byte
	if err == nil {
		b, err = json.Marshal(v)
	}
	switch {
	case err != nil:
		reply.Error = err.Error()
	case len(b) > maxInline:
		return e.sendLarge(reply, b)
	default:
		reply.Result = b
	}
	return send(e.ctrl, reply)
}

// sendLarge sends reply with its result b through a pipe: a control
// message holds 64 KiB at most, and one too long for the socket's buffer
// would end the engine.
func (e *server) sendLarge(reply message, b []byte) error {
	r, w, err := os.Pipe()
	if err != nil {
		reply.Error = fmt.Sprintf("result of %d bytes: %v", len(b), err)
		return send(e.ctrl, reply)
	}
	reply.Large = true
	err = send(e.ctrl, reply, int(r.Fd()))
	r.Close()
	if err != nil {
		w.Close()
		return err
	}
	// The parent reads while this writes; a parent that gave up closes
	// its end, and the write fails.
	go func() {
		defer w.Close()
		_, _ = w.Write(b)
	}()
	return nil
}

// forwardTCP relays a published connection the parent accepted into the
// guest.
func (e *server) forwardTCP(m message, f *os.File) {
	if f == nil {
		e.log.Warn("network engine: tcp request without a socket")
		return
	}
	c, err := net.FileConn(f)
	f.Close()
	if err != nil {
		e.log.Warn("network engine: published tcp connection", "err", err)
		return
	}
	tc, ok := c.(*net.TCPConn)
	if !ok {
		c.Close()
		e.log.Warn("network engine: published tcp connection is not TCP", "type", fmt.Sprintf("%T", c))
		return
	}
	e.flows.Add(1)
	go func() {
		defer e.flows.Done()
		if err := e.stack.ForwardTCP(tc, m.Guest); err != nil {
			e.log.Debug("published tcp connection", "guest", m.Guest, "err", err)
		}
	}()
}

// forwardUDP relays the datagrams of one published UDP flow between the
// parent's socketpair and the guest.
func (e *server) forwardUDP(m message, f *os.File) {
	if f == nil {
		e.log.Warn("network engine: udp request without a socket")
		return
	}
	uc, err := tap.UnixConn(f)
	if err != nil {
		e.log.Warn("network engine: published udp flow", "err", err)
		return
	}
	host, err := newDatagramConn(uc)
	if err != nil {
		e.log.Warn("network engine: published udp flow", "err", err)
		return
	}
	guest, err := e.stack.DialGuestUDP(m.Client, m.Guest)
	if err != nil {
		// Closing the parent's peer ends its flow.
		host.Close()
		e.log.Debug("published udp flow", "client", m.Client, "guest", m.Guest, "err", err)
		return
	}
	e.flows.Add(1)
	go func() {
		defer e.flows.Done()
		relayDatagrams(e.ctx, host, guest)
	}()
}

// relayDatagrams copies datagrams both ways until either side ends (the
// parent closes its end when the flow goes idle) or ctx does.
func relayDatagrams(ctx context.Context, host *datagramConn, guest net.Conn) {
	var once sync.Once
	closeBoth := func() {
		once.Do(func() {
			host.Close()
			guest.Close()
		})
	}
	stop := context.AfterFunc(ctx, closeBoth)
	defer stop()
	pump := func(dst, src net.Conn) {
		buf := make([]byte, 65535)
		for {
			n, err := src.Read(buf)
			if err != nil {
				return
			}
			if _, err := dst.Write(buf[:n]); err != nil {
				return
			}
		}
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		pump(guest, host)
		closeBoth()
	}()
	pump(host, guest)
	closeBoth()
	<-done
}
