package netstack

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net"
	"sync"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/transport/tcp"
	"gvisor.dev/gvisor/pkg/waiter"
)

// guestConn is a connected gVisor TCP endpoint and its wait queue.
type guestConn struct {
	ep tcpip.Endpoint
	wq *waiter.Queue
}

// relayTCP copies both ways between a guest connection and a host socket
// until both directions have finished or ctx ends. A FIN on one side becomes
// a half-close on the other; a reset or error on one side resets the other,
// also after the guest has half-closed. It owns both and closes them. It
// returns the bytes copied guest->host and host->guest.
//
// The guest side is read and written through the endpoint itself rather
// than gonet, which registers a waiter and makes a channel on every read
// that has to wait; the host side through hostReader and hostWriter.
func relayTCP(ctx context.Context, guest guestConn, host *net.TCPConn) (up, down int64) {
	rc, err := host.SyscallConn()
	if err != nil {
		guest.ep.Abort()
		host.Close()
		return 0, 0
	}
	var once sync.Once
	abort := func() {
		once.Do(func() {
			// Linger 0 makes Close send RST rather than FIN.
			_ = host.SetLinger(0)
			host.Close()
			guest.ep.Abort()
		})
	}
	stop := context.AfterFunc(ctx, abort)
	defer stop()

	// downDone ends the wait for a late guest reset once the host ->
	// guest direction is over.
	downDone := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		defer close(downDone)
		var err error
		down, err = copyHostToGuest(guest, newHostReader(rc))
		if err != nil {
			abort()
			return
		}
		guest.ep.Shutdown(tcpip.ShutdownWrite)
	}()
	up, err = copyGuestToHost(guest, newHostWriter(rc))
	if err != nil {
		abort()
	} else {
		_ = host.CloseWrite()
		// The guest has sent its FIN; a reset it sends now must still
		// reach the host, which would otherwise wait in CLOSE_WAIT.
		if waitGuestReset(guest, downDone) {
			abort()
		}
	}
	wg.Wait()
	guest.ep.Close()
	host.Close()
	return up, down
}

// copyGuestToHost reads the guest's data from its endpoint and writes it
// to the host until the guest's FIN (nil error) or a failure.
func copyGuestToHost(guest guestConn, host *hostWriter) (int64, error) {
	entry, ready := waiter.NewChannelEntry(waiter.ReadableEvents | waiter.EventHUp | waiter.EventErr)
	guest.wq.EventRegister(&entry)
	defer guest.wq.EventUnregister(&entry)
	buf := relayBuffers.Get().(*[]byte)
	defer func() { putRelayBuffer(buf) }()
	var total int64
	for {
		w := tcpip.SliceWriter(*buf)
		res, terr := guest.ep.Read(&w, tcpip.ReadOptions{})
		switch terr.(type) {
		case nil:
		case *tcpip.ErrWouldBlock:
			<-ready
			continue
		case *tcpip.ErrClosedForReceive:
			return total, nil
		default:
			return total, errors.New(terr.String())
		}
		guest.ep.ModerateRecvBuf(res.Count)
		n, err := host.Write((*buf)[:res.Count])
		total += int64(n)
		if err != nil {
			return total, err
		}
		buf = growRelayBuffer(buf, res.Count)
	}
}

// copyHostToGuest reads the host socket and writes to the guest's endpoint
// until the host's FIN (nil error) or a failure.
func copyHostToGuest(guest guestConn, host *hostReader) (int64, error) {
	entry, writable := waiter.NewChannelEntry(waiter.WritableEvents)
	guest.wq.EventRegister(&entry)
	defer guest.wq.EventUnregister(&entry)
	buf := relayBuffers.Get().(*[]byte)
	defer func() { putRelayBuffer(buf) }()
	var total int64
	var r bytes.Reader
	for {
		n, err := host.Read(*buf)
		if err == io.EOF {
			return total, nil
		}
		if err != nil {
			return total, err
		}
		for off := 0; off < n; {
			r.Reset((*buf)[off:n])
			m, terr := guest.ep.Write(&r, tcpip.WriteOptions{})
			off += int(m)
			total += m
			switch terr.(type) {
			case nil:
			case *tcpip.ErrWouldBlock:
				<-writable
			default:
				return total, errors.New(terr.String())
			}
		}
		buf = growRelayBuffer(buf, n)
	}
}

// waitGuestReset waits, after the guest's FIN, until either done is closed
// or the guest endpoint fails (the guest reset it, or it timed out); it
// reports the latter.
func waitGuestReset(guest guestConn, done <-chan struct{}) bool {
	entry, ch := waiter.NewChannelEntry(waiter.EventHUp | waiter.EventErr)
	guest.wq.EventRegister(&entry)
	defer guest.wq.EventUnregister(&entry)
	for {
		if tcp.EndpointState(guest.ep.State()) == tcp.StateError {
			return true
		}
		select {
		case <-done:
			return false
		case <-ch:
		}
	}
}

// growRelayBuffer moves a direction that filled its buffer to a bulk one.
func growRelayBuffer(buf *[]byte, used int) *[]byte {
	if used < len(*buf) || len(*buf) >= bulkBufferSize {
		return buf
	}
	relayBuffers.Put(buf)
	return bulkBuffers.Get().(*[]byte)
}

func putRelayBuffer(buf *[]byte) {
	if len(*buf) >= bulkBufferSize {
		bulkBuffers.Put(buf)
		return
	}
	relayBuffers.Put(buf)
}
