package portfwd

import (
	"context"
	"errors"
	"log/slog"
	"net/netip"
	"os"
	"sync/atomic"
	"testing"
	"time"

	"github.com/netns-run/netns-run/netstack/sockrelay"
	"github.com/netns-run/netns-run/netstack/sockrelay/relaytest"
)

// stuckSockets is a port helper that answers only when told to, with err.
type stuckSockets struct {
	answer chan error
	calls  atomic.Int32
}

func (s *stuckSockets) InboundSockets(bool, int) ([]*os.File, error) {
	s.calls.Add(1)
	return nil, <-s.answer
}

// A slow port helper does not hold up the accept loop: forwardRawTCP
// returns while the pool waits for sockets, and the connection then goes
// through the stack when the helper fails. Connections that come while a
// refill failed do not ask the helper again.
func TestKernelPathDoesNotWaitForPortHelper(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	src := &stuckSockets{answer: make(chan error)}
	stack := recordingGuest{targets: make(chan netip.AddrPort, 4)}
	source := func(client, _ netip.AddrPort) netip.AddrPort { return client }
	k := NewKernelPath(ctx, src, stack, source, slog.New(slog.DiscardHandler))
	if k.loops == nil {
		t.Skip("no relay loops here")
	}
	client := netip.MustParseAddrPort("203.0.113.9:40000")
	guest := netip.MustParseAddrPort("10.0.2.100:80")
	forward := func() {
		c, _ := relaytest.TCPPair(t)
		fd, err := sockrelay.Detach(c)
		if err != nil {
			t.Fatal(err)
		}
		returned := make(chan error, 1)
		go func() { returned <- k.forwardRawTCP(fd, client, guest) }()
		select {
		case err := <-returned:
			if err != nil {
				t.Errorf("forwardRawTCP: %v", err)
			}
		case <-time.After(10 * time.Second):
			src.answer <- errors.New("released by the test")
			t.Fatal("forwardRawTCP waited for the port helper")
		}
	}
	forward()
	src.answer <- errors.New("port helper gone")
	select {
	case got := <-stack.targets:
		if got != guest {
			t.Errorf("the stack took a connection to %v, want %v", got, guest)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the connection was lost: the stack never took it")
	}
	// The failure pauses the family: the next connection goes straight
	// to the stack, without a call.
	forward()
	<-stack.targets
	if n := src.calls.Load(); n != 1 {
		t.Errorf("%d calls to the port helper, want 1", n)
	}
}

// A refill that failed answers the callers that waited for it with its
// error for a while, instead of a round trip each; get without wait never
// asks.
func TestSocketPoolRefill(t *testing.T) {
	src := &stuckSockets{answer: make(chan error, 2)}
	var p socketPool
	defer p.close()
	if _, err := p.get(src, false, false); !errors.Is(err, errPoolEmpty) {
		t.Errorf("get without wait: %v, want errPoolEmpty", err)
	}
	helperErr := errors.New("port helper gone")
	src.answer <- helperErr
	for range 3 {
		if _, err := p.get(src, false, true); !errors.Is(err, helperErr) {
			t.Errorf("get: %v, want the helper's error", err)
		}
	}
	if n := src.calls.Load(); n != 1 {
		t.Errorf("%d calls to the port helper, want 1", n)
	}
}
