package portfwd

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"

	"golang.org/x/sys/unix"
)

// replySource makes a UDP socket bound to a wildcard address answer each
// client from the address the client sent to. Left to itself the kernel
// picks the source of a reply by route, which on a host with several
// addresses may be another one, and a client that checks where the answer
// came from (any connected UDP socket does) drops it. The kernel tells the
// destination of each datagram (IP_PKTINFO, IPV6_PKTINFO) and takes the
// same message back as the source of a reply.
type replySource struct {
	v6 bool // an AF_INET6 socket (dual-stack: IPv4 clients arrive v4-mapped)
}

// newReplySource turns on destination reporting for pc.
func newReplySource(pc *net.UDPConn) (*replySource, error) {
	rc, err := pc.SyscallConn()
	if err != nil {
		return nil, err
	}
	var r replySource
	var serr error
	err = rc.Control(func(fd uintptr) {
		var domain int
		if domain, serr = unix.GetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_DOMAIN); serr != nil {
			return
		}
		r.v6 = domain == unix.AF_INET6
		if r.v6 {
			serr = unix.SetsockoptInt(int(fd), unix.IPPROTO_IPV6, unix.IPV6_RECVPKTINFO, 1)
		} else {
			serr = unix.SetsockoptInt(int(fd), unix.IPPROTO_IP, unix.IP_PKTINFO, 1)
		}
	})
	if err = errors.Join(err, serr); err != nil {
		return nil, fmt.Errorf("destination addresses of datagrams: %w", err)
	}
	return &r, nil
}

// oobSize is the room a datagram's control messages need.
func (r *replySource) oobSize() int {
	return unix.CmsgSpace(unix.SizeofInet6Pktinfo) + unix.CmsgSpace(unix.SizeofInet4Pktinfo)
}

// control reads the destination of a datagram from its control messages and
// returns the control message that sends a reply from there (nil if there
// was none).
func (r *replySource) control(oob []byte) []byte {
	msgs, err := unix.ParseSocketControlMessage(oob)
	if err != nil {
		return nil
	}
	for _, m := range msgs {
		switch {
		case r.v6 && m.Header.Level == unix.IPPROTO_IPV6 && m.Header.Type == unix.IPV6_PKTINFO && len(m.Data) >= unix.SizeofInet6Pktinfo:
			info := unix.Inet6Pktinfo{Addr: [16]byte(m.Data[:16])}
			// The interface only matters, and is only kept, for
			// link-local addresses; elsewhere routing picks it.
			if a := netip.AddrFrom16(info.Addr); a.IsLinkLocalUnicast() {
				info.Ifindex = binary.NativeEndian.Uint32(m.Data[16:20])
			}
			return unix.PktInfo6(&info)
		case !r.v6 && m.Header.Level == unix.IPPROTO_IP && m.Header.Type == unix.IP_PKTINFO && len(m.Data) >= unix.SizeofInet4Pktinfo:
			// struct in_pktinfo: ifindex, spec_dst, addr. The reply
			// leaves from addr, the header's destination: spec_dst is
			// the address routing would pick (127.0.0.1 for a client
			// of 127.0.0.2). A broadcast destination cannot be a
			// source: the send fails, and the caller sends again
			// without this.
			return unix.PktInfo4(&unix.Inet4Pktinfo{Spec_dst: [4]byte(m.Data[8:12])})
		}
	}
	return nil
}
