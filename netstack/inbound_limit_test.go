package netstack

import (
	"context"
	"net"
	"net/netip"
	"testing"
	"time"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/adapters/gonet"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv4"

	"github.com/netns-run/netns-run/netstack/sockrelay/relaytest"
)

// Published ports' connections through the stack have a bound of their
// own: clients holding them open do not refuse the guest's own outbound
// connections, and one past the bound is refused.
func TestInboundFlowsLeaveOutboundAlone(t *testing.T) {
	lim := defaultLimits()
	lim.tcpFlows = 2
	cfg := DefaultConfig()
	cfg.limits = &lim
	s, peer := stackOnSocketpair(t, cfg, 0)
	gs := guestStack(t, peer)
	gl, err := gonet.ListenTCP(gs, tcpip.FullAddress{NIC: 1, Addr: tcpipAddr(DefaultGuestAddr), Port: 8080}, ipv4.ProtocolNumber)
	if err != nil {
		t.Fatal(err)
	}
	defer gl.Close()
	go holdAccepted(gl)
	hl, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer hl.Close()
	go holdAccepted(hl)
	// Two outside clients of a published port, idle.
	for range 2 {
		_, sc := relaytest.TCPPair(t)
		go func() { _ = s.ForwardTCP(sc, netip.AddrPortFrom(DefaultGuestAddr, 8080)) }()
	}
	eventually(t, "inbound flows up", func() bool { return s.counters.tcpInboundOpen.Load() == 2 })
	_, sc := relaytest.TCPPair(t)
	third := make(chan error, 1)
	go func() { third <- s.ForwardTCP(sc, netip.AddrPortFrom(DefaultGuestAddr, 8080)) }()
	select {
	case err := <-third:
		if err == nil {
			t.Error("a published-port connection past the bound was taken")
		}
	case <-time.After(10 * time.Second):
		t.Error("a published-port connection past the bound was taken (and is being relayed)")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	port := uint16(hl.Addr().(*net.TCPAddr).Port)
	out, err := gonet.DialContextTCP(ctx, gs, tcpip.FullAddress{NIC: 1, Addr: tcpipAddr(DefaultGateway), Port: port}, ipv4.ProtocolNumber)
	if err != nil {
		t.Fatalf("the guest's outbound connection, with two published-port ones open: %v", err)
	}
	out.Close()
}

// holdAccepted accepts connections on ln and holds them open until ln
// closes.
func holdAccepted(ln net.Listener) {
	var held []net.Conn
	defer func() {
		for _, c := range held {
			c.Close()
		}
	}()
	for {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		held = append(held, c)
	}
}
