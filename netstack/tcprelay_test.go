package netstack

import (
	"testing"
	"time"

	"golang.org/x/sys/unix"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/link/loopback"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv4"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
	"gvisor.dev/gvisor/pkg/tcpip/transport/tcp"
	"gvisor.dev/gvisor/pkg/waiter"
)

// cutMidRead is a socketPayloader whose first read lets the buffer
// budget's cut of ep run (as tcpBuffers.add on another flow's goroutine
// may) while gVisor reads it; cut ends with that goroutine.
type cutMidRead struct {
	*socketPayloader
	ep  tcpip.Endpoint
	fb  *flowBuffers
	cut chan struct{}
}

func (c *cutMidRead) Read(b []byte) (int, error) {
	if c.cut == nil {
		c.cut = make(chan struct{})
		go func() {
			defer close(c.cut)
			cutBuffers(c.ep, c.fb, tcpBufferMin)
		}()
		// Time for the cut to land if gVisor's locks let it.
		time.Sleep(50 * time.Millisecond)
	}
	return c.socketPayloader.Read(b)
}

// Bytes taken from the host socket reach the guest's stream even when the
// buffer budget shrinks the flow's send buffer while gVisor reads them:
// none is dropped.
func TestPayloadSurvivesBudgetCut(t *testing.T) {
	s := stack.New(stack.Options{NetworkProtocols: []stack.NetworkProtocolFactory{ipv4.NewProtocol},
		TransportProtocols: []stack.TransportProtocolFactory{tcp.NewProtocol}})
	defer s.Close()
	if terr := s.CreateNIC(1, loopback.New()); terr != nil {
		t.Fatal(terr)
	}
	addr := tcpip.AddrFrom4([4]byte{127, 0, 0, 1})
	if terr := s.AddProtocolAddress(1, tcpip.ProtocolAddress{Protocol: ipv4.ProtocolNumber, AddressWithPrefix: addr.WithPrefix()}, stack.AddressProperties{}); terr != nil {
		t.Fatal(terr)
	}
	s.SetRouteTable([]tcpip.Route{{Destination: addr.WithPrefix().Subnet(), NIC: 1}})
	var lwq, cwq waiter.Queue
	ln, terr := s.NewEndpoint(tcp.ProtocolNumber, ipv4.ProtocolNumber, &lwq)
	if terr != nil {
		t.Fatal(terr)
	}
	defer ln.Close()
	if terr := ln.Bind(tcpip.FullAddress{NIC: 1, Addr: addr, Port: 9000}); terr != nil {
		t.Fatal(terr)
	}
	if terr := ln.Listen(1); terr != nil {
		t.Fatal(terr)
	}
	ep, terr := s.NewEndpoint(tcp.ProtocolNumber, ipv4.ProtocolNumber, &cwq)
	if terr != nil {
		t.Fatal(terr)
	}
	defer ep.Close()
	ent, connected := waiter.NewChannelEntry(waiter.WritableEvents)
	cwq.EventRegister(&ent)
	defer cwq.EventUnregister(&ent)
	_ = ep.Connect(tcpip.FullAddress{NIC: 1, Addr: addr, Port: 9000})
	select {
	case <-connected:
	case <-time.After(5 * time.Second):
		t.Fatal("no connection")
	}
	// 256 KiB waiting in the host socket, as copyHostToGuest finds it.
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fds[0])
	defer unix.Close(fds[1])
	_ = unix.SetsockoptInt(fds[0], unix.SOL_SOCKET, unix.SO_SNDBUF, 1<<20)
	data := make([]byte, 256<<10)
	if n, err := unix.Write(fds[0], data); err != nil || n != len(data) {
		t.Fatal(n, err)
	}
	fb := &flowBuffers{}
	p := &cutMidRead{socketPayloader: &socketPayloader{fd: uintptr(fds[1]), left: len(data)}, ep: ep, fb: fb}
	m, terr := writePayload(guestConn{ep: ep, bufs: fb}, p)
	<-p.cut
	left, _ := socketInq(uintptr(fds[1]))
	if int(m) != len(data)-left {
		t.Errorf("%d bytes read from the host socket were dropped (the stack took %d, err %v)", len(data)-left-int(m), m, terr)
	}
	// The writer's next write takes the cut.
	fb.applySend(ep)
	if got := ep.SocketOptions().GetSendBufferSize(); got != tcpBufferMin {
		t.Errorf("send buffer %d after the next write's cut, want %d", got, tcpBufferMin)
	}
}
