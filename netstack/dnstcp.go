package netstack

import (
	"context"
	"encoding/binary"
	"io"
	"net"
	"net/netip"
	"time"

	"github.com/miekg/dns"
	"gvisor.dev/gvisor/pkg/tcpip/adapters/gonet"
	"gvisor.dev/gvisor/pkg/tcpip/transport/tcp"
	"gvisor.dev/gvisor/pkg/waiter"
)

// DNS over TCP under an egress policy: the forwarder's TCP port is served
// query by query through the policy, like its UDP port, instead of being
// relayed to the upstream as a byte stream that no one reads. Allowed
// queries go to the upstream over a TCP connection of this guest
// connection's own.

// dnsTCPIdle ends a guest's DNS connection that asks nothing for so long.
const dnsTCPIdle = 10 * time.Second

// serveDNSTCP serves a guest TCP connection to the forwarder's address.
func (s *Stack) serveDNSTCP(r *tcp.ForwarderRequest, dst netip.AddrPort) {
	s.takeFirstPacket(r.ID())
	if dst.Port() != dnsPort {
		// DNS over TLS would carry queries no one can check.
		r.Complete(true)
		return
	}
	var wq waiter.Queue
	ep, terr := r.CreateEndpoint(&wq)
	if terr != nil {
		r.Complete(true)
		return
	}
	r.Complete(false)
	guest := gonet.NewTCPConn(&wq, ep)
	defer guest.Close()
	stop := context.AfterFunc(s.ctx, func() { guest.Close() })
	defer stop()
	var up *net.TCPConn
	defer func() {
		if up != nil {
			up.Close()
		}
	}()
	for {
		_ = guest.SetDeadline(time.Now().Add(dnsTCPIdle))
		msg, err := readDNSMessage(guest, dnsMaxQuery)
		if err != nil {
			return
		}
		reply, forward, filter := s.egress.Query(msg)
		if forward {
			if reply = s.exchangeDNSTCP(&up, msg); reply == nil {
				reply = dnsServfail(msg)
			}
			if filter != nil {
				reply = filter(reply)
			}
		}
		if reply == nil || writeDNSMessage(guest, reply) != nil {
			return
		}
	}
}

// exchangeDNSTCP asks the upstream over *up (dialed, or dialed again
// once if the upstream closed it meanwhile) and returns its answer, or nil.
func (s *Stack) exchangeDNSTCP(up **net.TCPConn, msg []byte) []byte {
	for try := 0; try < 2; try++ {
		if *up == nil {
			c, err := s.dialDNSUpstreamTCP()
			if err != nil {
				s.log.Debug("dns over tcp: upstream", "err", err)
				return nil
			}
			*up = c
		}
		c := *up
		_ = c.SetDeadline(time.Now().Add(dnsTryTimeout))
		err := writeDNSMessage(c, msg)
		var answer []byte
		if err == nil {
			answer, err = readDNSMessage(c, dnsMaxMessage)
		}
		if err == nil && len(answer) >= 12 && binary.BigEndian.Uint16(answer) == binary.BigEndian.Uint16(msg) {
			return answer
		}
		s.log.Debug("dns over tcp: exchange", "err", err)
		c.Close()
		*up = nil
	}
	return nil
}

// readDNSMessage reads one length-prefixed DNS message of at most max bytes.
func readDNSMessage(r io.Reader, max int) ([]byte, error) {
	var n [2]byte
	if _, err := io.ReadFull(r, n[:]); err != nil {
		return nil, err
	}
	size := int(binary.BigEndian.Uint16(n[:]))
	if size < 12 || size > max {
		return nil, io.ErrUnexpectedEOF
	}
	m := make([]byte, size)
	if _, err := io.ReadFull(r, m); err != nil {
		return nil, err
	}
	return m, nil
}

// writeDNSMessage writes m with its length prefix in one write.
func writeDNSMessage(w io.Writer, m []byte) error {
	b := make([]byte, 2+len(m))
	binary.BigEndian.PutUint16(b, uint16(len(m)))
	copy(b[2:], m)
	_, err := w.Write(b)
	return err
}

// dnsServfail answers query with SERVFAIL.
func dnsServfail(query []byte) []byte {
	var q dns.Msg
	if err := q.Unpack(query); err != nil {
		return nil
	}
	r := new(dns.Msg)
	r.SetRcode(&q, dns.RcodeServerFailure)
	r.RecursionAvailable = true
	b, err := r.Pack()
	if err != nil {
		return nil
	}
	return b
}
