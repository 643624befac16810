package netstack

import (
	"context"
	"errors"
	"net"
	"sync"
	"sync/atomic"
	"time"
)

// relayBufferSize is the buffer a datagram relay copies through: enough for
// any datagram.
const relayBufferSize = 64 << 10

var relayBuffers = sync.Pool{New: func() any {
	b := make([]byte, relayBufferSize)
	return &b
}}

// deadlineSlack is how stale a datagram flow's read deadline may get before
// it is pushed back.
const deadlineSlack = time.Second

// relayDatagrams copies datagrams both ways between two connected sockets
// until neither direction has seen traffic for idle, or ctx ends. A failed
// read on the host side (an ICMP error reported on the socket) calls
// hostErr and the flow goes on.
//
// It returns the bytes relayed guest->host and host->guest.
func relayDatagrams(ctx context.Context, guest, host net.Conn, idle time.Duration, hostErr func()) (up, down int64) {
	var closeOnce sync.Once
	closeBoth := func() {
		closeOnce.Do(func() {
			guest.Close()
			host.Close()
		})
	}
	stop := context.AfterFunc(ctx, closeBoth)
	defer stop()

	var last atomic.Int64
	last.Store(time.Now().UnixNano())
	pump := func(dst, src net.Conn, srcErr, dstErr func(), total *int64) {
		defer closeBoth()
		bp := relayBuffers.Get().(*[]byte)
		defer relayBuffers.Put(bp)
		buf := *bp
		var deadline time.Time
		for {
			// Re-arming a deadline costs two timer updates; per
			// datagram that was a visible share of the UDP path. A
			// deadline up to deadlineSlack old only means waking to
			// find the flow still alive.
			if now := time.Now(); deadline.Sub(now) < idle-deadlineSlack {
				deadline = now.Add(idle)
				_ = src.SetReadDeadline(deadline)
			}
			n, err := src.Read(buf)
			if err != nil {
				var ne net.Error
				if errors.As(err, &ne) && ne.Timeout() && time.Since(time.Unix(0, last.Load())) < idle {
					continue // the other direction kept the flow alive
				}
				if srcErr != nil && !errors.Is(err, net.ErrClosed) && !(errors.As(err, &ne) && ne.Timeout()) {
					// An ICMP error from the far end; the flow stays.
					srcErr()
					continue
				}
				return
			}
			last.Store(time.Now().UnixNano())
			*total += int64(n)
			if _, err := dst.Write(buf[:n]); err != nil {
				if dstErr == nil || errors.Is(err, net.ErrClosed) {
					return
				}
				// A queued ICMP error surfaced on the write instead.
				dstErr()
			}
		}
	}
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		pump(guest, host, hostErr, nil, &down)
	}()
	pump(host, guest, nil, hostErr, &up)
	wg.Wait()
	return up, down
}
