package main

import (
	"bufio"
	"fmt"
	"net"
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
