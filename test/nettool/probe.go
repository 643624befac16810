package main

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strconv"
	"time"

	"golang.org/x/sys/unix"
)

// udpProbe sends one UDP datagram with the given TTL, like a traceroute
// probe, and reports the ICMP error that comes back:
// "ERRNO icmp type=T code=C from=ADDR" (ERRNO: what the read returned,
// e.g. "connection refused" for a port unreachable), "reply" or "timeout".
func udpProbe(args []string) error {
	if err := needArgs(args, 2); err != nil {
		return err
	}
	ttl, err := strconv.Atoi(args[1])
	if err != nil {
		return err
	}
	c, err := net.Dial("udp4", args[0])
	if err != nil {
		return err
	}
	defer c.Close()
	rc, err := c.(*net.UDPConn).SyscallConn()
	if err != nil {
		return err
	}
	var serr error
	if err := rc.Control(func(fd uintptr) {
		serr = errors.Join(unix.SetsockoptInt(int(fd), unix.SOL_IP, unix.IP_TTL, ttl),
			unix.SetsockoptInt(int(fd), unix.SOL_IP, unix.IP_RECVERR, 1))
	}); err != nil || serr != nil {
		return errors.Join(err, serr)
	}
	if _, err := c.Write([]byte("probe")); err != nil {
		return err
	}
	_ = c.SetReadDeadline(time.Now().Add(3 * time.Second))
	buf := make([]byte, 512)
	_, err = c.Read(buf)
	var ne net.Error
	switch {
	case err == nil:
		fmt.Println("reply")
		return nil
	case errors.As(err, &ne) && ne.Timeout():
		fmt.Println("timeout")
		return nil
	}
	oob := make([]byte, 512)
	var oobn int
	var rerr error
	_ = rc.Control(func(fd uintptr) {
		_, oobn, _, _, rerr = unix.Recvmsg(int(fd), buf, oob, unix.MSG_ERRQUEUE|unix.MSG_DONTWAIT)
	})
	if rerr != nil {
		return fmt.Errorf("read: %v; error queue: %v", err, rerr)
	}
	msgs, perr := unix.ParseSocketControlMessage(oob[:oobn])
	if perr != nil {
		return perr
	}
	for _, m := range msgs {
		if m.Header.Level != unix.SOL_IP || m.Header.Type != unix.IP_RECVERR || len(m.Data) < 24 {
			continue
		}
		d := m.Data
		from := netip.AddrFrom4([4]byte(d[20:24]))
		if binary.NativeEndian.Uint16(d[16:]) != unix.AF_INET {
			from = netip.Addr{}
		}
		fmt.Printf("%v icmp type=%d code=%d from=%s\n", errors.Unwrap(errors.Unwrap(err)), d[5], d[6], from)
		return nil
	}
	return fmt.Errorf("no ICMP error in the error queue (read error %v)", err)
}
