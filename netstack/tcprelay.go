package netstack

import (
	"bytes"
	"context"
	"errors"
	"net"
	"sync"
	"sync/atomic"
	"syscall"

	"golang.org/x/sys/unix"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/transport/tcp"
	"gvisor.dev/gvisor/pkg/waiter"
)

// guestConn is a connected gVisor TCP endpoint and its wait queue.
type guestConn struct {
	ep tcpip.Endpoint
	wq *waiter.Queue
	// bufs is the flow's place in the buffer budget (nil: none).
	bufs *flowBuffers
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
	// guest direction is over; closing says the stack's side has begun
	// its own close, from which on a closed endpoint is no sign of a
	// reset.
	downDone := make(chan struct{})
	var closing atomic.Bool
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		defer close(downDone)
		var err error
		down, err = copyHostToGuest(guest, rc)
		if err != nil {
			abort()
			return
		}
		closing.Store(true)
		guest.ep.Shutdown(tcpip.ShutdownWrite)
	}()
	sw := newStreamWriter(rc)
	defer sw.release()
	up, err = copyGuestToHost(guest, sw)
	if err != nil {
		abort()
	} else {
		_ = host.CloseWrite()
		// The guest has sent its FIN; a reset it sends now must still
		// reach the host, which would otherwise wait in CLOSE_WAIT.
		if waitGuestReset(guest, downDone, &closing) {
			abort()
		}
	}
	wg.Wait()
	guest.ep.Close()
	host.Close()
	return up, down
}

// copyGuestToHost hands the guest's data from its endpoint to the host
// socket until the guest's FIN (nil error) or a failure. The data goes from
// gVisor's buffers to the socket without a copy of our own (streamWriter).
func copyGuestToHost(guest guestConn, host *streamWriter) (int64, error) {
	entry, ready := waiter.NewChannelEntry(waiter.ReadableEvents | waiter.EventHUp | waiter.EventErr)
	guest.wq.EventRegister(&entry)
	defer guest.wq.EventUnregister(&entry)
	var total int64
	for {
		res, terr := guest.ep.Read(host, tcpip.ReadOptions{})
		if res.Count > 0 {
			total += int64(res.Count)
			guest.ep.ModerateRecvBuf(res.Count)
		}
		// What gVisor let go of must reach the host before anything
		// else happens.
		if err := host.flush(); err != nil {
			return total, err
		}
		switch terr.(type) {
		case nil:
		case *tcpip.ErrWouldBlock:
			<-ready
		case *tcpip.ErrClosedForReceive:
			return total, nil
		case *tcpip.ErrBadBuffer:
			// The socket was full before the first byte; flush has
			// waited for room.
		default:
			return total, errors.New(terr.String())
		}
	}
}

// copyHostToGuest moves the host's data into the guest's endpoint until
// the host's FIN (nil error) or a failure.
//
// Each wake-up first reads up to smallRead bytes the plain way: a short
// answer (most of request/response traffic) then costs one read, and the
// read that finds the socket empty or at its end. When the socket holds
// more, gVisor reads the rest from the socket itself, straight into the
// segment it sends (socketPayloader, sized by SIOCINQ), so bulk data is
// copied only by the kernel.
func copyHostToGuest(guest guestConn, rc syscall.RawConn) (int64, error) {
	entry, writable := waiter.NewChannelEntry(waiter.WritableEvents)
	guest.wq.EventRegister(&entry)
	defer guest.wq.EventUnregister(&entry)
	var (
		total   int64
		small   [smallRead]byte
		pending []byte // read from the host, not yet taken by gVisor
		r       bytes.Reader
		p       socketPayloader
		terr    tcpip.Error
		eof     bool
	)
	write := func(b []byte) {
		r.Reset(b)
		var m int64
		m, terr = writePayload(guest, &r)
		total += m
		pending = b[m:]
	}
	// try runs under the socket's read lock, so the descriptor stays
	// valid while gVisor reads it.
	try := func(fd uintptr) bool {
		n, errno := readRaw(fd, small[:])
		switch {
		case errno == unix.EAGAIN:
			return false
		case errno != 0:
			p.errno = errno
			return true
		case n == 0:
			eof = true
			return true
		}
		write(small[:n])
		if n < len(small) || len(pending) > 0 || terr != nil {
			return true
		}
		if avail, errno := socketInq(fd); errno == 0 && avail > 0 {
			p.fd, p.left = fd, avail
			var m int64
			m, terr = writePayload(guest, &p)
			total += m
		}
		return true
	}
	for {
		terr = nil
		if len(pending) > 0 {
			write(pending)
		} else if err := rc.Read(try); err != nil {
			return total, err
		}
		switch {
		case p.errno != 0:
			return total, p.errno
		case eof:
			return total, nil
		}
		switch terr.(type) {
		case nil:
		case *tcpip.ErrWouldBlock:
			<-writable
		default:
			return total, errors.New(terr.String())
		}
	}
}

// smallRead is the plain read each wake-up starts with.
const smallRead = 2048

// waitGuestReset waits, after the guest's FIN, until either done is closed
// or the guest endpoint fails (the guest reset it, or keepalive gave up on
// it); it reports the latter. An endpoint that closed before the stack's
// side began to close (closing) can only have been reset.
func waitGuestReset(guest guestConn, done <-chan struct{}, closing *atomic.Bool) bool {
	entry, ch := waiter.NewChannelEntry(waiter.EventHUp | waiter.EventErr)
	guest.wq.EventRegister(&entry)
	defer guest.wq.EventUnregister(&entry)
	for {
		switch tcp.EndpointState(guest.ep.State()) {
		case tcp.StateError:
			return true
		case tcp.StateClose:
			if !closing.Load() {
				return true
			}
		}
		select {
		case <-done:
			return false
		case <-ch:
		}
	}
}

// writePayload writes what p reads (from the host socket, or from what was
// read from it) to guest. The budget's cut of the send buffer lands here,
// between writes: during one, gVisor would drop what no longer fits of
// what it already took from p (see flowBuffers).
func writePayload(guest guestConn, p tcpip.Payloader) (int64, tcpip.Error) {
	guest.bufs.applySend(guest.ep)
	return guest.ep.Write(p, tcpip.WriteOptions{})
}
