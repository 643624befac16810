package main

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"strconv"
	"syscall"
	"time"

	"github.com/miekg/dns"
)

// dnsFlood sends DNS queries to SERVER from 256 sockets for SECONDS as fast
// as it can, never reading an answer: a hostile guest for the forwarder.
func dnsFlood(args []string) error {
	if err := needArgs(args, 2); err != nil {
		return err
	}
	secs, err := strconv.ParseFloat(args[1], 64)
	if err != nil {
		return err
	}
	m := new(dns.Msg)
	m.SetQuestion("flood.test.", dns.TypeA)
	query, err := m.Pack()
	if err != nil {
		return err
	}
	var conns []net.Conn
	defer func() {
		for _, c := range conns {
			c.Close()
		}
	}()
	for i := 0; i < 256; i++ {
		c, err := net.Dial("udp", args[0])
		if err != nil {
			return err
		}
		conns = append(conns, c)
	}
	sent := 0
	end := time.Now().Add(time.Duration(secs * float64(time.Second)))
	for i := 0; time.Now().Before(end); i++ {
		binary.BigEndian.PutUint16(query, uint16(i))
		// A full socket buffer (ENOBUFS, EAGAIN) just means the
		// helper is behind: go on.
		if _, err := conns[i%len(conns)].Write(query); err == nil {
			sent++
		}
	}
	fmt.Printf("sent=%d\n", sent)
	return nil
}

// pingSpray sends one ICMP echo request to HOST with each of COUNT
// identifiers (COUNT ping "processes" for the helper) from a raw socket.
func pingSpray(args []string) error {
	if err := needArgs(args, 2); err != nil {
		return err
	}
	count, err := strconv.Atoi(args[1])
	ip := net.ParseIP(args[0]).To4()
	if err != nil || ip == nil {
		return errors.New("bad HOST or COUNT")
	}
	fd, err := syscall.Socket(syscall.AF_INET, syscall.SOCK_RAW|syscall.SOCK_CLOEXEC, syscall.IPPROTO_ICMP)
	if err != nil {
		return err
	}
	defer syscall.Close(fd)
	sent := 0
	for i := 0; i < count; i++ {
		msg := make([]byte, 8)
		msg[0] = 8 // echo request
		binary.BigEndian.PutUint16(msg[4:], uint16(i))
		binary.BigEndian.PutUint16(msg[6:], 1)
		binary.BigEndian.PutUint16(msg[2:], icmpChecksum(msg))
		if syscall.Sendto(fd, msg, 0, &syscall.SockaddrInet4{Addr: [4]byte(ip)}) == nil {
			sent++
		}
	}
	fmt.Printf("sent=%d\n", sent)
	return nil
}

func icmpChecksum(b []byte) uint16 {
	var sum uint32
	for i := 0; i+1 < len(b); i += 2 {
		sum += uint32(binary.BigEndian.Uint16(b[i:]))
	}
	for sum > 0xffff {
		sum = sum>>16 + sum&0xffff
	}
	return ^uint16(sum)
}
