package main

import (
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"time"

	"golang.org/x/sys/unix"
)

// finThenReset connects, sends a byte, half-closes, waits a moment (the
// FIN reaches the far end) and then resets the connection.
func finThenReset(args []string) error {
	if err := needArgs(args, 1); err != nil {
		return err
	}
	c, err := net.DialTimeout("tcp", args[0], 10*time.Second)
	if err != nil {
		return err
	}
	tc := c.(*net.TCPConn)
	if _, err := tc.Write([]byte{'x'}); err != nil {
		return err
	}
	if err := tc.CloseWrite(); err != nil {
		return err
	}
	time.Sleep(500 * time.Millisecond)
	_ = tc.SetLinger(0)
	return tc.Close()
}

// closeWaitServer accepts one connection, reads it to its end and then
// keeps it open, as a server that has nothing to send would, until the
// peer resets it; it writes "reset" to FILE when that happens.
func closeWaitServer(args []string) error {
	if err := needArgs(args, 2); err != nil {
		return err
	}
	ln, err := net.Listen("tcp", args[0])
	if err != nil {
		return err
	}
	fmt.Printf("listening %s\n", ln.Addr())
	c, err := ln.Accept()
	if err != nil {
		return err
	}
	defer c.Close()
	if _, err := io.Copy(io.Discard, c); err != nil {
		return err
	}
	rc, err := c.(*net.TCPConn).SyscallConn()
	if err != nil {
		return err
	}
	for {
		var info *unix.TCPInfo
		var ierr error
		if err := rc.Control(func(fd uintptr) { info, ierr = unix.GetsockoptTCPInfo(int(fd), unix.IPPROTO_TCP, unix.TCP_INFO) }); err != nil {
			return err
		}
		if ierr != nil {
			return ierr
		}
		if info.State == unix.BPF_TCP_CLOSE {
			return os.WriteFile(args[1], []byte("reset\n"), 0o644)
		}
		if info.State != unix.BPF_TCP_CLOSE_WAIT {
			return errors.New("unexpected TCP state")
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// floodServer answers each connection's first byte, then sends zeros until
// the connection ends: a host peer that keeps sending to a guest that has
// stopped reading.
func floodServer(args []string) error {
	if err := needArgs(args, 1); err != nil {
		return err
	}
	ln, err := net.Listen("tcp", args[0])
	if err != nil {
		return err
	}
	fmt.Printf("listening %s\n", ln.Addr())
	for {
		c, err := ln.Accept()
		if err != nil {
			return err
		}
		go func() {
			defer c.Close()
			one := make([]byte, 1)
			if _, err := io.ReadFull(c, one); err != nil {
				return
			}
			if _, err := c.Write(one); err != nil {
				return
			}
			zeros := make([]byte, 64<<10)
			for {
				if _, err := c.Write(zeros); err != nil {
					return
				}
			}
		}()
	}
}
