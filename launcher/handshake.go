package launcher

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"

	"github.com/netns-run/netns-run/tap"
)

// The parent and the re-executed child talk over a SOCK_SEQPACKET socketpair:
// every message is one datagram holding one JSON object, so no framing is
// needed and a short read is an error rather than a partial message.
//
//	parent -> child   childConfig
//	child  -> parent  tapReady (+ TAP queue fds)   or  childFailure
//	parent -> child   proceed                      (or the socket closes)
//	child             execs CMD: the socket closes with the exec, or
//	child  -> parent  childFailure (CMD could not be run)
//
// With --pid the child execs init instead, which keeps the socket:
//
//	init   -> parent  started (CMD runs), then stopped at each job-control
//	                  stop of CMD
const maxMessage = 64 << 10

type messageKind string

const (
	kindConfig  messageKind = "config"
	kindTap     messageKind = "tap"
	kindFailure messageKind = "failure"
	kindProceed messageKind = "proceed"
	kindDial    messageKind = "dial"
	kindDialed  messageKind = "dialed"
	kindStarted messageKind = "started"
	kindStopped messageKind = "stopped"
)

// message is the envelope of every datagram; exactly one body field is set,
// matching Kind.
type message struct {
	Kind    messageKind   `json:"kind"`
	Config  *childConfig  `json:"config,omitempty"`
	Tap     *tapReady     `json:"tap,omitempty"`
	Failure *childFailure `json:"failure,omitempty"`
	Dial    *dialRequest  `json:"dial,omitempty"`
	Dialed  *dialResult   `json:"dialed,omitempty"`
}

// dialRequest asks the port helper for a socket connected to Addr inside
// the namespace; the answer carries it as SCM_RIGHTS.
type dialRequest struct {
	Network string `json:"network"`
	Addr    string `json:"addr"`
	// Op is what to do: "" dials Addr; "listen" binds Addr (a listener
	// or datagram socket); "proc" opens /proc/self/net/Network;
	// "sockets" makes Count marked sockets (PortHelper.InboundSockets).
	Op    string `json:"op,omitempty"`
	Count int    `json:"count,omitempty"`
}

type dialResult struct {
	Error string `json:"error,omitempty"`
	// Errno is the error's, when it was a system call's.
	Errno int `json:"errno,omitempty"`
}

// childConfig is everything the child needs to set up the namespace.
type childConfig struct {
	Guest GuestConfig `json:"guest"`
	// Configure: bring up lo and give the TAP its address and route.
	Configure bool `json:"configure"`
	// Ports: stay in the namespace and serve dialRequests (the builtin
	// port driver's helper) instead of opening a TAP.
	Ports bool `json:"ports,omitempty"`
	// Exec: replace resolv.conf, wait for proceed, then exec Args. Without
	// it the child exits once the TAP is sent (joining an existing
	// namespace for usernet).
	Exec bool     `json:"exec"`
	Args []string `json:"args"`
	// PID: the child is PID 1 of a new PID namespace: mount /proc and
	// run the command under a small init.
	PID      bool   `json:"pid,omitempty"`
	Hostname string `json:"hostname,omitempty"`
	// CopyUp lists directories to make writable with a tmpfs copy.
	CopyUp []string `json:"copy_up,omitempty"`
}

// tapReady announces the TAP queues carried as SCM_RIGHTS with the message.
type tapReady struct {
	Name   string `json:"name"`
	MAC    string `json:"mac"`
	Queues int    `json:"queues"`
	// Listener: a TCP listener (GuestConfig.TCPListener) follows the
	// queues; NAT: then the netlink socket of its in-kernel translation
	// (package ktcpnat).
	Listener bool `json:"listener,omitempty"`
	NAT      bool `json:"nat,omitempty"`
}

// childFailure reports why the child could not set up the namespace.
type childFailure struct {
	Step    string `json:"step"`
	Message string `json:"message"`
}

func (f *childFailure) Error() string {
	return f.Step + ": " + f.Message
}

var errChannelClosed = errors.New("peer closed the channel")

type channel struct {
	conn *net.UnixConn
}

func (c channel) send(m message, files ...*os.File) error {
	b, err := json.Marshal(m)
	if err != nil {
		return fmt.Errorf("encode %s message: %w", m.Kind, err)
	}
	if len(b) > maxMessage {
		return fmt.Errorf("encode %s message: %d bytes exceed %d", m.Kind, len(b), maxMessage)
	}
	return tap.SendFiles(c.conn, b, files...)
}

// recv reads one message and checks it is of the wanted kind (or a failure,
// which is returned as an error). Any files that came with it are returned.
func (c channel) recv(want messageKind) (message, []*os.File, error) {
	var m message
	files, err := tap.RecvJSON(c.conn, maxMessage, &m)
	if errors.Is(err, io.EOF) {
		return message{}, nil, fmt.Errorf("waiting for %s message: %w", want, errChannelClosed)
	}
	if err != nil {
		return message{}, nil, err
	}
	closeAll := func() {
		for _, f := range files {
			f.Close()
		}
	}
	if m.Kind == kindFailure && m.Failure != nil {
		closeAll()
		return message{}, nil, m.Failure
	}
	if m.Kind != want {
		closeAll()
		return message{}, nil, fmt.Errorf("protocol error: got %q message, want %q", m.Kind, want)
	}
	return m, files, nil
}
