// Package engine runs the userspace stack in its own sandboxed process and
// lets netns-run's privileged parent (port helpers, published ports, the
// API) use it: the parent keeps everything that needs the user's rights,
// the engine (launcher.StartEngine) keeps the TAP and the stack.
//
// They talk over one SOCK_SEQPACKET socketpair, one JSON object per
// message, descriptors as SCM_RIGHTS:
//
//	parent -> engine  tap   name          + TAP queues   once the namespace is up
//	engine -> parent  ready | failed                     once, after setup
//	parent -> engine  tcp   guest         + host socket  forward a published TCP connection
//	parent -> engine  udp   client, guest + socket       a published UDP flow (one end of a datagram socketpair)
//	parent -> engine  info | stats  id
//	parent -> engine  egress_get | egress_add (verdict, rule) | egress_remove (rule_id)  id
//	engine -> parent  result  id, result | error
//
// The parent's hang-up ends the engine; the engine's hang-up (a crash)
// tells the parent, which then ends the command with an error.
package engine

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/netns-run/netns-run/netstack"
	"github.com/netns-run/netns-run/tap"
)

// Spec is what the engine process is given besides its descriptors, which
// are, in order: the control socket, the pcap file if Pcap, the egress
// decision log if EgressLog, and the egress rules (egress.RulesFile) if
// EgressRules: Net.Egress.Rules stays empty, as thousands of rules would
// not fit in the environment. The TAP comes later, over the control
// socket: the engine starts while the namespace is being set up.
type Spec struct {
	Net         netstack.Config `json:"net"`
	Pcap        bool            `json:"pcap"`
	PcapMaxSize int64           `json:"pcap_max_size"`
	// EgressLog: a descriptor for the egress policy's decision log
	// follows; EgressLogStderr: the log goes to stderr instead.
	EgressLog       bool `json:"egress_log"`
	EgressLogStderr bool `json:"egress_log_stderr"`
	EgressRules     bool `json:"egress_rules"`
	// Debug and LogFormat configure the engine's logger (its stderr is
	// the parent's); Debug also has the kernel log refused system calls.
	Debug     bool   `json:"debug"`
	LogFormat string `json:"log_format"`
}

type op string

const (
	opTap    op = "tap"
	opReady  op = "ready"
	opFailed op = "failed"
	opTCP    op = "tcp"
	opUDP    op = "udp"
	opInfo   op = "info"
	opStats  op = "stats"
	opResult op = "result"

	opEgressGet    op = "egress_get"
	opEgressAdd    op = "egress_add"
	opEgressRemove op = "egress_remove"
)

// message is every message both ways; Op says which fields matter.
type message struct {
	Op     op              `json:"op"`
	ID     uint64          `json:"id,omitempty"`
	Name   string          `json:"name,omitempty"`
	Client netip.AddrPort  `json:"client,omitzero"`
	Guest  netip.AddrPort  `json:"guest,omitzero"`
	Error  string          `json:"error,omitempty"`
	Result json.RawMessage `json:"result,omitempty"`
	// The egress requests' arguments.
	Verdict string `json:"verdict,omitempty"`
	Rule    string `json:"rule,omitempty"`
	RuleID  int    `json:"rule_id,omitempty"`
	// Listener: the TAP queues of an opTap message are followed by the
	// kernel TCP path's listener (netstack.Config.KernelTCP); NAT: then
	// by its netlink socket (netstack.Config.KernelTCPNAT).
	Listener bool `json:"listener,omitempty"`
	NAT      bool `json:"nat,omitempty"`
	// Large: the result did not fit in a message (thousands of egress
	// rules, an audit's suggestions); it comes through the pipe whose
	// read end is attached (file, on the receiving side).
	Large bool     `json:"large,omitempty"`
	file  *os.File `json:"-"`
}

// A result longer than maxInline goes through a pipe; maxLarge bounds
// what the parent reads from one.
const (
	maxInline = 32 << 10
	maxLarge  = 64 << 20
)

// maxMessage bounds one control message (get_stats is the largest).
const maxMessage = 64 << 10

var errHangup = errors.New("control connection closed")

// send writes m with fds attached. The caller keeps them.
func send(c *net.UnixConn, m message, fds ...int) error {
	b, err := json.Marshal(m)
	if err != nil {
		return fmt.Errorf("encode %s: %w", m.Op, err)
	}
	var oob []byte
	if len(fds) > 0 {
		oob = unix.UnixRights(fds...)
	}
	if _, _, err := c.WriteMsgUnix(b, oob, nil); err != nil {
		return fmt.Errorf("send %s: %w", m.Op, err)
	}
	return nil
}

// sendConn sends m with the descriptor of sc (a socket) attached.
func sendConn(c *net.UnixConn, m message, sc syscall.Conn) error {
	rc, err := sc.SyscallConn()
	if err != nil {
		return err
	}
	var serr error
	if err := rc.Control(func(fd uintptr) { serr = send(c, m, int(fd)) }); err != nil {
		return err
	}
	return serr
}

// recv reads one message and the descriptor that came with it, if any.
func recv(c *net.UnixConn) (message, *os.File, error) {
	m, files, err := recvFiles(c)
	var f *os.File
	for i, extra := range files {
		if i == 0 {
			f = extra
		} else {
			extra.Close()
		}
	}
	return m, f, err
}

// recvFiles reads one message and the descriptors that came with it.
func recvFiles(c *net.UnixConn) (message, []*os.File, error) {
	var m message
	files, err := tap.RecvJSON(c, maxMessage, &m)
	if errors.Is(err, io.EOF) {
		return message{}, nil, errHangup
	}
	if err != nil {
		return message{}, nil, fmt.Errorf("control message: %w", err)
	}
	return m, files, nil
}

// datagramConn is one end of a SOCK_SEQPACKET socketpair carrying a UDP
// flow's datagrams, one per record. Go reads an empty record as end of
// file; an empty datagram is legitimate, so Read tells them apart by
// asking whether the peer has hung up.
type datagramConn struct {
	*net.UnixConn
	rc syscall.RawConn
}

func newDatagramConn(c *net.UnixConn) (*datagramConn, error) {
	rc, err := c.SyscallConn()
	if err != nil {
		c.Close()
		return nil, err
	}
	return &datagramConn{UnixConn: c, rc: rc}, nil
}

// Read reads one datagram (truncated to b, like UDP); io.EOF once the peer
// has closed its end and nothing is left.
func (d *datagramConn) Read(b []byte) (int, error) {
	var n int
	var rerr error
	err := d.rc.Read(func(fd uintptr) bool {
		n, rerr = unix.Read(int(fd), b)
		if errors.Is(rerr, unix.EAGAIN) {
			return false
		}
		if rerr == nil && n == 0 && peerClosed(int(fd)) {
			rerr = io.EOF
		}
		return true
	})
	if err != nil {
		return 0, err
	}
	if n < 0 {
		n = 0
	}
	return n, rerr
}

func peerClosed(fd int) bool {
	p := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLRDHUP}}
	if _, err := unix.Poll(p, 0); err != nil {
		return true
	}
	return p[0].Revents&(unix.POLLRDHUP|unix.POLLHUP|unix.POLLERR) != 0
}
