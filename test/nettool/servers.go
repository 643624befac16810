package main

import (
	"fmt"
	"io"
	"net"
)

// serveTCP listens on addr, says so on stdout, and serves each connection
// with handle in a goroutine of its own (handle closes nothing; the
// connection is closed after it).
func serveTCP(addr string, handle func(net.Conn)) error {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return err
	}
	return serveEcho(ln)
}

// serveEcho says it listens and echoes what each client sends, half-closing
// after the client's FIN where it can.
func serveEcho(ln net.Listener) error {
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

func tcpEchoServer(args []string) error {
	if err := needArgs(args, 1); err != nil {
		return err
	}
	return serveTCP(args[0], func(c net.Conn) {
		_, _ = io.Copy(c, c)
		if tc, ok := c.(*net.TCPConn); ok {
			_ = tc.CloseWrite()
		}
	})
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
