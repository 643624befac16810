package tap

import (
	"io"
	"net"
	"os"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

func seqpacketPair(t *testing.T) (*net.UnixConn, *net.UnixConn) {
	t.Helper()
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_SEQPACKET|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	conns := make([]*net.UnixConn, 2)
	for i, fd := range fds {
		f := os.NewFile(uintptr(fd), "pair")
		c, err := net.FileConn(f)
		f.Close()
		if err != nil {
			t.Fatal(err)
		}
		conns[i] = c.(*net.UnixConn)
		t.Cleanup(func() { c.Close() })
	}
	return conns[0], conns[1]
}

func TestSendRecvFiles(t *testing.T) {
	a, b := seqpacketPair(t)
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	if err := SendFiles(a, []byte("hello"), w); err != nil {
		t.Fatal(err)
	}
	w.Close()
	buf := make([]byte, 64)
	n, files, err := RecvFiles(b, buf)
	if err != nil {
		t.Fatal(err)
	}
	if string(buf[:n]) != "hello" || len(files) != 1 {
		t.Fatalf("got %q with %d files", buf[:n], len(files))
	}
	flags, err := unix.FcntlInt(files[0].Fd(), unix.F_GETFD, 0)
	if err != nil || flags&unix.FD_CLOEXEC == 0 {
		t.Errorf("received fd is not close-on-exec (flags %#x, %v)", flags, err)
	}
	// The received descriptor is the pipe's write end: data crosses.
	if _, err := files[0].Write([]byte("x")); err != nil {
		t.Fatal(err)
	}
	files[0].Close()
	got, err := io.ReadAll(r)
	if err != nil || string(got) != "x" {
		t.Fatalf("read %q, %v", got, err)
	}
}

func TestSendFilesLimit(t *testing.T) {
	a, _ := seqpacketPair(t)
	files := make([]*os.File, maxPassedFiles+1)
	for i := range files {
		files[i] = os.Stdin
	}
	if err := SendFiles(a, []byte("x"), files...); err == nil {
		t.Fatal("sending more than the limit succeeded")
	}
}

func TestRecvWithoutFiles(t *testing.T) {
	a, b := seqpacketPair(t)
	if err := SendFiles(a, []byte("plain")); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 64)
	n, files, err := RecvFiles(b, buf)
	if err != nil || string(buf[:n]) != "plain" || len(files) != 0 {
		t.Fatalf("got %q, %d files, %v", buf[:n], len(files), err)
	}
}

// A message whose control data holds descriptors and something else is
// refused, and the descriptors that came with it are closed: the pipe's
// reader sees its only writer gone.
func TestRecvClosesFilesOfABadMessage(t *testing.T) {
	a, b := seqpacketPair(t)
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	rc, err := b.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var serr error
	if err := rc.Control(func(fd uintptr) { serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_PASSCRED, 1) }); err != nil || serr != nil {
		t.Fatal(err, serr)
	}
	oob := append(unix.UnixRights(int(w.Fd())), unix.UnixCredentials(&unix.Ucred{Pid: int32(os.Getpid()), Uid: uint32(os.Getuid()), Gid: uint32(os.Getgid())})...)
	if _, _, err := a.WriteMsgUnix([]byte("x"), oob, nil); err != nil {
		t.Fatal(err)
	}
	w.Close()
	if _, files, err := RecvFiles(b, make([]byte, 64)); err == nil {
		t.Fatalf("a message with credentials beside its descriptors was taken (%d files)", len(files))
	}
	_ = r.SetReadDeadline(time.Now().Add(10 * time.Second))
	if got, err := io.ReadAll(r); err != nil || len(got) != 0 {
		t.Fatalf("the pipe's writer stayed open: %q, %v", got, err)
	}
}
