package portfwd

import (
	"context"
	"io"
	"log/slog"
	"net/netip"
	"os"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/netns-run/netns-run/netstack/ktcpnat"
)

type recordingSockets struct {
	mu     sync.Mutex
	forgot []ktcpnat.InboundKey
}

func (r *recordingSockets) InboundSockets(bool, int) ([]*os.File, error) { return nil, os.ErrInvalid }

func (r *recordingSockets) ForgetInbound(keys []ktcpnat.InboundKey) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.forgot = append(r.forgot, keys...)
	return nil
}

// A connection's key is forgotten once it lingered, unless another
// connection took it up meanwhile; then only after that one ends.
func TestKernelPathForgetsEndedConnections(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	rec := &recordingSockets{}
	k := NewKernelPath(ctx, rec, nil, nil, slog.New(slog.NewTextHandler(io.Discard, nil)))
	a := ktcpnat.InboundKey{Server: netip.MustParseAddrPort("10.0.2.100:80"), Client: netip.MustParseAddrPort("10.0.2.2:40000")}
	b := ktcpnat.InboundKey{Server: netip.MustParseAddrPort("10.0.2.100:80"), Client: netip.MustParseAddrPort("10.0.2.2:40001")}
	k.hold(a)
	k.hold(b)
	k.release(a)
	k.release(b)
	now := time.Now()
	if keys, next := k.due(now); len(keys) != 0 || next.IsZero() {
		t.Errorf("at once: %v forgotten, next due %v; want none, and a time", keys, next)
	}
	// b is taken up again before it is due.
	k.hold(b)
	if keys, _ := k.due(now.Add(forgetAfter + time.Millisecond)); !slices.Equal(keys, []ktcpnat.InboundKey{a}) {
		t.Errorf("once due: %v forgotten, want only %v", keys, a)
	}
	k.release(b)
	// The loop does the rest on its own.
	deadline := time.Now().Add(3 * forgetAfter)
	for time.Now().Before(deadline) {
		rec.mu.Lock()
		got := slices.Clone(rec.forgot)
		rec.mu.Unlock()
		if slices.Equal(got, []ktcpnat.InboundKey{b}) {
			return
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Errorf("the loop forgot %v, want %v", rec.forgot, b)
}
