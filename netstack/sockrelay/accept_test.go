package sockrelay

import (
	"errors"
	"net"
	"os"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"
)

// listenerWithClient returns a loopback listener's file and its raw
// connection, with a client's connection waiting in its queue; all are
// closed at the end of the test.
func listenerWithClient(t *testing.T) (*os.File, syscall.RawConn, *net.TCPConn) {
	t.Helper()
	ln, err := net.ListenTCP("tcp4", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().(*net.TCPAddr)
	lf, err := ListenerFile(ln)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { lf.Close() })
	c, err := net.DialTCP("tcp4", nil, addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	rc, err := lf.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	return lf, rc, c
}

// Accept takes connections with their client's address, from the
// listener's pollable file.
func TestAcceptRaw(t *testing.T) {
	_, rc, c := listenerWithClient(t)
	fd, client, err := Accept(rc)
	if err != nil {
		t.Fatalf("accept: %v", err)
	}
	defer unix.Close(fd)
	if want := c.LocalAddr().(*net.TCPAddr).AddrPort(); client != want {
		t.Errorf("client %v, want %v", client, want)
	}
}

// A listener out of descriptors for a moment refuses with an error that
// AcceptBackoff lets pass; the waiting connection is taken once there are
// descriptors again. A closed listener ends the loop.
func TestAcceptOutOfDescriptorsPasses(t *testing.T) {
	lf, rc, c := listenerWithClient(t)
	var lim unix.Rlimit
	if err := unix.Getrlimit(unix.RLIMIT_NOFILE, &lim); err != nil {
		t.Fatal(err)
	}
	// The lowest free descriptor as the limit: accept's must be above.
	free, err := unix.Open("/dev/null", unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	unix.Close(free)
	low := lim
	low.Cur = uint64(free)
	if err := unix.Setrlimit(unix.RLIMIT_NOFILE, &low); err != nil {
		t.Fatal(err)
	}
	_, _, err = Accept(rc)
	if err := unix.Setrlimit(unix.RLIMIT_NOFILE, &lim); err != nil {
		t.Fatal(err)
	}
	if !errors.Is(err, unix.EMFILE) {
		t.Fatalf("accept under the limit: %v, want EMFILE", err)
	}
	var b AcceptBackoff
	if !b.Wait(err) {
		t.Fatal("AcceptBackoff ends the loop on EMFILE")
	}
	fd, client, err := Accept(rc)
	if err != nil {
		t.Fatalf("accept after: %v", err)
	}
	unix.Close(fd)
	if want := c.LocalAddr().(*net.TCPAddr).AddrPort(); client != want {
		t.Errorf("client %v, want %v", client, want)
	}
	lf.Close()
	if _, _, err := Accept(rc); b.Wait(err) {
		t.Errorf("AcceptBackoff goes on after the listener closed (%v)", err)
	}
	if !b.Wait(&net.OpError{Op: "accept", Err: os.NewSyscallError("accept4", unix.ENFILE)}) {
		t.Error("AcceptBackoff ends the loop on the net package's ENFILE")
	}
}
