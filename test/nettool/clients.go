package main

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"os"
	"strconv"
	"syscall"
	"time"

	"github.com/miekg/dns"
)

// tcpEchoCheck streams BYTES pseudo-random bytes to an echo server while
// reading the echo back, and compares the sha256 of both streams.
func tcpEchoCheck(args []string) error {
	if err := needArgs(args, 2); err != nil {
		return err
	}
	size, err := strconv.ParseInt(args[1], 10, 64)
	if err != nil {
		return err
	}
	// Generous: the soak tests start it while a guest floods SYNs, and a
	// dropped SYN is retried only after 1, 3, 7, 15 s.
	c, err := net.DialTimeout("tcp", args[0], time.Minute)
	if err != nil {
		return err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(5 * time.Minute))
	start := time.Now()
	sent := sha256.New()
	errc := make(chan error, 1)
	go func() {
		src := io.LimitReader(rand.NewChaCha8([32]byte{1, 2, 3}), size)
		_, err := io.Copy(io.MultiWriter(c, sent), src)
		if err == nil {
			err = c.(*net.TCPConn).CloseWrite()
		}
		errc <- err
	}()
	recv := sha256.New()
	n, err := io.Copy(recv, c)
	if err != nil {
		return fmt.Errorf("read echo after %d bytes: %w", n, err)
	}
	if err := <-errc; err != nil {
		return fmt.Errorf("send: %w", err)
	}
	el := time.Since(start)
	s, r := fmt.Sprintf("%x", sent.Sum(nil)), fmt.Sprintf("%x", recv.Sum(nil))
	fmt.Printf("bytes=%d sent_sha256=%s recv_sha256=%s seconds=%.3f\n", n, s, r, el.Seconds())
	if n != size || s != r {
		return fmt.Errorf("echo mismatch: sent %d bytes, received %d", size, n)
	}
	return nil
}

// tcpEchoMany runs CONNS echo checks of BYTES each at the same time and
// reports how many completed with matching data.
func tcpEchoMany(args []string) error {
	if err := needArgs(args, 3); err != nil {
		return err
	}
	conns, err1 := strconv.Atoi(args[1])
	size, err2 := strconv.Atoi(args[2])
	if err := errors.Join(err1, err2); err != nil {
		return err
	}
	errs := make(chan error, conns)
	for i := 0; i < conns; i++ {
		go func() { errs <- echoOnce(args[0], size, byte(i)) }()
	}
	ok := 0
	var first error
	for i := 0; i < conns; i++ {
		if err := <-errs; err != nil {
			if first == nil {
				first = err
			}
			continue
		}
		ok++
	}
	fmt.Printf("conns=%d ok=%d\n", conns, ok)
	if ok != conns {
		return fmt.Errorf("%d of %d connections failed; first: %w", conns-ok, conns, first)
	}
	return nil
}

// echoOnce sends size bytes derived from seed and checks they come back.
func echoOnce(addr string, size int, seed byte) error {
	c, err := net.DialTimeout("tcp", addr, 20*time.Second)
	if err != nil {
		return err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(2 * time.Minute))
	msg := make([]byte, size)
	rand.NewChaCha8([32]byte{seed}).Read(msg)
	errc := make(chan error, 1)
	go func() {
		_, err := c.Write(msg)
		if err == nil {
			err = c.(*net.TCPConn).CloseWrite()
		}
		errc <- err
	}()
	got, err := io.ReadAll(c)
	if err != nil {
		return err
	}
	if err := <-errc; err != nil {
		return err
	}
	if !bytes.Equal(got, msg) {
		return fmt.Errorf("echo differs (%d of %d bytes)", len(got), size)
	}
	return nil
}

