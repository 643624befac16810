package netstack

import (
	"encoding/binary"
	"errors"
	"net/netip"
	"syscall"

	"golang.org/x/sys/unix"
	"gvisor.dev/gvisor/pkg/tcpip/header"
)

// Host sockets are opened with IP_RECVERR / IPV6_RECVERR so that the ICMP
// errors the host receives for them (unreachable, time exceeded) can be
// handed to the guest: that is how traceroute and "connection refused" for
// UDP work through the helper. Go's net package has no API for the socket
// error queue, hence x/sys/unix here.

// sockError is one ICMP error the kernel queued on a host socket.
type sockError struct {
	icmpType, icmpCode uint8
	// rest is the 4 bytes after the ICMP checksum: the next-hop MTU of a
	// "fragmentation needed" or "packet too big", which path MTU
	// discovery in the guest needs; zero for other errors.
	rest     [4]byte
	offender netip.Addr
	// dest is where the datagram that caused it was going.
	dest netip.Addr
	// payload is the start of the datagram we sent that caused it.
	payload []byte
}

func enableRecvErr(rc syscall.RawConn, v6 bool) error {
	var serr error
	err := rc.Control(func(fd uintptr) {
		if v6 {
			serr = unix.SetsockoptInt(int(fd), unix.SOL_IPV6, unix.IPV6_RECVERR, 1)
		} else {
			serr = unix.SetsockoptInt(int(fd), unix.SOL_IP, unix.IP_RECVERR, 1)
		}
	})
	return errors.Join(err, serr)
}

// setHopLimit sets the TTL (hop limit) of what the socket sends.
func setHopLimit(rc syscall.RawConn, v6 bool, ttl int) error {
	var serr error
	err := rc.Control(func(fd uintptr) {
		if v6 {
			serr = unix.SetsockoptInt(int(fd), unix.SOL_IPV6, unix.IPV6_UNICAST_HOPS, ttl)
		} else {
			serr = unix.SetsockoptInt(int(fd), unix.SOL_IP, unix.IP_TTL, ttl)
		}
	})
	return errors.Join(err, serr)
}

// readSockError takes one entry off the socket's error queue, or returns
// nil if there is none (or it is not an ICMP error).
func readSockError(rc syscall.RawConn) *sockError {
	buf := make([]byte, 256)
	oob := make([]byte, 512)
	var n, oobn int
	var from unix.Sockaddr
	var rerr error
	if err := rc.Control(func(fd uintptr) {
		n, oobn, _, from, rerr = unix.Recvmsg(int(fd), buf, oob, unix.MSG_ERRQUEUE|unix.MSG_DONTWAIT)
	}); err != nil || rerr != nil {
		return nil
	}
	msgs, err := unix.ParseSocketControlMessage(oob[:oobn])
	if err != nil {
		return nil
	}
	for _, m := range msgs {
		isV4 := m.Header.Level == unix.SOL_IP && m.Header.Type == unix.IP_RECVERR
		isV6 := m.Header.Level == unix.SOL_IPV6 && m.Header.Type == unix.IPV6_RECVERR
		if !isV4 && !isV6 {
			continue
		}
		se := parseExtendedErr(m.Data, buf[:n])
		if se != nil {
			se.dest = sockaddrAddr(from)
		}
		return se
	}
	return nil
}

// parseExtendedErr decodes struct sock_extended_err and the offender
// address (SO_EE_OFFENDER) that follows it.
func parseExtendedErr(d, payload []byte) *sockError {
	const eeSize = 16
	if len(d) < eeSize+8 {
		return nil
	}
	origin := d[4]
	if origin != unix.SO_EE_ORIGIN_ICMP && origin != unix.SO_EE_ORIGIN_ICMP6 {
		return nil
	}
	se := &sockError{icmpType: d[5], icmpCode: d[6], payload: append([]byte(nil), payload...)}
	// ee_info carries the MTU the router reported.
	mtu := binary.NativeEndian.Uint32(d[8:])
	switch {
	case origin == unix.SO_EE_ORIGIN_ICMP && se.icmpType == uint8(header.ICMPv4DstUnreachable) && se.icmpCode == uint8(header.ICMPv4FragmentationNeeded):
		binary.BigEndian.PutUint16(se.rest[2:], uint16(mtu))
	case origin == unix.SO_EE_ORIGIN_ICMP6 && se.icmpType == uint8(header.ICMPv6PacketTooBig):
		binary.BigEndian.PutUint32(se.rest[:], mtu)
	}
	sa := d[eeSize:]
	switch binary.NativeEndian.Uint16(sa) {
	case unix.AF_INET:
		se.offender = netip.AddrFrom4([4]byte(sa[4:8]))
	case unix.AF_INET6:
		if len(sa) >= 24 {
			se.offender = netip.AddrFrom16([16]byte(sa[8:24])).Unmap()
		}
	}
	if !se.offender.IsValid() {
		return nil
	}
	return se
}
