package netstack

import (
	"net/netip"
	"testing"
	"time"

	"gvisor.dev/gvisor/pkg/tcpip/adapters/gonet"
)

// udpEcho runs a UDP echo server on loopback; each datagram's source is
// sent on seen.
func udpEcho(t *testing.T) (netip.AddrPort, chan netip.AddrPort) {
	t.Helper()
	c := loopbackUDP(t)
	seen := make(chan netip.AddrPort, 64)
	go func() {
		buf := make([]byte, 65536)
		for {
			n, from, err := c.ReadFromUDPAddrPort(buf)
			if err != nil {
				return
			}
			select {
			case seen <- from:
			default:
			}
			_, _ = c.WriteToUDPAddrPort(buf[:n], from)
		}
	}()
	return addrOf(c), seen
}

// gatewayPort is the gateway address at a host loopback port.
func gatewayPort(host netip.AddrPort) netip.AddrPort {
	return netip.AddrPortFrom(DefaultGateway, host.Port())
}

// echoOnce sends one datagram on c and reports whether it came back.
func echoOnce(t *testing.T, c *gonet.UDPConn) bool {
	t.Helper()
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := c.Write([]byte("ping")); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 64)
	_, err := c.Read(buf)
	return err == nil
}

func withLimits(change func(*limits)) Config {
	cfg := DefaultConfig()
	lim := defaultLimits()
	change(&lim)
	cfg.limits = &lim
	return cfg
}

// eventually polls cond until it holds, or fails the test after a bound.
func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	for i := 0; !cond(); i++ {
		if i == 400 {
			t.Fatalf("not within 20 s: %s", what)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// A full UDP flow table makes room for a new flow by evicting the least
// recently used one; it used to drop the new flow's datagrams instead.
func TestUDPFlowsEvictAtCap(t *testing.T) {
	echo, _ := udpEcho(t)
	s, _, g := withGuest(t, withLimits(func(l *limits) { l.udpFlows = 4 }))
	var conns []*gonet.UDPConn
	for i := 0; i < 6; i++ {
		c := guestDialUDP(t, g.gs, gatewayPort(echo))
		conns = append(conns, c)
		if !echoOnce(t, c) {
			t.Fatalf("flow %d (table of 4): no echo", i)
		}
	}
	if n := s.udpFlows.len(); n > 4 {
		t.Errorf("%d flows in a table of 4", n)
	}
	// The first flow was evicted; its next datagram opens a new one.
	if !echoOnce(t, conns[0]) {
		t.Error("an evicted flow's socket got no echo afterwards")
	}
	eventually(t, "evicted flows end", func() bool { return s.counters.udpOpen.Load() <= 4 })
	if st := s.Stats(); st.Drops.FlowLimit < 3 {
		t.Errorf("flow_limit %d, want the 3 evictions counted", st.Drops.FlowLimit)
	}
}

// A flow that never got an answer expires after the short timeout, while a
// conversation (active 2 s after its first answer) keeps its flow.
func TestUDPUnrepliedFlowsExpireFirst(t *testing.T) {
	echo, seen := udpEcho(t)
	_, silent := silentUpstream(t)
	s, _, g := withGuest(t, withLimits(func(l *limits) {
		l.udp = flowTimeouts{unreplied: 300 * time.Millisecond, replied: 300 * time.Millisecond, assured: time.Hour}
	}))
	talk := guestDialUDP(t, g.gs, gatewayPort(echo))
	if !echoOnce(t, talk) {
		t.Fatal("no echo")
	}
	hostPort := <-seen
	for start := time.Now(); time.Since(start) < assuredAfter+200*time.Millisecond; {
		time.Sleep(100 * time.Millisecond)
		if !echoOnce(t, talk) {
			t.Fatal("no echo")
		}
		<-seen
	}
	quiet := guestDialUDP(t, g.gs, gatewayPort(silent))
	if _, err := quiet.Write([]byte("anyone?")); err != nil {
		t.Fatal(err)
	}
	eventually(t, "the unreplied flow is opened", func() bool { return s.counters.udpTotal.Load() == 2 })
	eventually(t, "the unreplied flow expires", func() bool { return s.udpFlows.len() == 1 && s.counters.udpOpen.Load() == 1 })
	// Idle for longer than the short timeout, the conversation still
	// has its flow: the host sees the same source port.
	time.Sleep(time.Second)
	if !echoOnce(t, talk) {
		t.Fatal("no echo after a pause")
	}
	if got := <-seen; got != hostPort {
		t.Errorf("the conversation's flow was replaced (host port %v, then %v)", hostPort, got)
	}
}