// udpEchoCheck sends COUNT numbered datagrams of SIZE bytes one at a time
// and checks each echo, retrying a lost one a few times.
func udpEchoCheck(args []string) error {
	if err := needArgs(args, 3); err != nil {
		return err
	}
	count, err1 := strconv.Atoi(args[1])
	size, err2 := strconv.Atoi(args[2])
	if err := errors.Join(err1, err2); err != nil {
		return err
	}
	if size < 8 {
		return fmt.Errorf("size must be at least 8")
	}
	c, err := net.Dial("udp", args[0])
	if err != nil {
		return err
	}
	defer c.Close()
	rng := rand.New(rand.NewPCG(1, 2))
	msg := make([]byte, size)
	buf := make([]byte, 65535)
	retries := 0
	for i := 0; i < count; i++ {
		binary.BigEndian.PutUint64(msg, uint64(i))
		for j := 8; j < size; j++ {
			msg[j] = byte(rng.Uint32())
		}
		for attempt := 0; ; attempt++ {
			if attempt == 5 {
				return fmt.Errorf("datagram %d: no echo after %d tries", i, attempt)
			}
			if _, err := c.Write(msg); err != nil {
				return err
			}
			_ = c.SetReadDeadline(time.Now().Add(time.Second))
			n, err := c.Read(buf)
			if err != nil {
				retries++
				continue
			}
			if !bytes.Equal(buf[:n], msg) {
				if n >= 8 && binary.BigEndian.Uint64(buf) < uint64(i) {
					continue // late echo of a retried datagram
				}
				return fmt.Errorf("datagram %d: echo differs (%d bytes)", i, n)
			}
			break
		}
	}
	fmt.Printf("datagrams=%d size=%d retries=%d\n", count, size, retries)
	return nil
}

// dnsQuery asks SERVER for NAME (type A unless TYPE is given) and prints
// the answer's A and AAAA records and "rcode NOERROR answers=N"; another
// rcode is an error that names it.
func dnsQuery(args []string) error {
	if len(args) != 3 && len(args) != 4 {
		return fmt.Errorf("want SERVER NAME udp|tcp [TYPE]")
	}
	qtype := dns.TypeA
	if len(args) == 4 {
		t, ok := dns.StringToType[args[3]]
		if !ok {
			return fmt.Errorf("unknown type %q", args[3])
		}
		qtype = t
	}
	c := &dns.Client{Net: args[2], Timeout: 5 * time.Second}
	m := new(dns.Msg)
	m.SetQuestion(dns.Fqdn(args[1]), qtype)
	resp, _, err := c.Exchange(m, args[0])
	if err != nil {
		return err
	}
	if resp.Rcode != dns.RcodeSuccess {
		return fmt.Errorf("rcode %s", dns.RcodeToString[resp.Rcode])
	}
	for _, rr := range resp.Answer {
		switch a := rr.(type) {
		case *dns.A:
			fmt.Printf("A %s\n", a.A)
		case *dns.AAAA:
			fmt.Printf("AAAA %s\n", a.AAAA)
		}
	}
	fmt.Printf("rcode NOERROR answers=%d\n", len(resp.Answer))
	return nil
}

// resolve looks NAME up through /etc/resolv.conf with Go's own resolver.
func resolve(args []string) error {
	if err := needArgs(args, 1); err != nil {
		return err
	}
	r := &net.Resolver{PreferGo: true}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	addrs, err := r.LookupHost(ctx, args[0])
	if err != nil {
		return err
	}
	for _, a := range addrs {
		fmt.Printf("addr %s\n", a)
	}
	return nil
}

// tcpConnect prints "connected", "refused" or "unreachable" (an ICMP
// network or host unreachable) and fails on anything else.
func tcpConnect(args []string) error {
	if err := needArgs(args, 1); err != nil {
		return err
	}
	c, err := net.DialTimeout("tcp", args[0], 10*time.Second)
	if errors.Is(err, syscall.ECONNREFUSED) {
		fmt.Println("refused")
		return nil
	}
	if errors.Is(err, syscall.ENETUNREACH) || errors.Is(err, syscall.EHOSTUNREACH) {
		fmt.Println("unreachable")
		return nil
	}
	if err != nil {
		return err
	}
	c.Close()
	fmt.Println("connected")
	return nil
}

func sleepForever(args []string) error {
	if err := needArgs(args, 1); err != nil {
		return err
	}
	fmt.Fprintln(os.Stdout, "sleeping", args[0])
	select {}
}

// apiCall sends one request to a slirp4netns-style API socket the way
// podman does (write, half-close) and prints the reply.
func apiCall(args []string) error {
	if err := needArgs(args, 2); err != nil {
		return err
	}
	c, err := net.DialTimeout("unix", args[0], 10*time.Second)
	if err != nil {
		return err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.WriteString(c, args[1]); err != nil {
		return err
	}
	_ = c.(*net.UnixConn).CloseWrite()
	reply, err := io.ReadAll(c)
	if err != nil {
		return err
	}
	fmt.Println(string(reply))
	return nil
}
