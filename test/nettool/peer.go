package main

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"net"
	"strconv"
	"syscall"
	"time"
)

// peerServer tells every client the address it sees it connecting from:
// one line "peer=ADDR" per TCP connection or per UDP datagram.
func peerServer(args []string) error {
	if err := needArgs(args, 2); err != nil {
		return err
	}
	switch args[0] {
	case "tcp":
		ln, err := net.Listen("tcp", args[1])
		if err != nil {
			return err
		}
		fmt.Printf("listening %s\n", ln.Addr())
		for {
			c, err := ln.Accept()
			if err != nil {
				return err
			}
			fmt.Fprintf(c, "peer=%s\n", c.RemoteAddr())
			c.Close()
		}
	case "udp":
		pc, err := net.ListenPacket("udp", args[1])
		if err != nil {
			return err
		}
		fmt.Printf("listening %s\n", pc.LocalAddr())
		buf := make([]byte, 2048)
		for {
			_, from, err := pc.ReadFrom(buf)
			if err != nil {
				return err
			}
			_, _ = pc.WriteTo([]byte(fmt.Sprintf("peer=%s\n", from)), from)
		}
	}
	return fmt.Errorf("protocol must be tcp or udp")
}

// peerQuery asks a peer-server what it sees and prints its line.
func peerQuery(args []string) error {
	if err := needArgs(args, 2); err != nil {
		return err
	}
	c, err := net.DialTimeout(args[0], args[1], 10*time.Second)
	if err != nil {
		return err
	}
	defer c.Close()
	for attempt := 0; attempt < 5; attempt++ {
		if args[0] == "udp" {
			if _, err := c.Write([]byte("?")); err != nil {
				return err
			}
		}
		_ = c.SetReadDeadline(time.Now().Add(2 * time.Second))
		line, err := bufio.NewReader(c).ReadString('\n')
		if err == nil {
			fmt.Print(line)
			return nil
		}
		if args[0] == "tcp" {
			return err
		}
	}
	return fmt.Errorf("no answer")
}

// burstServer sends BYTES to every client and closes first.
func burstServer(args []string) error {
	if err := needArgs(args, 2); err != nil {
		return err
	}
	size, err := strconv.Atoi(args[1])
	if err != nil {
		return err
	}
	ln, err := net.Listen("tcp", args[0])
	if err != nil {
		return err
	}
	burst := make([]byte, size)
	return serveConns(ln, func(c net.Conn) { _, _ = c.Write(burst) })
}

// tcpReconnect connects COUNT times in a row from one local port to a
// burst-server, which sends BYTES and closes first: the port is free again
// at once (no TIME_WAIT on this side), and each connection uses the same
// four addresses as the one before.
func tcpReconnect(args []string) error {
	if err := needArgs(args, 4); err != nil {
		return err
	}
	port, err1 := strconv.Atoi(args[1])
	count, err2 := strconv.Atoi(args[2])
	size, err3 := strconv.Atoi(args[3])
	if err := errors.Join(err1, err2, err3); err != nil {
		return err
	}
	d := net.Dialer{Timeout: 10 * time.Second, LocalAddr: &net.TCPAddr{Port: port},
		Control: func(_, _ string, c syscall.RawConn) error {
			var serr error
			err := c.Control(func(fd uintptr) {
				serr = syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_REUSEADDR, 1)
			})
			return errors.Join(err, serr)
		}}
	for i := range count {
		// The last close's final ACK may still be on its way, and
		// its socket (LAST_ACK) holds the addresses until then.
		time.Sleep(100 * time.Millisecond)
		c, err := d.Dial("tcp", args[0])
		if err != nil {
			return fmt.Errorf("connection %d: %w", i+1, err)
		}
		_ = c.SetReadDeadline(time.Now().Add(10 * time.Second))
		n, err := io.Copy(io.Discard, c)
		c.Close()
		if err != nil || n != int64(size) {
			return fmt.Errorf("connection %d: read %d of %d bytes: %v", i+1, n, size, err)
		}
	}
	fmt.Printf("reconnects=%d\n", count)
	return nil
}
