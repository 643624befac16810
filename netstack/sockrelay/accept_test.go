package sockrelay

import (
	"net"
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
	fd, client, err := Accept(rc)
	if err != nil {
		t.Fatalf("accept: %v", err)
	}
	defer unix.Close(fd)
	if want := c.LocalAddr().(*net.TCPAddr).AddrPort(); client != want {
		t.Errorf("client %v, want %v", client, want)
	}
}
