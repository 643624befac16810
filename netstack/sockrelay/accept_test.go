package sockrelay

import (
	"net"
	"net/netip"
	"testing"

	"golang.org/x/sys/unix"
)

// Accept takes connections with their client's address, from the
// listener's pollable file.
func TestAcceptRaw(t *testing.T) {
	ln, err := net.ListenTCP("tcp4", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().(*net.TCPAddr)
	lf, err := ListenerFile(ln)
	if err != nil {
		t.Fatal(err)
	}
	defer lf.Close()
	c, err := net.DialTCP("tcp4", nil, addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	rc, err := lf.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	fd, errno := -1, unix.Errno(0)
	var client netip.AddrPort
	if err := rc.Read(func(lfd uintptr) bool {
		fd, client, errno = Accept(lfd)
		return errno != unix.EAGAIN
	}); err != nil || errno != 0 {
		t.Fatalf("accept: %v, %v", err, errno)
	}
	defer unix.Close(fd)
	if want := c.LocalAddr().(*net.TCPAddr).AddrPort(); client != want {
		t.Errorf("client %v, want %v", client, want)
	}
}
