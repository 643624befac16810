package main

import (
	"fmt"
	"io"
	"net"
)

// serveTCP listens on addr and serves it with serveConns.
func serveTCP(addr string, handle func(net.Conn)) error {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return err
	}
	return serveConns(ln, handle)
}

// serveConns says it listens and serves each connection with handle in a
// goroutine of its own; the connection is closed after it.
func serveConns(ln net.Listener, handle func(net.Conn)) error {
	fmt.Printf("listening %s\n", ln.Addr())
	for {
		c, err := ln.Accept()
		if err != nil {
			return err
		}
		go func() {
			defer c.Close()
			handle(c)
		}()
	}
}

// echo sends back what the client sends, half-closing after its FIN where
// it can.
func echo(c net.Conn) {
	_, _ = io.Copy(c, c)
	if tc, ok := c.(*net.TCPConn); ok {
		_ = tc.CloseWrite()
	}
}

func tcpEchoServer(args []string) error {
	if err := needArgs(args, 1); err != nil {
		return err
	}
	return serveTCP(args[0], echo)
}

func udpEchoServer(args []string) error {
	if err := needArgs(args, 1); err != nil {
		return err
	}
	pc, err := net.ListenPacket("udp", args[0])
	if err != nil {
		return err
	}
	fmt.Printf("listening %s\n", pc.LocalAddr())
	buf := make([]byte, 65535)
	for {
		n, from, err := pc.ReadFrom(buf)
		if err != nil {
			return err
		}
		_, _ = pc.WriteTo(buf[:n], from)
	}
}
